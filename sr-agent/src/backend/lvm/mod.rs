//! The LVM SR's building blocks (the backend itself is being built on them): an SR is
//! a volume group; the agent creates a metadata LV (`MGT`, written as [`mgt`] says),
//! and the pool's metadata and data LVs, on which it drives a dm-thin pool itself
//! ([`pool`]: lvm2 cannot take the template's NBD device as an external origin);
//! every lvm2 command runs as [`command`] says, limited to the SR's devices, and every
//! LV it creates carries the SR's tag. See `docs/lvm-sr.md`.

pub mod command;
pub mod mgt;
pub mod pool;
