//! Storage repositories (SRs) and virtual disks (VDIs): the model orchestrators drive
//! through `thinline sr …` and `thinline vdi …`, the metadata that records it, and the
//! backends that hold the volumes.
//!
//! Layers, bottom up: [`store`] owns an SR's metadata file, its lock and the journal
//! that makes multi-step operations crash-safe; [`backend`] is what an SR's volumes
//! live on ([`crate::backend::file`], a directory of qcow2 files, is the first implementation; LVM
//! thin pools come next); [`sr`] and [`vdi`] are the operations, one function per
//! command, each taking an options struct. [`template`] opens a template URI once to
//! learn its format and size. See `docs/sr-agent.md` for the command contract.

pub mod backend;
pub mod cached;
mod crash;
pub mod daemon;
pub mod device;
pub mod error;
pub mod lockfile;
pub mod model;
pub mod naming;
pub mod pausable;
pub mod registry;
pub mod sample;
pub mod sr;
pub mod store;
pub mod task;
pub mod template;
pub mod vdi;

pub use error::{Code, Error, Result};
pub use model::{SrView, VdiType, VdiView};
