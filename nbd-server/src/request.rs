//! Request validation: turns a request header into a command the export can run, or
//! into the error the spec prescribes, before any payload is read or memory allocated.
//!
//! Pure and synchronous, so the transmission loop, unit tests and the fuzz target all
//! use the same rules.

use crate::export::{Capabilities, ZeroFlags};
use crate::proto::{ReplyMode, RequestHeader, cmd, cmd_flags, errno};

/// A payload longer than this that must be refused is not read and discarded: the
/// connection is closed instead (a 64-bit extended length cannot be skipped safely).
pub const MAX_SKIPPABLE_PAYLOAD: u64 = 64 * 1024 * 1024;

/// What the server knows about the negotiated session, for validation.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Export size in bytes.
    pub size: u64,
    /// Minimum block size (alignment) advertised.
    pub minimum_block: u32,
    /// Maximum READ/WRITE payload advertised.
    pub maximum_payload: u32,
    /// Export capabilities.
    pub capabilities: Capabilities,
    /// Reply mode negotiated.
    pub mode: ReplyMode,
    /// Number of metadata contexts selected with `NBD_OPT_SET_META_CONTEXT`.
    pub meta_contexts: usize,
    /// The server is shutting down: every new request gets `ESHUTDOWN`.
    pub shutting_down: bool,
}

/// A validated command, in range and permitted.
#[allow(missing_docs)] // the fields are described on each variant
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes; `df` asks for one unfragmented data chunk.
    Read { offset: u64, length: u32, df: bool },
    /// Write a payload of `length` bytes, which follows the header.
    Write { offset: u64, length: u32, fua: bool },
    /// Make acknowledged writes durable.
    Flush,
    /// Discard a range.
    Trim { offset: u64, length: u64, fua: bool },
    /// Prefetch a range.
    Cache { offset: u64, length: u64 },
    /// Zero a range.
    WriteZeroes {
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    },
    /// Query all selected contexts over a range.
    BlockStatus {
        offset: u64,
        length: u64,
        req_one: bool,
    },
    /// Extended headers: a block-status request whose `payload_len`-byte payload
    /// (effect length plus context ids) follows the header.
    BlockStatusWithPayload {
        offset: u64,
        payload_len: u32,
        req_one: bool,
    },
    /// Soft disconnect.
    Disconnect,
}

/// The outcome of validating one request header.
#[allow(missing_docs)] // the fields are described on each variant
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Run this command (reading its payload first, if it has one).
    Run(Command),
    /// Reply with `errno` and `reason`, after skipping `skip` payload bytes.
    Refuse {
        errno: u32,
        reason: String,
        skip: u64,
    },
    /// The stream cannot be kept in sync: close the connection.
    Disconnect(String),
}

fn refuse(errno: u32, reason: impl Into<String>, skip: u64) -> Verdict {
    Verdict::Refuse {
        errno,
        reason: reason.into(),
        skip,
    }
}

