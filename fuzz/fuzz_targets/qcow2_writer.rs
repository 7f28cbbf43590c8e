//! Fuzzes the qcow2 writer: an input is a small image geometry and a sequence of
//! writes, zeroes, discards, flushes and resizes. Every read must match a byte model,
//! and after a final flush the image's own check must find no error and no leak.
#![no_main]

use std::path::PathBuf;

use thinline_format::qcow2::{self, CreateOptions, ZeroMode};
use thinline_format::{Format, Image, OpenOptions};

const SIZE: u64 = 256 << 10;
const BACKING: u64 = 192 << 10;

fn dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("thinline-fuzz-writer-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&config, mut ops)) = data.split_first() else {
        return;
    };
    let cluster_size = [512u64, 4096, 16384, 65536][usize::from(config & 3)];
    let extended = config & 4 != 0 && cluster_size >= 16384;
    let backed = config & 8 != 0;
    let d = dir();
    let image_path = d.join("top.qcow2");
    let base_path = d.join("base.raw");
    let _ = std::fs::remove_file(&image_path);
    let mut model = vec![0u8; SIZE as usize];
    if backed {
        let base: Vec<u8> = (0..BACKING).map(|i| (i * 31 % 253) as u8 + 1).collect();
        std::fs::write(&base_path, &base).unwrap();
        model[..BACKING as usize].copy_from_slice(&base);
    }
    qcow2::create(
        &image_path,
        &CreateOptions {
            size: SIZE,
            cluster_size,
            extended_l2: extended,
            backing: backed.then(|| (base_path.display().to_string(), Format::Raw)),
        },
    )
    .unwrap();
    let (image, writer) = Image::open_writable(&image_path, &OpenOptions::default()).unwrap();
    let mut size = SIZE;
    let granule = if extended { cluster_size / 32 } else { cluster_size };
    while ops.len() >= 6 {
        let (op, rest) = ops.split_at(6);
        ops = rest;
        let off = u64::from(u32::from_le_bytes([op[1], op[2], op[3], 0])) % size;
        let len = 1 + u64::from(u16::from_le_bytes([op[4], op[5]])) * 7 % (size - off);
        let (lo, hi) = (off as usize, (off + len) as usize);
        match op[0] % 8 {
            0..=2 => {
                let bytes: Vec<u8> = (0..len).map(|i| (i as u8) ^ op[0] ^ op[5]).collect();
                let fua = op[0] & 0x80 != 0;
                // Some writes first try the path without I/O, as the NBD export does.
                let done = op[0] & 0x20 != 0
                    && !fua
                    && match writer.try_write(off, &bytes) {
                        Ok(()) => true,
                        Err(thinline_format::Error::NotCached) => false,
                        Err(e) => panic!("try_write at {off}+{len}: {e}"),
                    };
                if !done {
                    writer.write(&image, off, &bytes, fua).unwrap();
                }
                model[lo..hi].copy_from_slice(&bytes);
            }
            3 | 4 => {
                let mode = ZeroMode {
                    no_hole: op[0] & 0x40 != 0,
                    ..ZeroMode::default()
                };
                writer.write_zeroes(&image, off, len, mode, false).unwrap();
                model[lo..hi].fill(0);
            }
            5 => {
                let mode = ZeroMode {
                    trim: true,
                    ..ZeroMode::default()
                };
                writer.write_zeroes(&image, off, len, mode, false).unwrap();
                let first = off.div_ceil(granule) * granule;
                let end = off + len;
                let last = if end == size { end } else { end / granule * granule };
                if last > first {
                    model[first as usize..last as usize].fill(0);
                }
            }
            6 => writer.flush().unwrap(),
            _ => {
                // Grow by up to 64 KiB: the new tail reads as zeroes, even over the backing.
                let new = size + u64::from(op[5]) * 256;
                writer.resize(&image, new).unwrap();
                model.resize(new as usize, 0);
                size = new;
            }
        }
        let mut buf = vec![0u8; len as usize];
        image.read(off, &mut buf).unwrap();
        assert!(buf == model[lo..hi], "read back at {off}+{len} differs");
    }
    assert_eq!(image.size(), size);
    let mut all = vec![0u8; size as usize];
    image.read(0, &mut all).unwrap();
    assert!(all == model, "the image differs from the model");
    writer.flush().unwrap();
    drop(image);
    drop(writer);
    let image = Image::open(&image_path, &OpenOptions::default()).unwrap();
    let report = image.check().remove(0).1.unwrap();
    assert!(
        report.errors.is_empty() && report.warnings.is_empty(),
        "check after a clean flush: {report:?}"
    );
    let mut again = vec![0u8; size as usize];
    image.read(0, &mut again).unwrap();
    assert!(again == model, "the reopened image differs from the model");
});
