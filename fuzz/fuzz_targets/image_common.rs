//! Shared body of the per-format image targets: open the input as an image of one
//! format (backing and extent files resolve to the same bytes under other names, so
//! chains, loops and depth limits are exercised), then map, read and check it. Any
//! panic, hang or huge allocation is a bug; errors are fine.

use std::io;
use std::sync::Arc;

use thinline_format::{Error, Fetch, Format, Image, OpenOptions, Storage};

#[derive(Debug)]
struct FuzzStorage {
    name: String,
    data: Arc<Vec<u8>>,
}

impl Storage for FuzzStorage {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else { return Ok(0) };
        if start >= self.data.len() {
            return Ok(0);
        }
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        Ok(n)
    }
    fn open_related(&self, name: &str) -> thinline_format::Result<Arc<dyn Storage>> {
        if name.len() > 4096 || name.contains("missing") {
            return Err(Error::Open { path: name.to_owned(), source: io::ErrorKind::NotFound.into() });
        }
        Ok(Arc::new(FuzzStorage { name: name.to_owned(), data: self.data.clone() }))
    }
    fn identity(&self) -> String {
        self.name.clone()
    }
}

/// Runs one input as an image of `format`.
pub fn run(format: Format, data: &[u8]) {
    let storage: Arc<dyn Storage> = Arc::new(FuzzStorage { name: "image".into(), data: Arc::new(data.to_vec()) });
    let options = OpenOptions { format: Some(format), cache_budget: 1 << 20, ..OpenOptions::default() };
    let Ok(image) = Image::open_storage(storage, &options) else { return };
    let _ = image.info();
    let size = image.size();
    if size == 0 {
        return;
    }
    // Offsets derived from the input, plus the start and the end.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data.iter().take(4096) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let mut buf = vec![0u8; 128 << 10];
    let mut offsets = vec![0, size.saturating_sub(4096)];
    for i in 0..6u64 {
        offsets.push(h.rotate_left((i * 11) as u32) % size);
    }
    for (i, &offset) in offsets.iter().enumerate() {
        let len = ((h >> (i * 5)) % (buf.len() as u64) + 1).min(size - offset) as usize;
        let _ = image.read(offset, &mut buf[..len]);
        let _ = image.allocation(offset, (size - offset).min(1 << 30), Fetch::Allowed, 256);
        let mut extents = Vec::new();
        let _ = image.map(offset, len as u64, Fetch::CachedOnly, 64, &mut extents);
    }
    let _ = image.check();
}
