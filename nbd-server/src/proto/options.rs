//! Option data (client → server) and option replies (server → client): the server's
//! decoders and encoders, and the client's option reply decoders.

use std::fmt;

use super::InvalidReply;
use super::{
    IHAVEOPT, MAX_STRING_LEN, OPTION_REPLY_MAGIC, be_u16, be_u32, be_u64, info, len_u32, opt,
    option_name, put_string,
};

/// Why an option's data was refused (`NBD_REP_ERR_INVALID` with this message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub String);

impl fmt::Display for InvalidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (`""` is the default export).
    pub name: String,
    /// Requested `NBD_INFO_*` items, in the client's order.
    pub items: Vec<u16>,
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries (context names or namespace wildcards like `base:`).
    pub queries: Vec<String>,
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME` with the export's name.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Any option this server does not implement (answered `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

/// Decodes an option's data. An `Err` is answered with `NBD_REP_ERR_INVALID`; the
/// session stays in sync because the caller has already consumed exactly `data`.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    let no_data = |o: ClientOption, name: &str| {
        if data.is_empty() {
            Ok(o)
        } else {
            Err(InvalidOption(format!("{name} takes no data")))
        }
    };
    match option {
        opt::EXPORT_NAME => {
            // EXPORT_NAME cannot be answered with an error: the caller disconnects.
            Ok(ClientOption::ExportName(parse_string(data, "export name")?))
        }
        // ABORT with data is still an abort (the spec asks servers to ACK it anyway).
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => no_data(ClientOption::List, "NBD_OPT_LIST"),
        opt::STARTTLS => no_data(ClientOption::StartTls, "NBD_OPT_STARTTLS"),
        opt::INFO => Ok(ClientOption::Info(parse_info_request(data)?)),
        opt::GO => Ok(ClientOption::Go(parse_info_request(data)?)),
        opt::STRUCTURED_REPLY => no_data(ClientOption::StructuredReply, "NBD_OPT_STRUCTURED_REPLY"),
        opt::LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta_request(data)?)),
        opt::SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta_request(data)?)),
        opt::EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders, "NBD_OPT_EXTENDED_HEADERS"),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// A cursor over option data that turns every short read into a clear refusal.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], InvalidOption> {
        if self.data.len() < n {
            return Err(InvalidOption(format!(
                "option data ends inside the {what} ({} of {n} bytes left)",
                self.data.len()
            )));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u16(&mut self, what: &str) -> Result<u16, InvalidOption> {
        let b = self.take(2, what)?;
        Ok(be_u16(b))
    }

    fn u32(&mut self, what: &str) -> Result<u32, InvalidOption> {
        let b = self.take(4, what)?;
        Ok(be_u32(b))
    }

    /// A 32-bit length followed by that many bytes of UTF-8.
    fn string(&mut self, what: &str) -> Result<String, InvalidOption> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING_LEN {
            return Err(InvalidOption(format!(
                "{what} is {len} bytes, longer than {MAX_STRING_LEN}"
            )));
        }
        let bytes = self.take(len, what)?;
        parse_string(bytes, what)
    }

    fn finish(&self, what: &str) -> Result<(), InvalidOption> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(InvalidOption(format!(
                "{} unexpected bytes after the {what}",
                self.data.len()
            )))
        }
    }
}

fn parse_string(bytes: &[u8], what: &str) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(InvalidOption(format!(
            "{what} is {} bytes, longer than {MAX_STRING_LEN}",
            bytes.len()
        )));
    }
    if bytes.contains(&0) {
        return Err(InvalidOption(format!("{what} contains a NUL byte")));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| InvalidOption(format!("{what} is not UTF-8")))
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let mut c = Cursor { data };
    let name = c.string("export name")?;
    let count = c.u16("information request count")?;
    let mut items = Vec::with_capacity(usize::from(count).min(c.data.len() / 2));
    for _ in 0..count {
        items.push(c.u16("information request list")?);
    }
    c.finish("information request list")?;
    Ok(InfoRequest { name, items })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, InvalidOption> {
    let mut c = Cursor { data };
    let export = c.string("export name")?;
    let count = c.u32("query count")?;
    // Every query takes at least 4 bytes, which bounds the allocation by the data size.
    let mut queries = Vec::with_capacity((count as usize).min(c.data.len() / 4));
    for _ in 0..count {
        queries.push(c.string("meta context query")?);
    }
    c.finish("meta context queries")?;
    Ok(MetaContextRequest { export, queries })
}

/// Appends an option reply (`magic, option, type, length, data`).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of an `NBD_REP_INFO` carrying `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&info::EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// Data of an `NBD_REP_INFO` carrying `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_string(item: u16, text: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + text.len());
    d.extend_from_slice(&item.to_be_bytes());
    d.extend_from_slice(text.as_bytes());
    d
}

/// Data of an `NBD_REP_INFO` carrying `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&minimum.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&maximum.to_be_bytes());
    d
}

