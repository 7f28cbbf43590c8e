//! The two halves of systemd's service protocol that `serve` and `proxy` speak: socket
//! activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`: listening sockets passed
//! from fd 3 on, as `sd_listen_fds(3)` describes) and readiness notification
//! (`NOTIFY_SOCKET`: `READY=1` once serving, `STOPPING=1` when shutting down, as
//! `sd_notify(3)` describes). Both are no-ops for a process systemd did not start.
//!
//! The variables are left in the environment: a child's pid never matches `LISTEN_PID`,
//! so it takes no socket, and removing them would need a single-threaded process.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, bail};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// A listening socket systemd passed, with its name (`FileDescriptorName=`; systemd
/// says `unknown` when the unit sets none).
#[derive(Debug)]
pub struct Passed {
    pub name: String,
    pub socket: PassedSocket,
}

/// What a passed socket is.
#[derive(Debug)]
pub enum PassedSocket {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

/// The listening sockets passed to this process, in order; none unless `LISTEN_PID`
/// is this process. A passed fd that is not a listening stream socket (unix or TCP) is
/// an error naming it.
pub fn listen_fds() -> anyhow::Result<Vec<Passed>> {
    let var = |name: &str| std::env::var(name).ok();
    let Some(count) = passed_count(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(Vec::new());
    };
    let names = fd_names(var("LISTEN_FDNAMES").as_deref(), count);
    let mut passed = Vec::with_capacity(count);
    for (i, name) in names.into_iter().enumerate() {
        let fd = FIRST_FD + i as RawFd;
        let socket =
            adopt(fd).with_context(|| format!("socket {name:?} (fd {fd}) passed by systemd"))?;
        passed.push(Passed { name, socket });
    }
    Ok(passed)
}

/// How many fds were passed: `None` when `LISTEN_PID` is unset or another process's.
fn passed_count(pid: Option<&str>, fds: Option<&str>, me: u32) -> anyhow::Result<Option<usize>> {
    let Some(pid) = pid else { return Ok(None) };
    if pid.trim().parse::<u32>().ok() != Some(me) {
        return Ok(None);
    }
    let fds = fds.unwrap_or("0");
    match fds.trim().parse::<usize>() {
        Ok(n) if n <= 1024 => Ok(Some(n)),
        _ => bail!("LISTEN_FDS={fds:?} is not a count of passed sockets"),
    }
}

/// The names of `count` passed fds: `LISTEN_FDNAMES` split at colons, `unknown` for
/// each one it does not name.
fn fd_names(names: Option<&str>, count: usize) -> Vec<String> {
    let mut given = names.unwrap_or("").split(':').map(str::to_owned);
    (0..count)
        .map(|_| {
            given
                .next()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "unknown".into())
        })
        .collect()
}

/// Takes ownership of passed fd `fd`, checked to be a listening stream socket of the
/// unix or an inet family, and made close-on-exec.
fn adopt(fd: RawFd) -> anyhow::Result<PassedSocket> {
    let int_option = |level, name| -> std::io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes of a c_int and its length; a
        // bad fd is reported as an error (EBADF, ENOTSOCK), never undefined behaviour.
        let r = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
        if r == 0 {
            Ok(value)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let kind = int_option(libc::SOL_SOCKET, libc::SO_TYPE).context("not a socket")?;
    let listening = int_option(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)?;
    let domain = int_option(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if kind != libc::SOCK_STREAM || listening == 0 {
        bail!("not a listening stream socket (set ListenStream= in the .socket unit)");
    }
    // SAFETY: F_SETFD on an fd checked above to be an open socket.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot make it close-on-exec");
    }
    // SAFETY: systemd passed this fd to this process (LISTEN_PID) for it to own; it is
    // an open socket (checked above) and nothing else in the process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match domain {
        libc::AF_UNIX => Ok(PassedSocket::Unix(owned.into())),
        libc::AF_INET | libc::AF_INET6 => Ok(PassedSocket::Tcp(owned.into())),
        other => bail!("a socket of address family {other}: only unix and TCP sockets are served"),
    }
}

/// Tells the service manager `state` (`READY=1`, `STOPPING=1`, …) if it asked to be
/// told (`NOTIFY_SOCKET`); a failure is logged, never fatal.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&target, state) {
        tracing::warn!(socket = ?target, error = %e, "cannot notify the service manager");
    }
}

/// Waits for `shutdown`, then tells the service manager the service is stopping.
pub async fn notify_stopping(shutdown: impl std::future::Future<Output = ()>) {
    shutdown.await;
    notify("STOPPING=1");
}

fn send(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = target.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name)?
        }
        None => SocketAddr::from_pathname(std::path::Path::new(target))?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_taken_only_when_listen_pid_is_this_process() {
        assert_eq!(passed_count(None, Some("2"), 7).unwrap(), None);
        assert_eq!(passed_count(Some("8"), Some("2"), 7).unwrap(), None);
        assert_eq!(passed_count(Some("7"), Some("2"), 7).unwrap(), Some(2));
        assert_eq!(passed_count(Some("7"), None, 7).unwrap(), Some(0));
        assert!(passed_count(Some("7"), Some("two"), 7).is_err());
        assert!(passed_count(Some("7"), Some("100000"), 7).is_err());
    }

    #[test]
    fn fd_names_come_from_listen_fdnames_and_missing_ones_are_unknown() {
        assert_eq!(fd_names(Some("nbd:status"), 2), ["nbd", "status"]);
        assert_eq!(fd_names(Some("nbd"), 2), ["nbd", "unknown"]);
        assert_eq!(fd_names(None, 1), ["unknown"]);
        assert_eq!(fd_names(Some("a::c:d"), 3), ["a", "unknown", "c"]);
    }

    #[test]
    fn notify_sends_the_state_as_one_datagram_to_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
