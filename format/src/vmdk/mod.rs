//! The vmdk format (being written).

use std::sync::Arc;

use crate::layer::{Layer, OpenContext};
use crate::storage::Storage;
use crate::{Error, Result};

/// Opens a vmdk image.
pub fn open(storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn Layer>> {
    Err(Error::unsupported(
        storage.name(),
        "vmdk",
        "not implemented yet",
    ))
}
