//! The sample template `thinline quickstart` serves: a small qcow2 disk holding an MBR
//! partition table and one ext4 file system with a few files, made without root (the
//! file system by `mke2fs -d` at the partition's offset inside a plain file, then
//! copied into a qcow2 image by Thinline's own writer, zero clusters left out).

use std::io::Read;
use std::path::Path;
use std::process::Command;

use thinline_format::qcow2::{self, CreateOptions};
use thinline_format::{Image, OpenOptions};

use crate::{Code, Error, Result};

/// The sample disk's size.
pub const SIZE: u64 = 64 << 20;
/// Where its one partition starts (1 MiB, as partitioning tools align).
pub const PARTITION_START: u64 = 1 << 20;

/// The files the sample file system holds (path, content).
pub const FILES: [(&str, &str); 3] = [
    (
        "hello.txt",
        "Hello from Thinline: this disk is a thin clone of a template.\n",
    ),
    (
        "README",
        "Every block you did not write is read from the template; every block you write stays in this clone.\n",
    ),
    ("etc/motd", "Welcome to a Thinline sample disk.\n"),
];

/// A master boot record with one Linux partition from [`PARTITION_START`] to the end.
fn mbr() -> [u8; 512] {
    let mut b = [0u8; 512];
    let first = (PARTITION_START / 512) as u32;
    let sectors = ((SIZE - PARTITION_START) / 512) as u32;
    let e = &mut b[446..462];
    e[0] = 0x00; // not bootable
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: use the LBA fields
    e[4] = 0x83; // Linux
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&first.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    b[510] = 0x55;
    b[511] = 0xaa;
    b
}

/// Makes the sample template at `out` (a qcow2 image; replaced atomically).
pub fn build(out: &Path) -> Result<()> {
    let dir = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), &e))?;
    let work = tempfile::Builder::new()
        .prefix(".sample-")
        .tempdir_in(dir)
        .map_err(|e| Error::io(format!("cannot make a directory in {}", dir.display()), &e))?;
    let root = work.path().join("root");
    for (name, content) in FILES {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().expect("has a parent"))
            .and_then(|()| std::fs::write(&p, content))
            .map_err(|e| Error::io(format!("cannot write {}", p.display()), &e))?;
    }
    let raw = work.path().join("disk.raw");
    let io = |e: std::io::Error| Error::io(format!("cannot write {}", raw.display()), &e);
    let f = std::fs::File::create(&raw).map_err(io)?;
    f.set_len(SIZE).map_err(io)?;
    std::os::unix::fs::FileExt::write_all_at(&f, &mbr(), 0).map_err(io)?;
    drop(f);
    let fs_kib = (SIZE - PARTITION_START) / 1024;
    let made = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "thinline-sample", "-d"])
        .arg(&root)
        .arg("-E")
        .arg(format!("offset={PARTITION_START}"))
        .arg(&raw)
        .arg(format!("{fs_kib}k"))
        .output()
        .map_err(|e| Error::io("cannot run mke2fs (e2fsprogs)", &e))?;
    if !made.status.success() {
        return Err(Error::new(
            Code::SrBackendFailure,
            format!(
                "mke2fs failed ({}): {}",
                made.status,
                String::from_utf8_lossy(&made.stderr).trim()
            ),
        ));
    }
    // Copy into a qcow2 image, leaving zero clusters out.
    let tmp = work.path().join("sample.qcow2");
    let what = format!("cannot make {}", tmp.display());
    qcow2::create(
        &tmp,
        &CreateOptions {
            size: SIZE,
            ..CreateOptions::default()
        },
    )
    .map_err(|e| Error::format(&what, &e))?;
    let (image, writer) = Image::open_writable(&tmp, &OpenOptions::default())
        .map_err(|e| Error::format(&what, &e))?;
    let mut input = std::fs::File::open(&raw).map_err(io)?;
    let mut chunk = vec![0u8; 64 << 10];
    let mut offset = 0u64;
    while offset < SIZE {
        input.read_exact(&mut chunk).map_err(io)?;
        if chunk.iter().any(|&b| b != 0) {
            writer
                .write(&image, offset, &chunk, false)
                .map_err(|e| Error::format(&what, &e))?;
        }
        offset += chunk.len() as u64;
    }
    writer.flush().map_err(|e| Error::format(&what, &e))?;
    drop((image, writer));
    std::fs::rename(&tmp, out)
        .map_err(|e| Error::io(format!("cannot create {}", out.display()), &e))
}
