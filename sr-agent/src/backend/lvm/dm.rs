//! How the LVM SR runs dmsetup: in the C locale, with udev synchronisation where udev
//! runs and the device nodes made by dmsetup itself where it does not, and every
//! failure an error naming the command and what dmsetup said.

use std::process::Command;

use super::pool::{Message, PoolStatus, parse_pool_status};
use crate::Result;

/// dmsetup as the agent runs it.
#[derive(Debug, Clone, Copy)]
pub struct Dm {
    udev: bool,
}

impl Dm {
    /// `udev`: whether udev runs on this host (see [`udev_runs`]).
    pub fn new(udev: bool) -> Dm {
        Dm { udev }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("dmsetup");
        c.env("LC_ALL", "C");
        if !self.udev {
            c.arg("--noudevsync");
        }
        c.args(args);
        c
    }

    /// Runs `dmsetup ARGS…`; its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = super::output_of(self.command(args), &format!("dmsetup {}", args.join(" ")))?;
        if !self.udev && matches!(args.first(), Some(&"create" | &"remove" | &"rename")) {
            // Without udev, /dev/mapper follows only when told to.
            let _ = self.command(&["mknodes"]).output();
        }
        Ok(out)
    }

    /// Whether a device named `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        self.command(&["info", name])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Creates device `name` with `table` (active).
    pub fn create(&self, name: &str, table: &str) -> Result<()> {
        self.run(&["create", name, "--table", table]).map(drop)
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        self.run(&["remove", name]).map(drop)
    }

    pub fn suspend(&self, name: &str) -> Result<()> {
        self.run(&["suspend", name]).map(drop)
    }

    pub fn resume(&self, name: &str) -> Result<()> {
        self.run(&["resume", name]).map(drop)
    }

    /// Sends `message` to the pool `pool`.
    pub fn message(&self, pool: &str, message: Message) -> Result<()> {
        let text = message.text()?;
        self.run(&["message", pool, "0", &text]).map(drop)
    }

    /// The status of the pool `pool`.
    pub fn pool_status(&self, pool: &str) -> Result<PoolStatus> {
        parse_pool_status(self.run(&["status", pool])?.trim())
    }
}

/// Whether udev runs here (its control socket exists).
pub fn udev_runs() -> bool {
    std::path::Path::new("/run/udev/control").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn without_udev_dmsetup_does_not_wait_for_it() {
        assert_eq!(
            args(&Dm::new(false).command(&["info", "x"])),
            ["--noudevsync", "info", "x"]
        );
        assert_eq!(args(&Dm::new(true).command(&["info", "x"])), ["info", "x"]);
        let c = Dm::new(true).command(&["ls"]);
        let envs: Vec<_> = c.get_envs().collect();
        assert!(envs.contains(&(
            std::ffi::OsStr::new("LC_ALL"),
            Some(std::ffi::OsStr::new("C"))
        )));
    }
}