/// Validates a request header against the session.
pub fn check(h: &RequestHeader, s: &SessionLimits) -> Verdict {
    let extended = s.mode == ReplyMode::Extended;
    let payload_flag = h.flags & cmd_flags::PAYLOAD_LEN != 0;
    // How many payload bytes follow the header, whatever we decide about the command.
    let payload = if h.command == cmd::WRITE || (extended && payload_flag) {
        h.length
    } else {
        0
    };
    let skip_or_close = |errno: u32, reason: String| {
        if payload > MAX_SKIPPABLE_PAYLOAD {
            Verdict::Disconnect(format!(
                "{reason}; its {payload}-byte payload cannot be skipped safely"
            ))
        } else {
            refuse(errno, reason, payload)
        }
    };

    if h.command == cmd::DISC {
        return Verdict::Run(Command::Disconnect);
    }
    if s.shutting_down {
        return skip_or_close(errno::ESHUTDOWN, "the server is shutting down".into());
    }
    if h.flags & !cmd_flags::KNOWN != 0 {
        return skip_or_close(
            errno::EINVAL,
            format!("unknown command flags {:#x}", h.flags & !cmd_flags::KNOWN),
        );
    }
    if payload_flag && !extended {
        return skip_or_close(
            errno::EINVAL,
            "PAYLOAD_LEN flag without extended headers".into(),
        );
    }
    let only = |allowed: u16, name: &str| -> Option<Verdict> {
        let stray = h.flags & !(allowed | cmd_flags::FUA);
        (stray != 0).then(|| {
            skip_or_close(
                errno::EINVAL,
                format!("flags {stray:#x} are not valid on {name}"),
            )
        })
    };
    let caps = &s.capabilities;
    let end = h
        .offset
        .checked_add(if h.command == cmd::WRITE || !payload_flag {
            h.length
        } else {
            0
        });
    let misaligned = |offset: u64, length: u64| {
        let m = u64::from(s.minimum_block.max(1));
        // The last block of an export whose size is not a multiple may be partial.
        !offset.is_multiple_of(m) || (!length.is_multiple_of(m) && offset + length != s.size)
    };

    match h.command {
        cmd::READ => {
            if let Some(v) = only(cmd_flags::DF, "READ") {
                return v;
            }
            if h.flags & cmd_flags::DF != 0 && s.mode == ReplyMode::Simple {
                return refuse(errno::EINVAL, "DF flag without structured replies", 0);
            }
            if h.length == 0 {
                return refuse(errno::EINVAL, "zero-length read", 0);
            }
            if h.length > u64::from(s.maximum_payload) {
                let errno = if h.flags & cmd_flags::DF != 0 {
                    errno::EOVERFLOW
                } else {
                    errno::EINVAL
                };
                return refuse(
                    errno,
                    format!(
                        "read of {} bytes exceeds the maximum payload {}",
                        h.length, s.maximum_payload
                    ),
                    0,
                );
            }
            if end.is_none_or(|e| e > s.size) {
                return refuse(
                    errno::EINVAL,
                    format!(
                        "read of {} bytes at offset {} is beyond the end ({})",
                        h.length, h.offset, s.size
                    ),
                    0,
                );
            }
            if misaligned(h.offset, h.length) {
                return refuse(
                    errno::EINVAL,
                    format!(
                        "read is not aligned to the minimum block size {}",
                        s.minimum_block
                    ),
                    0,
                );
            }
            Verdict::Run(Command::Read {
                offset: h.offset,
                length: h.length as u32,
                df: h.flags & cmd_flags::DF != 0,
            })
        }
        cmd::WRITE => {
            if let Some(v) = only(cmd_flags::PAYLOAD_LEN, "WRITE") {
                return v;
            }
            if h.length > u64::from(s.maximum_payload) {
                return skip_or_close(
                    errno::EINVAL,
                    format!(
                        "write of {} bytes exceeds the maximum payload {}",
                        h.length, s.maximum_payload
                    ),
                );
            }
            if caps.read_only {
                return skip_or_close(errno::EPERM, "the export is read-only".into());
            }
            if h.length == 0 {
                return refuse(errno::EINVAL, "zero-length write", 0);
            }
            if end.is_none_or(|e| e > s.size) {
                return skip_or_close(
                    errno::ENOSPC,
                    format!(
                        "write of {} bytes at offset {} is beyond the end ({})",
                        h.length, h.offset, s.size
                    ),
                );
            }
            if misaligned(h.offset, h.length) {
                return skip_or_close(
                    errno::EINVAL,
                    format!(
                        "write is not aligned to the minimum block size {}",
                        s.minimum_block
                    ),
                );
            }
            Verdict::Run(Command::Write {
                offset: h.offset,
                length: h.length as u32,
                fua: h.flags & cmd_flags::FUA != 0,
            })
        }
        cmd::FLUSH => {
            if let Some(v) = only(0, "FLUSH") {
                return v;
            }
            if payload_flag {
                return skip_or_close(errno::EINVAL, "FLUSH takes no payload".into());
            }
            Verdict::Run(Command::Flush)
        }
        cmd::TRIM | cmd::WRITE_ZEROES | cmd::CACHE => {
            let (name, allowed) = match h.command {
                cmd::TRIM => ("TRIM", 0),
                cmd::CACHE => ("CACHE", 0),
                _ => ("WRITE_ZEROES", cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO),
            };
            if let Some(v) = only(allowed, name) {
                return v;
            }
            if payload_flag {
                return skip_or_close(errno::EINVAL, format!("{name} takes no payload"));
            }
            let writes = h.command != cmd::CACHE;
            if writes && caps.read_only {
                return refuse(errno::EPERM, "the export is read-only", 0);
            }
            if (h.command == cmd::TRIM && !caps.trim)
                || (h.command == cmd::WRITE_ZEROES && !caps.write_zeroes)
            {
                return refuse(
                    errno::EINVAL,
                    format!("{name} is not supported by this export"),
                    0,
                );
            }
            if h.length == 0 {
                return refuse(errno::EINVAL, format!("zero-length {name}"), 0);
            }
            if end.is_none_or(|e| e > s.size) {
                let errno = if h.command == cmd::WRITE_ZEROES {
                    errno::ENOSPC
                } else {
                    errno::EINVAL
                };
                return refuse(
                    errno,
                    format!(
                        "{name} of {} bytes at offset {} is beyond the end ({})",
                        h.length, h.offset, s.size
                    ),
                    0,
                );
            }
            if misaligned(h.offset, h.length) {
                return refuse(
                    errno::EINVAL,
                    format!(
                        "{name} is not aligned to the minimum block size {}",
                        s.minimum_block
                    ),
                    0,
                );
            }
            let fua = h.flags & cmd_flags::FUA != 0;
            Verdict::Run(match h.command {
                cmd::TRIM => Command::Trim {
                    offset: h.offset,
                    length: h.length,
                    fua,
                },
                cmd::CACHE => Command::Cache {
                    offset: h.offset,
                    length: h.length,
                },
                _ => {
                    let fast = h.flags & cmd_flags::FAST_ZERO != 0;
                    if fast && !caps.fast_zero {
                        return refuse(
                            errno::EINVAL,
                            "FAST_ZERO is not supported by this export",
                            0,
                        );
                    }
                    Command::WriteZeroes {
                        offset: h.offset,
                        length: h.length,
                        flags: ZeroFlags {
                            no_hole: h.flags & cmd_flags::NO_HOLE != 0,
                            fast,
                            fua,
                        },
                    }
                }
            })
        }
        cmd::BLOCK_STATUS => {
            if let Some(v) = only(cmd_flags::REQ_ONE | cmd_flags::PAYLOAD_LEN, "BLOCK_STATUS") {
                return v;
            }
            if s.meta_contexts == 0 {
                return skip_or_close(
                    errno::EINVAL,
                    "BLOCK_STATUS without a negotiated metadata context".into(),
                );
            }
            let req_one = h.flags & cmd_flags::REQ_ONE != 0;
            if payload_flag {
                // Effect length (8 bytes) plus at least one 4-byte context id.
                if payload < 12 || payload % 4 != 0 || payload > 8 + 4 * s.meta_contexts as u64 {
                    return skip_or_close(
                        errno::EINVAL,
                        format!("BLOCK_STATUS payload of {payload} bytes is malformed"),
                    );
                }
                return Verdict::Run(Command::BlockStatusWithPayload {
                    offset: h.offset,
                    payload_len: payload as u32,
                    req_one,
                });
            }
            check_block_status_range(h.offset, h.length, req_one, s)
        }
        other => skip_or_close(errno::EINVAL, format!("unknown command {other}")),
    }
}

