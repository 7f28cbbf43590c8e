//! Kernel block devices for attached VDIs (`vdi attach --device`): the kernel's nbd
//! client (`nbd-client`, and the `nbd` driver) connected to the VDI's socket, so
//! `/dev/nbdN` is the disk. The daemon's NBD server does the rest; this module only
//! finds a free device, connects it and, at detach, flushes and disconnects it.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Code, Error, Result};

const SYS_BLOCK: &str = "/sys/block";

fn unavailable(reason: impl Into<String>) -> Error {
    Error::new(Code::DeviceUnavailable, reason)
}

/// The nbd devices of this host, in number order.
fn nbd_devices() -> Vec<(u32, String)> {
    let mut found: Vec<(u32, String)> = std::fs::read_dir(SYS_BLOCK)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix("nbd")?.parse().ok()?;
            Some((n, name))
        })
        .collect();
    found.sort();
    found
}

/// Whether `device` is `/dev/nbdN`. Device paths come from the SR's metadata: nothing
/// else is ever opened, disconnected or answered as a VDI's device.
pub fn is_nbd(device: &Path) -> bool {
    device.parent() == Some(Path::new("/dev"))
        && device
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("nbd"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `device` (`/dev/nbdN`) is connected: the kernel gives it a size (and
/// nbd-client a pid).
pub fn connected(device: &Path) -> bool {
    let Some(name) = device.file_name() else {
        return false;
    };
    let sys = Path::new(SYS_BLOCK).join(name);
    let size = std::fs::read_to_string(sys.join("size")).unwrap_or_default();
    size.trim().parse::<u64>().unwrap_or(0) > 0 || sys.join("pid").exists()
}

/// Connects a free `/dev/nbdN` to the export `export` on the unix socket `socket`
/// and returns its path.
pub fn connect(socket: &Path, export: &str) -> Result<PathBuf> {
    if nbd_devices().is_empty() {
        // Loading the driver needs root; without it the error below says what to do.
        let _ = Command::new("modprobe").arg("nbd").output();
    }
    let devices = nbd_devices();
    if devices.is_empty() {
        return Err(unavailable(
            "this host's kernel has no nbd driver loaded (no /sys/block/nbd*; `modprobe nbd` as root)",
        ));
    }
    let mut last = String::from("every /dev/nbdN is in use");
    for (_, name) in &devices {
        let dev = Path::new("/dev").join(name);
        if connected(&dev) {
            continue;
        }
        let out = Command::new("nbd-client")
            .arg("-unix")
            .arg(socket)
            .arg(&dev)
            .args(["-N", export, "-b", "512", "-timeout", "60"])
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    unavailable("nbd-client is not installed (Debian: apt install nbd-client)")
                }
                _ => Error::io("cannot run nbd-client", &e),
            })?;
        if out.status.success() && wait_until(&dev, true) {
            return Ok(dev);
        }
        // Taken by another attach between the check and the connect: try the next.
        last = format!(
            "nbd-client could not connect {}: {}",
            dev.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Err(unavailable(last))
}

/// Flushes and disconnects `device`. Refused (`VDI_IN_USE`) while something holds it
/// open exclusively: a mounted file system, a device-mapper table, a VM.
pub fn disconnect(device: &Path) -> Result<()> {
    if !is_nbd(device) {
        return Err(Error::new(
            Code::SrBackendFailure,
            format!("{} is not an nbd device", device.display()),
        ));
    }
    if !connected(device) {
        return Ok(());
    }
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device);
    let held = match opened {
        Ok(file) => {
            file.sync_all()
                .map_err(|e| Error::io(format!("cannot flush {}", device.display()), &e))?;
            false
        }
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    };
    if held {
        return Err(Error::new(
            Code::VdiInUse,
            format!(
                "{} is in use (mounted, or held by a VM or a device-mapper table): release it first",
                device.display()
            ),
        ));
    }
    let out = Command::new("nbd-client")
        .arg("-d")
        .arg(device)
        .output()
        .map_err(|e| Error::io("cannot run nbd-client -d", &e))?;
    if !out.status.success() || !wait_until(device, false) {
        return Err(Error::new(
            Code::SrBackendFailure,
            format!(
                "nbd-client -d {} failed: {}",
                device.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Waits up to 30 s for `device` to be connected (or not); whether it became so.
fn wait_until(device: &Path, want: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if connected(device) == want {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_named_in_the_metadata_is_acted_on_only_if_it_is_dev_nbd_n() {
        for crafted in [
            "/dev/sda",
            "/tmp/nbd0",
            "/dev/nbd",
            "/dev/nbd0p1",
            "/dev/../dev/nbd0",
        ] {
            let e = disconnect(Path::new(crafted)).expect_err(crafted);
            assert!(e.message.contains("not an nbd device"), "{crafted}: {e}");
        }
    }
}
