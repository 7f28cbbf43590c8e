//! Decompression of qcow2 clusters and VMDK grains.
//!
//! A compressed stream may be followed by unrelated bytes (qcow2 rounds compressed
//! lengths up to whole sectors, and the last sector may be shared with the next
//! cluster), so decoding stops as soon as the output unit is full and trailing input is
//! ignored. Output that comes up short is an error: a damaged image must never be
//! served with zero-padded guesses.

use crate::layer::Compression;

/// Decompresses `input` into exactly `out.len()` bytes. The error says what went wrong.
pub fn decompress(compression: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match compression {
        Compression::Deflate => inflate(input, out, false),
        Compression::Zlib => inflate(input, out, true),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8], zlib_header: bool) -> Result<(), String> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut inflater = Decompress::new(zlib_header);
    loop {
        let produced = inflater.total_out() as usize;
        let consumed = inflater.total_in() as usize;
        if produced == out.len() {
            return Ok(());
        }
        let status = inflater
            .decompress(
                &input[consumed..],
                &mut out[produced..],
                FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate: {e}"))?;
        let progressed =
            inflater.total_out() as usize != produced || inflater.total_in() as usize != consumed;
        match status {
            Status::StreamEnd if (inflater.total_out() as usize) < out.len() => {
                return Err(format!(
                    "the stream ends after {} of {} bytes",
                    inflater.total_out(),
                    out.len()
                ));
            }
            _ if !progressed => {
                return Err(format!(
                    "the stream is truncated after {} of {} bytes",
                    inflater.total_out(),
                    out.len()
                ));
            }
            _ => {}
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use std::cell::RefCell;
    use zstd::stream::raw::Decoder;
    thread_local! {
        // A decoder context per thread: creating one costs more than decoding a cluster.
        static DECODER: RefCell<Option<Decoder<'static>>> = const { RefCell::new(None) };
    }
    DECODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decoder = match slot.as_mut() {
            Some(d) => {
                zstd::stream::raw::Operation::reinit(d).map_err(|e| format!("zstd: {e}"))?;
                d
            }
            None => slot.insert(Decoder::new().map_err(|e| format!("zstd: {e}"))?),
        };
        unzstd_with(decoder, input, out)
    })
}

fn unzstd_with(
    decoder: &mut zstd::stream::raw::Decoder<'static>,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut inbuf = InBuffer::around(input);
    let mut outbuf = OutBuffer::around(out);
    loop {
        let before = (inbuf.pos(), outbuf.pos());
        let hint = decoder
            .run(&mut inbuf, &mut outbuf)
            .map_err(|e| format!("zstd: {e}"))?;
        if outbuf.pos() == outbuf.capacity() {
            return Ok(());
        }
        if hint == 0 || before == (inbuf.pos(), outbuf.pos()) {
            return Err(format!(
                "the stream ends after {} of {} bytes",
                outbuf.pos(),
                outbuf.capacity()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate(data: &[u8], zlib: bool) -> Vec<u8> {
        if zlib {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        } else {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }

    #[test]
    fn round_trips_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 / 13) as u8).collect();
        for (compression, mut stream) in [
            (Compression::Deflate, deflate(&data, false)),
            (Compression::Zlib, deflate(&data, true)),
            (Compression::Zstd, zstd::bulk::compress(&data, 3).unwrap()),
            // As qemu writes them: a frame without its content size in the header.
            (
                Compression::Zstd,
                zstd::stream::encode_all(&data[..], 3).unwrap(),
            ),
        ] {
            stream.extend_from_slice(&[0xff; 700]);
            let mut out = vec![0; data.len()];
            decompress(compression, &stream, &mut out).unwrap();
            assert_eq!(out, data, "{compression:?}");
        }
    }

    #[test]
    fn a_prefix_of_a_unit_decodes_to_its_first_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 / 13) as u8).collect();
        for (compression, stream) in [
            (Compression::Deflate, deflate(&data, false)),
            (Compression::Zlib, deflate(&data, true)),
            (Compression::Zstd, zstd::bulk::compress(&data, 3).unwrap()),
            (
                Compression::Zstd,
                zstd::stream::encode_all(&data[..], 3).unwrap(),
            ),
        ] {
            let mut out = vec![0; 4096];
            decompress(compression, &stream, &mut out).unwrap();
            assert_eq!(out, data[..4096], "{compression:?}");
        }
    }

    #[test]
    fn short_or_damaged_streams_are_errors() {
        let data = vec![0x5au8; 65536];
        for (compression, stream) in [
            (Compression::Deflate, deflate(&data, false)),
            (Compression::Zlib, deflate(&data, true)),
            (Compression::Zstd, zstd::bulk::compress(&data, 3).unwrap()),
        ] {
            let mut out = vec![0; data.len() * 2];
            assert!(
                decompress(compression, &stream, &mut out).is_err(),
                "{compression:?} short"
            );
            let mut out = vec![0; data.len()];
            let cut = &stream[..stream.len() / 2];
            assert!(
                decompress(compression, cut, &mut out).is_err(),
                "{compression:?} cut"
            );
            let garbage = vec![0xa5u8; 300];
            assert!(
                decompress(compression, &garbage, &mut out).is_err(),
                "{compression:?} garbage"
            );
        }
    }
}
