use super::*;

fn options(size: u64, identity: &str) -> CacheOptions {
    CacheOptions {
        size,
        identity: identity.into(),
        chunk_size: DEFAULT_CHUNK_SIZE,
        on_mismatch: OnMismatch::Refuse,
        holder: "pid 1 (test)".into(),
        follow_device_links: false,
    }
}

fn discard(size: u64, identity: &str) -> CacheOptions {
    CacheOptions {
        on_mismatch: OnMismatch::Discard,
        ..options(size, identity)
    }
}

/// Log lines emitted (on this thread) while `f` runs.
fn logged<R>(f: impl FnOnce() -> R) -> (R, String) {
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let r = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned();
    (r, text)
}

/// Fills chunks `[first, end)` with `byte` the way the export does: data and
/// checksums, sync, then the bits.
fn fill(c: &CacheFile, first: u64, end: u64, byte: u8) {
    let mut sums = Vec::new();
    for i in first..end {
        let (off, len) = c.geometry.chunk_span(i);
        let data = vec![byte; len as usize];
        c.write_data(off, &data).unwrap();
        sums.push((i, crc32c::crc32c(&data)));
    }
    c.write_sums(&sums).unwrap();
    c.sync().unwrap();
    let mut pages = Vec::new();
    c.set_present(first, end, &mut pages);
    c.persist_pages(&pages).unwrap();
}

#[test]
fn superblocks_round_trip_and_reject_damage() {
    let sb = Superblock {
        generation: 7,
        size: 123,
        chunk_size: 65536,
        flags: FLAG_COMPLETE,
        identity: "http://x/t.raw etag \"1\"".into(),
        holder: "pid 9".into(),
    };
    let mut bytes = sb.encode();
    assert_eq!(Superblock::decode(&bytes).unwrap(), sb);
    bytes[100] ^= 1;
    assert!(matches!(
        Superblock::decode(&bytes).unwrap_err(),
        Invalid::Other(why) if why.contains("checksum")
    ));
}

#[test]
fn marks_survive_reopen_and_other_identities_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let size = 10 << 20;
    {
        let c = CacheFile::open(&path, &options(size, "v1")).unwrap();
        assert_eq!(c.chunks(), 160);
        let mut pages = Vec::new();
        c.set_present(3, 70, &mut pages);
        c.persist_pages(&pages).unwrap();
        assert_eq!(c.present_chunks(), 67);
        // A second owner is refused and told who holds it.
        let e = CacheFile::open(&path, &options(size, "v1")).unwrap_err();
        assert!(e.to_string().contains("pid 1 (test)"), "{e}");
    }
    let c = CacheFile::open(&path, &options(size, "v1")).unwrap();
    assert_eq!(c.present_chunks(), 67);
    assert!(c.is_present(3) && c.is_present(69) && !c.is_present(2) && !c.is_present(70));
    drop(c);
    let e = CacheFile::open(&path, &options(size, "v2")).unwrap_err();
    assert!(matches!(e, Error::IdentityMismatch { .. }), "{e}");
    let c = CacheFile::open(&path, &discard(size, "v2")).unwrap();
    assert_eq!(c.present_chunks(), 0);
    drop(c);
    // A cache of another size of the template is found too.
    let e = CacheFile::open(&path, &options(size + (5 << 20), "v3")).unwrap_err();
    assert!(matches!(e, Error::IdentityMismatch { .. }), "{e}");
    let c = CacheFile::open(&path, &discard(size + (5 << 20), "v3")).unwrap();
    assert_eq!(c.present_chunks(), 0);
}

#[test]
fn foreign_data_is_refused_in_both_mismatch_modes_and_left_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("short", 3 << 19), ("long", 3 << 20)] {
        let path = dir.path().join(name);
        std::fs::write(&path, vec![0xabu8; len]).unwrap();
        for o in [options(1 << 20, "v1"), discard(1 << 20, "v1")] {
            let e = CacheFile::open(&path, &o).unwrap_err();
            assert!(matches!(e, Error::NotACache { .. }), "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), vec![0xabu8; len]);
        }
    }
    // Data whose superblock slots happen to be zero is data too.
    let path = dir.path().join("zero-slots");
    let mut victim = vec![0xcdu8; 3 << 20];
    victim[1 << 20..(1 << 20) + 8192].fill(0);
    std::fs::write(&path, &victim).unwrap();
    let e = CacheFile::open(&path, &discard(1 << 20, "v1")).unwrap_err();
    assert!(matches!(e, Error::NotACache { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), victim);
    // A file of holes (a crash while creating a cache) is empty.
    let path = dir.path().join("holes");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    CacheFile::open(&path, &options(1 << 20, "v1")).unwrap();
}

#[test]
fn a_symlinked_cache_name_is_refused_and_its_target_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    let content = b"precious, and not a cache".repeat(1000);
    std::fs::write(&victim, &content).unwrap();
    let link = dir.path().join("c.cache");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let dangling = dir.path().join("d.cache");
    std::os::unix::fs::symlink(dir.path().join("new"), &dangling).unwrap();
    let device_links = |o: CacheOptions| CacheOptions {
        follow_device_links: true,
        ..o
    };
    for o in [
        options(1 << 20, "v1"),
        discard(1 << 20, "v1"),
        device_links(discard(1 << 20, "v1")),
    ] {
        for path in [&link, &dangling] {
            let e = CacheFile::open(path, &o).unwrap_err();
            assert!(
                matches!(e, Error::Symlink { .. }) || o.follow_device_links,
                "{e}"
            );
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), content);
        assert!(!dir.path().join("new").exists(), "created through a link");
    }
    let e = CacheFile::open_existing(&link, &ExistingOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Symlink { .. }), "{e}");
}

