//! The LVM SR's building blocks (the backend itself is being built on them): an SR is
//! a volume group; the agent creates a metadata LV (`MGT`, written as [`mgt`] says),
//! and the pool's metadata and data LVs, on which it drives a dm-thin pool itself
//! ([`pool`]: lvm2 cannot take the template's NBD device as an external origin);
//! every lvm2 command runs as [`command`] says, limited to the SR's devices, and every
//! LV it creates carries the SR's tag; dmsetup as [`dm`] says. [`layout`] names the
//! SR's volumes, splits the VG between them, and makes and removes them. See
//! `docs/lvm-sr.md`.

pub mod attach;
pub mod command;
pub mod dm;
pub mod host;
pub mod layout;
pub mod mgt;
pub mod origin;
pub mod pivot;
pub mod pool;
pub mod space;
pub mod thin;

/// Runs `command` (shown as `shown` in errors); its stdout, or an error with what it
/// printed on stderr.
fn output_of(mut command: std::process::Command, shown: &str) -> crate::Result<String> {
    let tool = command.get_program().to_string_lossy().into_owned();
    let out = command
        .output()
        .map_err(|e| crate::Error::io(format!("cannot run {tool} (is it installed?)"), &e))?;
    if !out.status.success() {
        return Err(crate::Error::new(
            crate::Code::SrBackendFailure,
            format!(
                "{shown} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
