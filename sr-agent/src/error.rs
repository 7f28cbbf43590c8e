//! The agent's one error type: a stable code (SMAPIv3 style, for scripts) with a
//! message for people, and the exit status each code has.

use serde::Serialize;

/// What went wrong, as scripts see it. Each code has a stable exit status
/// ([`Code::exit_status`]), documented in `docs/sr-agent.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    /// Anything else: I/O errors, damaged metadata.
    SrBackendFailure,
    /// A bad argument: a size, a shrink, a name.
    InvalidArgument,
    SrNotFound,
    VdiNotFound,
    /// The operation does not apply to a template.
    VdiIsTemplate,
    /// Other VDIs are built on it.
    VdiInUse,
    SrNotEmpty,
    /// The file system is full.
    SrFull,
    /// The template cannot be opened or read.
    TemplateUnreachable,
    /// An SR (or other files) already exists where one was to be created.
    SrExists,
    /// A writing operation on a read-only VDI (a snapshot).
    VdiReadOnly,
    /// The operation was cancelled (Ctrl-C or `task cancel`); nothing it made is left.
    Cancelled,
    /// No task with that id.
    TaskNotFound,
    /// A kernel block device cannot be attached on this host.
    DeviceUnavailable,
}

impl Code {
    /// The process exit status for this code.
    pub fn exit_status(self) -> u8 {
        match self {
            Code::SrBackendFailure => 1,
            Code::InvalidArgument => 2,
            Code::SrNotFound => 10,
            Code::VdiNotFound => 11,
            Code::VdiIsTemplate => 12,
            Code::VdiInUse => 13,
            Code::SrNotEmpty => 14,
            Code::SrFull => 15,
            Code::TemplateUnreachable => 16,
            Code::SrExists => 17,
            Code::VdiReadOnly => 18,
            Code::Cancelled => 19,
            Code::TaskNotFound => 20,
            Code::DeviceUnavailable => 21,
        }
    }

    /// Every code, in exit-status order (for the man pages).
    pub const ALL: [Code; 14] = [
        Code::SrBackendFailure,
        Code::InvalidArgument,
        Code::SrNotFound,
        Code::VdiNotFound,
        Code::VdiIsTemplate,
        Code::VdiInUse,
        Code::SrNotEmpty,
        Code::SrFull,
        Code::TemplateUnreachable,
        Code::SrExists,
        Code::VdiReadOnly,
        Code::Cancelled,
        Code::TaskNotFound,
        Code::DeviceUnavailable,
    ];

    /// When the code is used, for people.
    pub fn meaning(self) -> &'static str {
        match self {
            Code::SrBackendFailure => "anything else: an I/O error, damaged metadata",
            Code::InvalidArgument => "a usage error, a bad size, a shrink",
            Code::SrNotFound => "no SR at that path or with that UUID",
            Code::VdiNotFound => "no VDI with that UUID in the SR",
            Code::VdiIsTemplate => "the operation does not apply to a template",
            Code::VdiInUse => "other VDIs are built on it, or it is attached",
            Code::SrNotEmpty => "sr destroy of an SR that holds disks or snapshots",
            Code::SrFull => "the file system is full",
            Code::TemplateUnreachable => "the template cannot be opened or read",
            Code::SrExists => "an SR (or other files) is already where one was to be made",
            Code::VdiReadOnly => "a writing operation on a snapshot",
            Code::Cancelled => "cancelled (Ctrl-C or task cancel); nothing it made is left",
            Code::TaskNotFound => "no task with that id",
            Code::DeviceUnavailable => {
                "vdi attach --device on a host without the kernel's nbd driver, a free /dev/nbdN or nbd-client"
            }
        }
    }

    /// The code printed as `text`.
    pub fn parse(text: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == text)
    }

    /// The code as it is printed (`VDI_IS_TEMPLATE`).
    pub fn as_str(self) -> &'static str {
        match self {
            Code::SrBackendFailure => "SR_BACKEND_FAILURE",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::SrNotFound => "SR_NOT_FOUND",
            Code::VdiNotFound => "VDI_NOT_FOUND",
            Code::VdiIsTemplate => "VDI_IS_TEMPLATE",
            Code::VdiInUse => "VDI_IN_USE",
            Code::SrNotEmpty => "SR_NOT_EMPTY",
            Code::SrFull => "SR_FULL",
            Code::TemplateUnreachable => "TEMPLATE_UNREACHABLE",
            Code::SrExists => "SR_EXISTS",
            Code::VdiReadOnly => "VDI_READ_ONLY",
            Code::Cancelled => "CANCELLED",
            Code::TaskNotFound => "TASK_NOT_FOUND",
            Code::DeviceUnavailable => "DEVICE_UNAVAILABLE",
        }
    }
}

/// An agent error: its code and a message naming the object and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub code: Code,
    pub message: String,
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    /// An I/O error during `what` (which names the file): `SR_FULL` when the file
    /// system is full, `SR_BACKEND_FAILURE` otherwise.
    pub fn io(what: impl std::fmt::Display, e: &std::io::Error) -> Error {
        use rustix::io::Errno;
        let code = match Errno::from_io_error(e) {
            Some(Errno::NOSPC | Errno::DQUOT) => Code::SrFull,
            _ => Code::SrBackendFailure,
        };
        Error::new(code, format!("{what}: {e}"))
    }

    /// An error of the format library while working on `what`.
    pub fn format(what: impl std::fmt::Display, e: &thinline_format::Error) -> Error {
        match e {
            thinline_format::Error::Io { source, .. } => Error::io(what, source),
            _ => Error::new(Code::SrBackendFailure, format!("{what}: {}", e.detail())),
        }
    }
}

/// `Result` with the agent's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