/// Range checks of a block-status request (shared by both request shapes).
pub fn check_block_status_range(
    offset: u64,
    length: u64,
    req_one: bool,
    s: &SessionLimits,
) -> Verdict {
    if length == 0 {
        return refuse(errno::EINVAL, "zero-length BLOCK_STATUS", 0);
    }
    if offset.checked_add(length).is_none_or(|e| e > s.size) {
        return refuse(
            errno::EINVAL,
            format!(
                "BLOCK_STATUS of {length} bytes at offset {offset} is beyond the end ({})",
                s.size
            ),
            0,
        );
    }
    let m = u64::from(s.minimum_block.max(1));
    if !offset.is_multiple_of(m) {
        return refuse(
            errno::EINVAL,
            format!("BLOCK_STATUS is not aligned to the minimum block size {m}"),
            0,
        );
    }
    Verdict::Run(Command::BlockStatus {
        offset,
        length,
        req_one,
    })
}

/// Decodes a block-status payload: the effect length and the selected context ids.
/// Ids must be ones the session negotiated; duplicates are ignored.
pub fn parse_block_status_payload(
    payload: &[u8],
    meta_contexts: usize,
) -> Result<(u64, Vec<u32>), String> {
    if payload.len() < 12 || !(payload.len() - 8).is_multiple_of(4) {
        return Err(format!(
            "BLOCK_STATUS payload of {} bytes is malformed",
            payload.len()
        ));
    }
    let mut effect = [0u8; 8];
    effect.copy_from_slice(&payload[..8]);
    let mut ids: Vec<u32> = Vec::new();
    for raw in payload[8..].chunks_exact(4) {
        let id = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if id as usize >= meta_contexts {
            return Err(format!(
                "BLOCK_STATUS payload names unknown context id {id}"
            ));
        }
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok((u64::from_be_bytes(effect), ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            size: 1 << 20,
            minimum_block: 512,
            maximum_payload: 1 << 16,
            capabilities: Capabilities {
                read_only: false,
                flush: true,
                fua: true,
                trim: true,
                write_zeroes: true,
                fast_zero: true,
                cache: true,
                multi_conn: true,
                rotational: false,
            },
            mode: ReplyMode::Structured,
            meta_contexts: 1,
            shutting_down: false,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    fn errno_of(v: Verdict) -> u32 {
        match v {
            Verdict::Refuse { errno, .. } => errno,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn read_past_the_end_is_einval() {
        assert_eq!(
            errno_of(check(&req(cmd::READ, 0, (1 << 20) - 512, 1024), &limits())),
            errno::EINVAL
        );
    }

    #[test]
    fn read_with_offset_overflowing_u64_is_einval() {
        assert_eq!(
            errno_of(check(&req(cmd::READ, 0, u64::MAX, 512), &limits())),
            errno::EINVAL
        );
    }

    #[test]
    fn misaligned_read_is_einval() {
        assert_eq!(
            errno_of(check(&req(cmd::READ, 0, 1, 512), &limits())),
            errno::EINVAL
        );
    }

    #[test]
    fn write_past_the_end_is_enospc_and_skips_the_payload() {
        let v = check(&req(cmd::WRITE, 0, 1 << 20, 512), &limits());
        assert_eq!(
            v,
            Verdict::Refuse {
                errno: errno::ENOSPC,
                reason: v_reason(&v),
                skip: 512
            }
        );
    }

    fn v_reason(v: &Verdict) -> String {
        match v {
            Verdict::Refuse { reason, .. } => reason.clone(),
            _ => String::new(),
        }
    }

    #[test]
    fn write_on_read_only_export_is_eperm() {
        let mut l = limits();
        l.capabilities.read_only = true;
        assert_eq!(
            errno_of(check(&req(cmd::WRITE, 0, 0, 512), &l)),
            errno::EPERM
        );
    }

    #[test]
    fn oversized_read_is_refused_without_payload_to_skip() {
        let v = check(&req(cmd::READ, 0, 0, 1 << 17), &limits());
        assert!(
            matches!(
                v,
                Verdict::Refuse {
                    errno: errno::EINVAL,
                    skip: 0,
                    ..
                }
            ),
            "{v:?}"
        );
    }

    #[test]
    fn oversized_df_read_is_eoverflow() {
        assert_eq!(
            errno_of(check(&req(cmd::READ, cmd_flags::DF, 0, 1 << 17), &limits())),
            errno::EOVERFLOW
        );
    }

    #[test]
    fn huge_extended_write_payload_closes_the_connection() {
        let mut l = limits();
        l.mode = ReplyMode::Extended;
        let v = check(&req(cmd::WRITE, 0, 0, 1 << 40), &l);
        assert!(matches!(v, Verdict::Disconnect(_)), "{v:?}");
    }

    #[test]
    fn huge_write_to_a_read_only_export_with_a_huge_max_payload_closes_instead_of_skipping() {
        let mut l = limits();
        l.capabilities.read_only = true;
        l.maximum_payload = u32::MAX;
        let v = check(&req(cmd::WRITE, 0, 0, 1 << 31), &l);
        assert!(matches!(v, Verdict::Disconnect(_)), "{v:?}");
    }

    #[test]
    fn unknown_command_is_einval() {
        assert_eq!(errno_of(check(&req(42, 0, 0, 0), &limits())), errno::EINVAL);
    }

    #[test]
    fn unknown_flag_is_einval() {
        assert_eq!(
            errno_of(check(&req(cmd::READ, 1 << 9, 0, 512), &limits())),
            errno::EINVAL
        );
    }

    #[test]
    fn req_one_on_read_is_einval() {
        assert_eq!(
            errno_of(check(
                &req(cmd::READ, cmd_flags::REQ_ONE, 0, 512),
                &limits()
            )),
            errno::EINVAL
        );
    }

    #[test]
    fn block_status_without_contexts_is_einval() {
        let mut l = limits();
        l.meta_contexts = 0;
        assert_eq!(
            errno_of(check(&req(cmd::BLOCK_STATUS, 0, 0, 512), &l)),
            errno::EINVAL
        );
    }

    #[test]
    fn every_request_but_disc_gets_eshutdown_while_shutting_down() {
        let mut l = limits();
        l.shutting_down = true;
        assert_eq!(
            errno_of(check(&req(cmd::READ, 0, 0, 512), &l)),
            errno::ESHUTDOWN
        );
        assert_eq!(
            check(&req(cmd::DISC, 0, 0, 0), &l),
            Verdict::Run(Command::Disconnect)
        );
    }

    #[test]
    fn fast_zero_is_passed_to_the_export() {
        let v = check(
            &req(
                cmd::WRITE_ZEROES,
                cmd_flags::FAST_ZERO | cmd_flags::NO_HOLE,
                0,
                4096,
            ),
            &limits(),
        );
        assert_eq!(
            v,
            Verdict::Run(Command::WriteZeroes {
                offset: 0,
                length: 4096,
                flags: ZeroFlags {
                    no_hole: true,
                    fast: true,
                    fua: false
                }
            })
        );
    }

    #[test]
    fn block_status_payload_with_unknown_id_is_refused() {
        let mut p = 4096u64.to_be_bytes().to_vec();
        p.extend_from_slice(&5u32.to_be_bytes());
        assert!(parse_block_status_payload(&p, 1).is_err());
    }
}