/// Rewrites both superblock slots as format `version`.
fn set_version(path: &Path, size: u64, version: u32) {
    let meta = Geometry::new(size, DEFAULT_CHUNK_SIZE).meta;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    for slot in 0..2 {
        let mut b = vec![0u8; SLOT as usize];
        f.read_exact_at(&mut b, meta + slot * SLOT).unwrap();
        if &b[..8] != MAGIC {
            continue;
        }
        b[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&b, meta + slot * SLOT).unwrap();
    }
}

#[test]
fn a_cache_of_the_old_format_is_discarded_with_a_log_line_and_a_newer_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let size = 4 << 20;
    {
        let c = CacheFile::open(&path, &options(size, "v1")).unwrap();
        fill(&c, 0, 10, 7);
    }
    set_version(&path, size, 1);
    let (c, log) = logged(|| CacheFile::open(&path, &options(size, "v1")));
    let c = c.unwrap();
    assert_eq!(c.present_chunks(), 0, "an unverifiable cache was reused");
    assert!(log.contains("older format (version 1"), "{log}");
    fill(&c, 0, 10, 7);
    drop(c);
    let before = std::fs::read(&path).unwrap();
    set_version(&path, size, VERSION + 1);
    let after = std::fs::read(&path).unwrap();
    let e = CacheFile::open(&path, &discard(size, "v1")).unwrap_err();
    assert!(e.to_string().contains("version 3 is unknown"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), after);
    assert_ne!(before, after);
}

#[test]
fn scrub_finds_scribbled_and_forged_chunks_and_repair_forgets_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let size = (4 << 20) + 1000;
    let g = Geometry::new(size, DEFAULT_CHUNK_SIZE);
    {
        let c = CacheFile::open(&path, &options(size, "v1")).unwrap();
        fill(&c, 0, g.chunks - 1, 0x11);
        assert!(c.scrub().unwrap().bad.is_empty());
        // The short last chunk, as zeroes (a punched hole).
        let last = g.chunks - 1;
        let (off, len) = g.chunk_span(last);
        c.write_zeroes(off, len).unwrap();
        c.write_sums(&[(last, c.zero_sum_of(last))]).unwrap();
        let mut pages = Vec::new();
        c.set_present(last, last + 1, &mut pages);
        c.persist_pages(&pages).unwrap();
        c.mark_complete().unwrap();
        let report = c.scrub().unwrap();
        assert_eq!((report.chunks, report.present), (g.chunks, g.chunks));
        assert!(report.bad.is_empty(), "{report:?}");
    }
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    // Bit rot in chunk 3; chunk 9's checksum forged (as a forged map bit would be).
    f.write_all_at(b"rot", 3 * DEFAULT_CHUNK_SIZE + 17).unwrap();
    f.write_all_at(&[0xff; 4], g.sums + 9 * 4).unwrap();
    drop(f);
    let open = |writable| {
        CacheFile::open_existing(
            &path,
            &ExistingOptions {
                writable,
                ..ExistingOptions::default()
            },
        )
        .unwrap()
    };
    let c = open(false);
    assert_eq!(c.size(), size, "the size is found from the file");
    assert_eq!(c.identity(), "v1");
    let report = c.scrub().unwrap();
    let bad = [(3, 3 * DEFAULT_CHUNK_SIZE), (9, 9 * DEFAULT_CHUNK_SIZE)];
    assert_eq!(report.bad, bad);
    // Only the owner's lock: a scrub of a cache in use is refused.
    let e = CacheFile::open(&path, &options(size, "v1")).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    drop(c);
    let c = open(true);
    c.clear_chunks(&[3, 9]).unwrap();
    assert!(!c.is_complete());
    drop(c);
    let c = open(false);
    let report = c.scrub().unwrap();
    assert!(report.bad.is_empty(), "{report:?}");
    assert_eq!(report.present, g.chunks - 2);
    assert!(!c.is_present(3) && !c.is_present(9) && c.is_present(4));
}

#[test]
fn first_reads_are_verified_once_and_bad_chunks_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let size = 2 << 20;
    {
        let c = CacheFile::open(&path, &options(size, "v1")).unwrap();
        fill(&c, 0, 8, 0x22);
        // Fetched by this process: verified without reading.
        assert!(c.all_verified(0, 8) && !c.is_verified(8));
    }
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x23], 5 * DEFAULT_CHUNK_SIZE).unwrap();
    drop(f);
    let c = CacheFile::open(&path, &options(size, "v1")).unwrap();
    assert!(c.all_present(0, 8) && !c.is_verified(0));
    assert_eq!(c.verify(0, 16).unwrap(), [(5, 5 * DEFAULT_CHUNK_SIZE)]);
    assert!(c.all_verified(0, 5) && !c.is_verified(5) && c.all_verified(6, 8));
    c.clear_chunks(&[5]).unwrap();
    assert!(!c.is_present(5));
    assert_eq!(c.present_chunks(), 7);
    assert!(c.verify(0, 16).unwrap().is_empty());
}
