//! Ports that cannot race.
//!
//! Picking a free port (bind port 0, read the number, close) and handing the number to a
//! server started later races with every other test running in parallel: another server
//! can take the port in between. Here the test process binds `127.0.0.1:0` itself and the
//! child inherits the listening socket as file descriptor 3, which is where both
//! conventions in use look for it:
//!
//! - systemd socket activation (`LISTEN_FDS=1`, `LISTEN_PID`): qemu-nbd, nbdkit
//!   ([`socket_activated`]);
//! - nginx's `NGINX="3;"` variable, werkzeug's `WERKZEUG_SERVER_FD=3` (moto): see
//!   [`crate::servers`].
//!
//! The port is known, and taken, before the child starts; connections made before the
//! child accepts wait in the socket's backlog instead of being refused.
//!
//! [`ClosedPort`] is the other use of a free port: an address where nothing listens,
//! held so that nothing can start listening there during the test.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The descriptor a child finds the inherited listening socket at.
pub const LISTEN_FD: RawFd = 3;

/// A listening TCP socket on a loopback port the kernel chose.
pub fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// Arranges for `cmd`'s child to get `listener` as descriptor [`LISTEN_FD`] (without
/// close-on-exec); the test's own copy keeps close-on-exec, so no other child inherits
/// it. `listener` must stay open until the child is spawned.
pub fn pass_listener(cmd: &mut Command, listener: &TcpListener) {
    let fd = listener.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec; it only calls dup2 and
    // fcntl (async-signal-safe) on descriptor numbers and allocates nothing.
    unsafe {
        cmd.pre_exec(move || move_to_listen_fd(fd));
    }
}

/// In a forked child: makes `fd` available as [`LISTEN_FD`] across exec.
fn move_to_listen_fd(fd: RawFd) -> io::Result<()> {
    if fd == LISTEN_FD {
        // SAFETY: fcntl on a descriptor number; a bad one is an error return.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    // SAFETY: dup2 on descriptor numbers; the new descriptor has no close-on-exec flag.
    } else if unsafe { libc::dup2(fd, LISTEN_FD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A command running `program` with `listener` passed by systemd socket activation
/// (`LISTEN_FDS=1`, and `LISTEN_PID` set to the program's pid by a shell that then execs
/// it). Add the program's arguments with `args`; it must not be told to bind anything.
pub fn socket_activated(program: &str, listener: &TcpListener) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"",
        program,
    ])
    .env("LISTEN_FDS", "1")
    .env_remove("LISTEN_FDNAMES");
    pass_listener(&mut cmd, listener);
    cmd
}

/// A loopback TCP port where nothing listens, reserved while this lives: a socket bound
/// to it but not listening, so connections to it are refused and no server can bind it.
#[derive(Debug)]
pub struct ClosedPort {
    _socket: OwnedFd,
    /// The port number.
    pub port: u16,
}

impl ClosedPort {
    /// Binds a socket to `127.0.0.1:0` without listening.
    pub fn new() -> ClosedPort {
        // SAFETY: socket(2) has no memory effects; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_in of `len` bytes.
        let r = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
        assert!(r == 0, "bind 127.0.0.1:0: {}", io::Error::last_os_error());
        // SAFETY: `addr` has room for `len` bytes, which getsockname may update.
        let r = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut len) };
        assert!(r == 0, "getsockname: {}", io::Error::last_os_error());
        ClosedPort {
            _socket: socket,
            port: u16::from_be(addr.sin_port),
        }
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}
