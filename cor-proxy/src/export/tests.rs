use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use thinline_nbd::DataError;
use thinline_nbd::proto::errno;

use super::fetch::{chunk_sums, split_runs};
use super::speculation::LinkEstimate;
use super::*;

/// A template in memory; counts reads, can hold them or fail them.
#[derive(Debug)]
struct MemUpstream {
    data: Vec<u8>,
    reads: Mutex<Vec<(u64, u64)>>,
    gate: tokio::sync::Semaphore,
    fail: AtomicBool,
    /// Reads return zeroes as data, block status names this zero range.
    zero_range: Option<(u64, u64)>,
    allocation_calls: AtomicUsize,
}

impl MemUpstream {
    fn new(size: usize, open: bool) -> Arc<Self> {
        let data = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
        Arc::new(MemUpstream {
            data,
            reads: Mutex::new(Vec::new()),
            gate: tokio::sync::Semaphore::new(if open { 1 << 20 } else { 0 }),
            fail: AtomicBool::new(false),
            zero_range: None,
            allocation_calls: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl Upstream for MemUpstream {
    fn name(&self) -> &str {
        "memory"
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn identity(&self) -> &str {
        "memory template v1"
    }
    async fn read(&self, offset: u64, length: u64) -> Result<Vec<ReadChunk>> {
        self.reads.lock().unwrap().push((offset, length));
        let _permit = self.gate.acquire().await.unwrap();
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::from(DataError::upstream(
                "memory",
                "read",
                offset,
                length,
                errno::EIO,
                "injected".to_owned(),
            )));
        }
        let range = offset as usize..(offset + length) as usize;
        Ok(vec![ReadChunk::Data(Bytes::copy_from_slice(
            &self.data[range],
        ))])
    }
    async fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.allocation_calls.fetch_add(1, Ordering::SeqCst);
        let Some((zs, zl)) = self.zero_range else {
            return Ok(vec![Extent { length, flags: 0 }]);
        };
        let zero = u64::from(thinline_nbd::proto::state::HOLE | thinline_nbd::proto::state::ZERO);
        let mut out = Vec::new();
        for (s, e, flags) in [(0, zs, 0), (zs, zs + zl, zero), (zs + zl, self.size(), 0)] {
            let (lo, hi) = (s.max(offset), e.min(offset + length));
            if lo < hi {
                out.push(Extent {
                    length: hi - lo,
                    flags,
                });
            }
        }
        Ok(out)
    }

    fn reads_report_holes(&self) -> bool {
        self.zero_range.is_none()
    }
}

/// Options without speculation, for tests that count upstream reads exactly.
fn no_speculation() -> CorOptions {
    CorOptions {
        fetch_around: 0,
        ..CorOptions::default()
    }
}

async fn read_bytes(e: &CorExport, offset: u64, length: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for c in e.read(offset, length).await? {
        match c {
            ReadChunk::Data(d) => out.extend_from_slice(&d),
            ReadChunk::Zero(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    Ok(out)
}

/// Opens again once the previous owner's background tasks have let go of the lock.
async fn reopen(up: Arc<MemUpstream>, path: &Path, options: &CorOptions) -> CorExport {
    for _ in 0..200 {
        match CorExport::open(up.clone(), path, options) {
            Err(crate::Error::Locked { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other.unwrap(),
        }
    }
    panic!("the cache stayed locked after its export was dropped");
}

async fn wait_present(e: &CorExport, n: u64) {
    for _ in 0..500 {
        if e.cache().present_chunks() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("only {} chunks present", e.cache().present_chunks());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_a_unit_being_fetched_share_one_fetch_answered_by_its_first_request() {
    let dir = tempfile::tempdir().unwrap();
    let up = MemUpstream::new(4 << 20, false);
    let e = CorExport::open(up.clone(), &dir.path().join("c"), &no_speculation()).unwrap();
    let readers: Vec<_> = (0..8u64)
        .map(|i| {
            let e = e.clone();
            tokio::spawn(async move { read_bytes(&e, (1 << 20) + i * 4096, 4096).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // One fetch of the unit: the chunk the first read needs, on its own and first,
    // then the rest of the unit.
    let (mib, chunk) = (1 << 20, 64 << 10);
    assert_eq!(
        *up.reads.lock().unwrap(),
        [(mib, chunk), (mib + chunk, mib - chunk)]
    );
    // Releasing only the first request answers every reader inside that chunk.
    up.gate.add_permits(1);
    for (i, r) in readers.into_iter().enumerate() {
        let off = (1 << 20) + i * 4096;
        assert_eq!(r.await.unwrap().unwrap(), up.data[off..off + 4096]);
    }
    assert_eq!(
        e.cache().present_chunks(),
        0,
        "marked before the unit arrived"
    );
    up.gate.add_permits(1 << 20);
    assert_eq!(up.reads.lock().unwrap().len(), 2);
    wait_present(&e, 16).await;
    // Marked: later reads come from the cache file.
    assert_eq!(
        read_bytes(&e, 1 << 20, 65536).await.unwrap(),
        up.data[1 << 20..(1 << 20) + 65536]
    );
    assert_eq!(up.reads.lock().unwrap().len(), 2);
}

#[test]
fn speculation_shrinks_when_moving_a_unit_costs_more_than_a_round_trip() {
    let ms = Duration::from_millis;
    let mut link = LinkEstimate::default();
    assert_eq!(link.units_per_round_trip(), None);
    // 20 ms away, 1 MiB in 2 ms (a fast link).
    link.record(ms(20), ms(2), 1.0);
    assert_eq!(link.units_per_round_trip(), Some(10));
    // Then 1 MiB takes 84 ms (100 Mbit/s): the average follows within a few misses.
    for _ in 0..12 {
        link.record(ms(20), ms(84), 1.0);
    }
    assert_eq!(link.units_per_round_trip(), Some(0));
    // Half a unit in 4 ms is 8 ms per unit: two units per 20 ms round trip.
    let mut link = LinkEstimate::default();
    link.record(ms(20), ms(4), 0.5);
    assert_eq!(link.units_per_round_trip(), Some(2));
    link.record(ms(20), Duration::ZERO, 1.0);
    assert!(link.units_per_round_trip().unwrap() >= 2);
}

#[test]
fn runs_split_at_the_needed_range_cover_the_same_bytes() {
    let runs = [(0, 100), (200, 100), (400, 50)];
    let (inside, rest) = split_runs(&runs, (250, 420));
    assert_eq!(inside, [(250, 50), (400, 20)]);
    assert_eq!(rest, [(0, 100), (200, 50), (420, 30)]);
    let (inside, rest) = split_runs(&runs, (100, 200));
    assert!(inside.is_empty());
    assert_eq!(rest, runs);
    let (inside, rest) = split_runs(&runs, (0, 1000));
    assert_eq!(inside, runs);
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_also_fetches_its_neighbours_and_a_hit_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let up = MemUpstream::new(8 << 20, false);
    let options = CorOptions {
        fetch_around: 2,
        ..CorOptions::default()
    };
    let e = CorExport::open(up.clone(), &dir.path().join("c"), &options).unwrap();
    let reader = {
        let e = e.clone();
        tokio::spawn(async move { read_bytes(&e, (4 << 20) + 100, 4096).await })
    };
    for _ in 0..500 {
        if up.reads.lock().unwrap().len() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut reads = up.reads.lock().unwrap().clone();
    reads.sort_unstable();
    let (mib, chunk) = (1 << 20, 64 << 10);
    // The missed unit 4 as its needed chunk and the rest; 2, 3, 5 and 6 whole.
    let expected = [
        (2 * mib, mib),
        (3 * mib, mib),
        (4 * mib, chunk),
        (4 * mib + chunk, mib - chunk),
        (5 * mib, mib),
        (6 * mib, mib),
    ];
    assert_eq!(reads, expected);
    up.gate.add_permits(1 << 20);
    let off = (4 << 20) + 100;
    assert_eq!(reader.await.unwrap().unwrap(), up.data[off..off + 4096]);
    assert_eq!(e.status().speculative_fetches, 4);
    // Every chunk of units 2..=6 becomes present; reading them costs nothing more.
    wait_present(&e, 5 * 16).await;
    let off = (2 << 20) + 5;
    assert_eq!(
        read_bytes(&e, off as u64, 3 << 20).await.unwrap(),
        up.data[off..off + (3 << 20)]
    );
    assert_eq!(up.reads.lock().unwrap().len(), 6);
    // A miss at the template's end: neighbours are clamped to the template.
    read_bytes(&e, (8 << 20) - 10, 10).await.unwrap();
    // The read is answered by its own request; the rest of the unit may still be
    // on its way.
    wait_present(&e, 6 * 16).await;
    let mut reads = up.reads.lock().unwrap()[6..].to_vec();
    reads.sort_unstable();
    assert_eq!(
        reads,
        [(7 * mib, mib - chunk), (8 * mib - chunk, chunk)],
        "unit 7 only: 5 and 6 are present, 8 is past the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_fails_its_readers_marks_nothing_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let up = MemUpstream::new(2 << 20, true);
    up.fail.store(true, Ordering::SeqCst);
    let e = CorExport::open(up.clone(), &dir.path().join("c"), &no_speculation()).unwrap();
    let err = read_bytes(&e, 100, 5000).await.unwrap_err();
    assert_eq!(err.nbd_errno(), errno::EIO, "{err}");
    assert!(err.to_string().contains("memory"), "{err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(e.cache().present_chunks(), 0);
    up.fail.store(false, Ordering::SeqCst);
    assert_eq!(read_bytes(&e, 100, 5000).await.unwrap(), up.data[100..5100]);
    assert_eq!(e.status().upstream_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_across_cached_and_fetched_units_are_exact_and_present_chunks_are_never_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 << 20;
    let up = MemUpstream::new(size, true);
    let options = CorOptions {
        fetch_unit: 256 << 10,
        ..no_speculation()
    };
    let e = CorExport::open(up.clone(), &dir.path().join("c"), &options).unwrap();
    // Cache two scattered 64 KiB pieces first (each fetches its 256 KiB unit).
    read_bytes(&e, 300 << 10, 10).await.unwrap();
    read_bytes(&e, (1 << 20) + 5, 10).await.unwrap();
    wait_present(&e, 8).await;
    drop(e);
    // Reopen with another fetch unit: units now straddle present chunks.
    let options = CorOptions {
        fetch_unit: 1 << 20,
        ..no_speculation()
    };
    let e = reopen(up.clone(), &dir.path().join("c"), &options).await;
    up.reads.lock().unwrap().clear();
    let all = read_bytes(&e, 1, (size - 2) as u32).await.unwrap();
    assert!(all == up.data[1..size - 1]);
    let reads = up.reads.lock().unwrap().clone();
    for &(off, len) in &reads {
        let hits_cached = |lo: u64, hi: u64| off < hi && lo < off + len;
        assert!(
            !hits_cached(256 << 10, 512 << 10) && !hits_cached(1 << 20, (1 << 20) + (256 << 10)),
            "present range fetched again: {reads:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_is_asked_once_and_zero_ranges_are_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = MemUpstream::new(8 << 20, true);
    let zs = (2 << 20) + 8192;
    Arc::get_mut(&mut up).unwrap().zero_range = Some((zs, 3 << 20));
    Arc::get_mut(&mut up).unwrap().data[zs as usize..(zs + (3 << 20)) as usize].fill(0);
    let e = CorExport::open(up.clone(), &dir.path().join("c"), &no_speculation()).unwrap();
    let all = read_bytes(&e, 0, 8 << 20).await.unwrap();
    assert!(all == up.data);
    assert_eq!(up.allocation_calls.load(Ordering::SeqCst), 1);
    for &(off, len) in up.reads.lock().unwrap().iter() {
        assert!(
            off + len <= zs || off >= zs + (3 << 20),
            "read {off}+{len} of the zero range"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scribbled_and_forged_chunks_are_detected_fetched_again_and_read_right() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let size = 2 << 20;
    let up = MemUpstream::new(size, true);
    let e = CorExport::open(up.clone(), &path, &no_speculation()).unwrap();
    assert_eq!(
        read_bytes(&e, 0, 1 << 20).await.unwrap(),
        up.data[..1 << 20]
    );
    wait_present(&e, 16).await;
    drop(e);
    let chunk = DEFAULT_CHUNK_SIZE;
    let g = crate::cache::Geometry::new(size as u64, chunk);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // Bit rot in chunk 5, which was fetched.
        f.write_all_at(b"rot", 5 * chunk + 100).unwrap();
        // A forged bit for chunk 20, never fetched (its bytes read as zeroes).
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, g.map + 2).unwrap();
        f.write_all_at(&[b[0] | 1 << 4], g.map + 2).unwrap();
    }
    let e = reopen(up.clone(), &path, &no_speculation()).await;
    assert_eq!(e.cache().present_chunks(), 17);
    up.reads.lock().unwrap().clear();
    assert!(read_bytes(&e, 0, size as u32).await.unwrap() == up.data);
    let reads = up.reads.lock().unwrap().clone();
    for bad in [5, 20] {
        let off = bad * chunk;
        assert!(
            reads.iter().any(|&(o, l)| o <= off && off + chunk <= o + l),
            "chunk {bad} was not fetched again: {reads:?}"
        );
    }
    assert!(
        !reads.iter().any(|&(o, _)| o < 5 * chunk),
        "good chunks fetched again: {reads:?}"
    );
    assert_eq!(e.status().checksum_errors, 2);
    wait_present(&e, 32).await;
    // Fetched again, and right on disk now.
    assert!(e.cache().scrub().unwrap().bad.is_empty());
}

#[test]
fn chunk_checksums_cover_data_and_zero_pieces_across_their_boundaries() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    // Chunks of 4096 in a 10000-byte template: the last one is short.
    let pieces = vec![
        (0, ReadChunk::Data(Bytes::copy_from_slice(&data[..5000]))),
        (5000, ReadChunk::Zero(1000)),
        (6000, ReadChunk::Data(Bytes::copy_from_slice(&data[6000..]))),
    ];
    let mut whole = data.clone();
    whole[5000..6000].fill(0);
    let want: Vec<(u64, u32)> = whole
        .chunks(4096)
        .enumerate()
        .map(|(i, c)| (i as u64, crc32c::crc32c(c)))
        .collect();
    assert_eq!(chunk_sums(&pieces, 4096, 10_000), want);
    // A run that starts at a later chunk.
    let pieces = vec![(
        8192,
        ReadChunk::Data(Bytes::copy_from_slice(&whole[8192..])),
    )];
    assert_eq!(chunk_sums(&pieces, 4096, 10_000), want[2..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let up = MemUpstream::new(1 << 20, true);
    let e = CorExport::open(up, &dir.path().join("c"), &CorOptions::default()).unwrap();
    assert!(e.capabilities().read_only);
    let err = e
        .write(0, Bytes::from_static(b"x"), false)
        .await
        .unwrap_err();
    assert_eq!(err.nbd_errno(), errno::EPERM);
    assert_eq!(
        e.trim(0, 4096, false).await.unwrap_err().nbd_errno(),
        errno::EPERM
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hydration_started_on_request_completes_the_cache_once_and_fetches_nothing_cached() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 << 20;
    let up = MemUpstream::new(size, true);
    let e = CorExport::open(up.clone(), &dir.path().join("c"), &no_speculation()).unwrap();
    assert_eq!(e.status().prefetch, "off", "no hydration unless asked");
    read_bytes(&e, 0, 4096).await.unwrap();
    wait_present(&e, 16).await;
    up.reads.lock().unwrap().clear();
    // Upstream reads wait until the second request was made.
    assert_eq!(up.gate.forget_permits(1 << 20), 1 << 20);
    assert!(e.start_prefetch(PrefetchOptions::default()));
    assert!(
        !e.start_prefetch(PrefetchOptions::default()),
        "a second hydration while one runs"
    );
    up.gate.add_permits(1 << 20);
    for _ in 0..500 {
        if e.cache().is_complete() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(e.cache().is_complete(), "the cache was not completed");
    let reads = up.reads.lock().unwrap().clone();
    assert!(
        reads.iter().all(|&(off, _)| off >= 1 << 20),
        "the cached first unit was fetched again: {reads:?}"
    );
    assert!(read_bytes(&e, 0, size as u32).await.unwrap() == up.data);
    // Once done, asking again starts one that finds nothing to fetch.
    while e.status().prefetch == "running" {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    up.reads.lock().unwrap().clear();
    assert!(e.start_prefetch(PrefetchOptions::default()));
    while e.status().prefetch == "running" {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(up.reads.lock().unwrap().is_empty());
}
