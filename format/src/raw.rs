//! The raw format: the file is the disk. Allocation comes from the file's holes, which
//! the chain asks [`Storage::next_data`] about when it reports block status.

use std::sync::Arc;

use crate::Result;
use crate::layer::{Backing, CheckReport, Fetch, Format, Layer, LayerInfo, Segment, SegmentKind};
use crate::storage::Storage;

/// A raw image.
#[derive(Debug)]
pub struct RawLayer {
    files: [Arc<dyn Storage>; 1],
}

impl RawLayer {
    /// Serves `storage` byte for byte.
    pub fn open(storage: Arc<dyn Storage>) -> Self {
        RawLayer { files: [storage] }
    }
}

impl Layer for RawLayer {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.files[0].size()
    }

    fn files(&self) -> &[Arc<dyn Storage>] {
        &self.files
    }

    fn backing(&self) -> Option<&Backing> {
        None
    }

    fn info(&self) -> LayerInfo {
        LayerInfo {
            format: Format::Raw,
            subformat: None,
            path: self.files[0].name().to_owned(),
            virtual_size: self.virtual_size(),
            file_size: self.files[0].size(),
            cluster_size: None,
            features: Vec::new(),
            dirty: false,
            corrupt: false,
            details: Vec::new(),
        }
    }

    fn map(&self, offset: u64, length: u64, _fetch: Fetch, out: &mut Vec<Segment>) -> Result<()> {
        out.push(Segment {
            length,
            kind: SegmentKind::Data {
                file: 0,
                offset,
                raw: true,
            },
        });
        Ok(())
    }

    fn check(&self, _report: &mut CheckReport) -> Result<()> {
        Ok(())
    }
}