/// Data of an `NBD_REP_SERVER` (one export in a list).
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    put_string(&mut d, name);
    d
}

/// Data of an `NBD_REP_META_CONTEXT`.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

// The client's side: option requests out, option replies in.

/// Length of an option reply header (`magic, option, type, length`).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Largest option reply data the client accepts (INFO items, contexts and messages are
/// far smaller).
pub const MAX_OPTION_REPLY_LEN: u32 = 64 * 1024;

/// Length of the server's reply to `NBD_OPT_EXPORT_NAME` without the 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;

/// Appends a client option (`IHAVEOPT, option, length, data`).
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of `NBD_OPT_INFO` or `NBD_OPT_GO`: the export name and the `NBD_INFO_*` items asked for.
pub fn info_request(export: &str, items: &[u16]) -> Vec<u8> {
    let mut d = Vec::with_capacity(6 + export.len() + 2 * items.len());
    put_string(&mut d, export);
    let count = u16::try_from(items.len()).expect("a handful of info items");
    d.extend_from_slice(&count.to_be_bytes());
    for item in items {
        d.extend_from_slice(&item.to_be_bytes());
    }
    d
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
pub fn meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    put_string(&mut d, export);
    d.extend_from_slice(&len_u32(queries.len()).to_be_bytes());
    for query in queries {
        put_string(&mut d, query);
    }
    d
}

/// The header of an option reply, checked against the option it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Length of the data that follows, at most [`MAX_OPTION_REPLY_LEN`].
    pub length: u32,
}

/// Decodes the header of the reply to `option`: the magic, the echoed option, and a data
/// length the caller may allocate.
pub fn decode_option_reply_header(
    head: &[u8; OPTION_REPLY_HEADER_LEN],
    option: u32,
) -> Result<OptionReplyHeader, InvalidReply> {
    let during = format!("the reply to {}", option_name(option));
    let magic = be_u64(&head[0..8]);
    let echoed = be_u32(&head[8..12]);
    let reply_type = be_u32(&head[12..16]);
    let length = be_u32(&head[16..20]);
    if magic != OPTION_REPLY_MAGIC {
        return Err(InvalidReply(format!(
            "bad option reply magic {magic:#018x} in {during}"
        )));
    }
    if echoed != option {
        return Err(InvalidReply(format!(
            "{during} names {} instead",
            option_name(echoed)
        )));
    }
    if length > MAX_OPTION_REPLY_LEN {
        return Err(InvalidReply(format!(
            "{during} carries {length} bytes (more than {MAX_OPTION_REPLY_LEN})"
        )));
    }
    Ok(OptionReplyHeader { reply_type, length })
}

/// An `NBD_REP_INFO` item, decoded as far as the client uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// The export's size in bytes.
        size: u64,
        /// `NBD_FLAG_*`.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`, not yet checked for consistency.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Largest payload.
        maximum: u32,
    },
    /// Any other item (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`, unknown ones).
    Other(u16),
}

/// Decodes the data of an `NBD_REP_INFO`.
pub fn decode_info_reply(data: &[u8]) -> Result<InfoReply, InvalidReply> {
    if data.len() < 2 {
        return Err(InvalidReply("NBD_REP_INFO shorter than 2 bytes".into()));
    }
    match be_u16(data) {
        info::EXPORT => {
            if data.len() != 12 {
                return Err(InvalidReply(format!(
                    "NBD_INFO_EXPORT of {} bytes instead of 12",
                    data.len()
                )));
            }
            Ok(InfoReply::Export {
                size: be_u64(&data[2..10]),
                flags: be_u16(&data[10..12]),
            })
        }
        info::BLOCK_SIZE => {
            if data.len() != 14 {
                return Err(InvalidReply(format!(
                    "NBD_INFO_BLOCK_SIZE of {} bytes instead of 14",
                    data.len()
                )));
            }
            Ok(InfoReply::BlockSize {
                minimum: be_u32(&data[2..6]),
                preferred: be_u32(&data[6..10]),
                maximum: be_u32(&data[10..14]),
            })
        }
        other => Ok(InfoReply::Other(other)),
    }
}

/// Decodes the data of an `NBD_REP_META_CONTEXT`: the context id and its name.
pub fn decode_meta_context_reply(data: &[u8]) -> Result<(u32, &[u8]), InvalidReply> {
    if data.len() < 4 {
        return Err(InvalidReply(
            "NBD_REP_META_CONTEXT shorter than 4 bytes".into(),
        ));
    }
    Ok((be_u32(data), &data[4..]))
}

/// Decodes the server's reply to `NBD_OPT_EXPORT_NAME`: size and transmission flags.
pub fn decode_export_name_reply(data: &[u8; EXPORT_NAME_REPLY_LEN]) -> (u64, u16) {
    (be_u64(&data[0..8]), be_u16(&data[8..10]))
}
