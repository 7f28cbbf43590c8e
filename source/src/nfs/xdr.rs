//! XDR (RFC 4506): the encoder for calls and the bounded decoder for replies, with the
//! NFSv3 attributes the client reads, and [`Fail`], the failure every layer of the
//! client returns (the decoder is the first to produce one). Every length from the
//! server is checked against the record before anything is taken or allocated.

use std::io;
use std::ops::Range;

use crate::FetchErrorKind;

/// NFSv3 (and MOUNT v3) file handles are at most 64 bytes.
pub(super) const FHSIZE3: usize = 64;

/// A failure without its operation and URI, which the public entry points add.
#[derive(Debug)]
pub(super) struct Fail {
    pub(super) kind: FetchErrorKind,
    pub(super) message: String,
}

impl Fail {
    pub(super) fn transient(message: impl Into<String>) -> Fail {
        Fail {
            kind: FetchErrorKind::Transient,
            message: message.into(),
        }
    }

    pub(super) fn permanent(message: impl Into<String>) -> Fail {
        Fail {
            kind: FetchErrorKind::Permanent,
            message: message.into(),
        }
    }

    pub(super) fn changed(message: impl Into<String>) -> Fail {
        Fail {
            kind: FetchErrorKind::Changed,
            message: message.into(),
        }
    }

    pub(super) fn io(what: &str, e: &io::Error) -> Fail {
        Fail::transient(format!("{what}: {e}"))
    }
}

/// A reply that breaks the protocol (a permanent failure).
pub(super) fn malformed(what: &str) -> Fail {
    Fail::permanent(format!("malformed reply from the server ({what})"))
}

/// The attributes that matter here, from an `fattr3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Attr {
    pub(super) ftype: u32,
    pub(super) size: u64,
    pub(super) fileid: u64,
    pub(super) mtime: (u32, u32),
}

/// XDR encoder.
#[derive(Default)]
pub(super) struct Enc(pub(super) Vec<u8>);

impl Enc {
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    pub(super) fn opaque(&mut self, bytes: &[u8]) {
        self.u32(bytes.len() as u32);
        self.0.extend_from_slice(bytes);
        self.0.resize(self.0.len() + (4 - bytes.len() % 4) % 4, 0);
    }
}

/// XDR decoder over a received record; every length is checked against the record.
pub(super) struct Dec<'a> {
    buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Dec<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Dec<'a> {
        Dec { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Fail> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| malformed("truncated"))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    pub(super) fn u32(&mut self) -> Result<u32, Fail> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn u64(&mut self) -> Result<u64, Fail> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    pub(super) fn bool(&mut self) -> Result<bool, Fail> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(malformed("a boolean is neither 0 nor 1")),
        }
    }

    /// A variable-length opaque of at most `max` bytes, as a range of the record.
    pub(super) fn opaque_range(&mut self, max: usize) -> Result<Range<usize>, Fail> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(malformed(&format!("{len} bytes where at most {max} fit")));
        }
        let start = self.pos;
        self.take(len)?;
        self.take((4 - len % 4) % 4)?;
        Ok(start..start + len)
    }

    pub(super) fn opaque(&mut self, max: usize) -> Result<&'a [u8], Fail> {
        let range = self.opaque_range(max)?;
        Ok(&self.buf[range])
    }

    pub(super) fn fattr3(&mut self) -> Result<Attr, Fail> {
        let ftype = self.u32()?;
        self.take(16)?; // mode, nlink, uid, gid
        let size = self.u64()?;
        self.take(8 + 8 + 8)?; // used, rdev, fsid
        let fileid = self.u64()?;
        self.take(8)?; // atime
        let mtime = (self.u32()?, self.u32()?);
        self.take(8)?; // ctime
        Ok(Attr {
            ftype,
            size,
            fileid,
            mtime,
        })
    }

    pub(super) fn post_op_attr(&mut self) -> Result<Option<Attr>, Fail> {
        if self.bool()? {
            self.fattr3().map(Some)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_bounds_every_length() {
        let mut e = Enc::default();
        e.opaque(b"abcde");
        e.u32(0xffff_ffff);
        let mut d = Dec::new(&e.0);
        assert_eq!(d.opaque(8).unwrap(), b"abcde");
        assert!(d.opaque(usize::MAX).is_err());
        let mut d = Dec::new(&e.0);
        assert!(d.opaque(4).is_err());
    }
}
