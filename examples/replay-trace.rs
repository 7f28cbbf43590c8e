//! Replays a recorded block read trace (`benches/traces/*.csv`) against an NBD export,
//! closed-loop, for `benches/compare-cor.sh`: "how long does this boot take when the
//! disk is behind that server?"
//!
//! The trace format (written by `benches/record-boot-trace.sh`): `#` comment lines, a
//! header line, then one line per read request in issue order:
//!
//! ```text
//! offset,length,gap_us,after,qd
//! ```
//!
//! - `after`: the 0-based index of the request whose completion this one waited for
//!   (the last read that completed before this one was issued in the recording), or -1
//!   for "the start of the trace".
//! - `gap_us`: think time, from that completion (or the start) to this request's issue.
//! - `qd`: requests in flight when this one was issued, recording only (not used).
//!
//! Request `i` is issued once request `after` has completed here and `gap_us` (times
//! `--gap-scale`) has passed since, and never before request `i - 1` was issued. A
//! request whose predecessor is still in flight is issued while it is in flight, so
//! the recorded parallelism is kept; a request that waited for one in the recording
//! waits here too, however long that takes against the server under test.
//!
//! One dispatcher thread sleeps the gaps (`std::thread::sleep`, so short gaps stay
//! short; tokio's timer has 1 ms granularity) and hands each request to a tokio
//! runtime, where one [`Client`] connection carries all of them, like qemu's NBD client.
//!
//! ```text
//! cargo build --release --example replay-trace
//! target/release/examples/replay-trace [--json] [--verify IMG] [--gap-scale F]
//!     [--latency-log FILE] TRACE nbd+unix:///?socket=SOCK
//! ```
//!
//! Prints wall time, bytes and requests (text, or one JSON object with `--json`).
//! `--verify IMG` compares every byte read with the same range of IMG and fails if any
//! differs. Exit status: 0 on success, 1 if a read failed or a byte differed, 2 on bad
//! arguments or an unreadable trace.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use thinline_nbd::client::{Client, ClientOptions, NbdUri};

const USAGE: &str = "usage: replay-trace [OPTIONS] TRACE NBD-URI
  TRACE               a trace file: offset,length,gap_us,after[,qd] lines (see benches/README.md)
  NBD-URI             nbd+unix:///?socket=PATH or nbd://host[:port]/export
  --json              print one JSON object instead of text
  --verify IMG        compare every byte read with the same range of IMG
  --gap-scale F       multiply every think time by F (default 1; 0 = I/O only)
  --limit N           replay only the first N requests
  --latency-log FILE  write index,offset,length,issue_us,latency_us per request to FILE";

struct Options {
    trace: String,
    uri: String,
    json: bool,
    verify: Option<String>,
    gap_scale: f64,
    limit: Option<usize>,
    latency_log: Option<String>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut positional = Vec::new();
    let (mut json, mut verify, mut gap_scale, mut limit, mut latency_log) =
        (false, None, 1.0_f64, None, None);
    while let Some(arg) = args.next() {
        if !arg.starts_with("--") && arg != "-h" {
            positional.push(arg);
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        match name.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--json" => {
                json = true;
                continue;
            }
            _ => {}
        }
        let value = inline
            .or_else(|| args.next())
            .ok_or_else(|| format!("{name} needs a value"))?;
        let bad = || format!("bad value for {name}: {value:?}");
        match name.as_str() {
            "--verify" => verify = Some(value),
            "--gap-scale" => {
                gap_scale = value.parse().map_err(|_| bad())?;
                if !(gap_scale >= 0.0 && gap_scale.is_finite()) {
                    return Err(bad());
                }
            }
            "--limit" => limit = Some(value.parse().map_err(|_| bad())?),
            "--latency-log" => latency_log = Some(value),
            _ => return Err(format!("unknown argument {name:?}")),
        }
    }
    let [trace, uri]: [String; 2] = positional
        .try_into()
        .map_err(|_| "expected two arguments: TRACE NBD-URI".to_owned())?;
    Ok(Options {
        trace,
        uri,
        json,
        verify,
        gap_scale,
        limit,
        latency_log,
    })
}

#[derive(Debug, Clone, Copy)]
struct Request {
    offset: u64,
    length: u64,
    gap: Duration,
    /// Index of the request whose completion this one waits for; `None` = the start.
    after: Option<usize>,
}

fn load_trace(path: &str, limit: Option<usize>) -> Result<Vec<Request>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
    let mut out = Vec::new();
    let mut header_seen = false;
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{path}: {e}"))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !header_seen {
            header_seen = true;
            if !line.starts_with("offset,length,gap_us,after") {
                return Err(format!(
                    "{path}:{}: expected the header offset,length,gap_us,after[,...]",
                    n + 1
                ));
            }
            continue;
        }
        let bad = || format!("{path}:{}: bad line {line:?}", n + 1);
        let mut fields = line.split(',');
        let mut next = || fields.next().map(str::trim).ok_or_else(bad);
        let offset: u64 = next()?.parse().map_err(|_| bad())?;
        let length: u64 = next()?.parse().map_err(|_| bad())?;
        let gap_us: u64 = next()?.parse().map_err(|_| bad())?;
        let after: i64 = next()?.parse().map_err(|_| bad())?;
        let after = match usize::try_from(after) {
            Ok(a) if a < out.len() => Some(a),
            Ok(_) => return Err(format!("{}: `after` must name an earlier request", bad())),
            Err(_) => None,
        };
        out.push(Request {
            offset,
            length,
            gap: Duration::from_micros(gap_us),
            after,
        });
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    if out.is_empty() {
        return Err(format!("{path}: no requests"));
    }
    Ok(out)
}

/// Completion times, shared between the request tasks and the dispatcher thread.
struct Completions {
    done: Mutex<Vec<Option<Instant>>>,
    changed: Condvar,
}

impl Completions {
    fn set(&self, index: usize, at: Instant) {
        self.done.lock().unwrap()[index] = Some(at);
        self.changed.notify_all();
    }

    fn wait(&self, index: usize) -> Instant {
        let mut done = self.done.lock().unwrap();
        loop {
            if let Some(at) = done[index] {
                return at;
            }
            done = self.changed.wait(done).unwrap();
        }
    }

    fn wait_all(&self) {
        let mut done = self.done.lock().unwrap();
        while done.iter().any(Option::is_none) {
            done = self.changed.wait(done).unwrap();
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    issue_us: u64,
    latency_us: u64,
}

struct Outcome {
    wall: Duration,
    io_wait: Duration,
    think: Duration,
    samples: Vec<Sample>,
    errors: usize,
    mismatches: usize,
    max_in_flight: usize,
    bytes: u64,
}

fn replay(
    options: &Options,
    trace: &[Request],
    client: Arc<Client>,
    runtime: &tokio::runtime::Runtime,
) -> Outcome {
    let verify = options.verify.as_ref().map(|p| {
        Arc::new(File::open(p).unwrap_or_else(|e| {
            eprintln!("replay-trace: cannot open {p}: {e}");
            std::process::exit(2);
        }))
    });
    let completions = Arc::new(Completions {
        done: Mutex::new(vec![None; trace.len()]),
        changed: Condvar::new(),
    });
    let samples = Arc::new(Mutex::new(vec![Sample::default(); trace.len()]));
    let errors = Arc::new(AtomicUsize::new(0));
    let mismatches = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let (mut io_wait, mut think) = (Duration::ZERO, Duration::ZERO);

    let start = Instant::now();
    for (i, req) in trace.iter().enumerate() {
        // Closed loop: wait for the request this one depended on, then its think time.
        let base = match req.after {
            Some(a) => {
                let t = Instant::now();
                let done = completions.wait(a);
                io_wait += t.elapsed();
                done
            }
            None => start,
        };
        let target = base + req.gap.mul_f64(options.gap_scale);
        let now = Instant::now();
        if target > now {
            std::thread::sleep(target - now);
            think += now.elapsed();
        }
        let issued = Instant::now();
        let n = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        max_in_flight.fetch_max(n, Ordering::Relaxed);
        let req = *req;
        let (client, completions, samples, errors, mismatches, in_flight, bytes, verify) = (
            client.clone(),
            completions.clone(),
            samples.clone(),
            errors.clone(),
            mismatches.clone(),
            in_flight.clone(),
            bytes.clone(),
            verify.clone(),
        );
        runtime.spawn(async move {
            let result = client.read(req.offset, req.length).await;
            let done = Instant::now();
            in_flight.fetch_sub(1, Ordering::Relaxed);
            samples.lock().unwrap()[i] = Sample {
                issue_us: (issued - start).as_micros() as u64,
                latency_us: (done - issued).as_micros() as u64,
            };
            match result {
                Ok(data) => {
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    completions.set(i, done);
                    if let Some(image) = verify {
                        let mut expected = vec![0; data.len()];
                        let same = image
                            .read_exact_at(&mut expected, req.offset)
                            .is_ok_and(|()| expected[..] == data[..]);
                        if !same && mismatches.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!(
                                "replay-trace: request {i}: the {} bytes at {} differ from the image",
                                req.length, req.offset
                            );
                        }
                    }
                }
                Err(e) => {
                    if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!(
                            "replay-trace: request {i} ({} bytes at {}): {e}",
                            req.length, req.offset
                        );
                    }
                    completions.set(i, done);
                }
            }
        });
    }
    completions.wait_all();
    let wall = start.elapsed();
    let samples = samples.lock().unwrap().clone();
    Outcome {
        wall,
        io_wait,
        think,
        samples,
        errors: errors.load(Ordering::Relaxed),
        mismatches: mismatches.load(Ordering::Relaxed),
        max_in_flight: max_in_flight.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() -> ExitCode {
    let options = match common::parse_args("replay-trace", USAGE, parse) {
        Ok(o) => o,
        Err(status) => return status,
    };
    let trace = match load_trace(&options.trace, options.limit) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("replay-trace: {e}");
            return ExitCode::from(2);
        }
    };
    let uri = match NbdUri::parse(&options.uri) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("replay-trace: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let connected = Instant::now();
    let client = match runtime.block_on(Client::connect(&uri, &ClientOptions::default())) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("replay-trace: cannot connect to {}: {e}", options.uri);
            return ExitCode::FAILURE;
        }
    };
    let connect_time = connected.elapsed();
    if let Some(r) = trace.iter().find(|r| r.offset + r.length > client.size()) {
        eprintln!(
            "replay-trace: the trace reads up to byte {} but the export has {} bytes",
            r.offset + r.length,
            client.size()
        );
        return ExitCode::from(2);
    }

    let outcome = replay(&options, &trace, client.clone(), &runtime);
    runtime.block_on(client.disconnect());

    if let Some(path) = &options.latency_log {
        let write = || -> std::io::Result<()> {
            let mut f = std::io::BufWriter::new(File::create(path)?);
            writeln!(f, "index,offset,length,issue_us,latency_us")?;
            for (i, (r, s)) in trace.iter().zip(&outcome.samples).enumerate() {
                writeln!(
                    f,
                    "{i},{},{},{},{}",
                    r.offset, r.length, s.issue_us, s.latency_us
                )?;
            }
            f.flush()
        };
        if let Err(e) = write() {
            eprintln!("replay-trace: cannot write {path}: {e}");
        }
    }

    let mut lat: Vec<u64> = outcome.samples.iter().map(|s| s.latency_us).collect();
    lat.sort_unstable();
    let mean = lat.iter().sum::<u64>() as f64 / lat.len() as f64;
    let (p50, p90, p99, max) = (
        percentile(&lat, 50.0),
        percentile(&lat, 90.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(0),
    );
    let trace_think: Duration = trace.iter().map(|r| r.gap).sum();
    let ok = outcome.errors == 0 && outcome.mismatches == 0;
    if options.json {
        println!(
            "{}",
            serde_json::json!({
                "trace": options.trace,
                "uri": options.uri,
                "requests": trace.len(),
                "bytes": outcome.bytes,
                "wall_s": outcome.wall.as_secs_f64(),
                "io_wait_s": outcome.io_wait.as_secs_f64(),
                "think_s": outcome.think.as_secs_f64(),
                "trace_think_s": trace_think.as_secs_f64() * options.gap_scale,
                "gap_scale": options.gap_scale,
                "connect_s": connect_time.as_secs_f64(),
                "max_in_flight": outcome.max_in_flight,
                "latency_us": {"mean": mean, "p50": p50, "p90": p90, "p99": p99, "max": max},
                "errors": outcome.errors,
                "verified": options.verify.is_some(),
                "mismatches": outcome.mismatches,
                "ok": ok,
            })
        );
    } else {
        println!(
            "trace:          {} ({} requests)",
            options.trace,
            trace.len()
        );
        println!("server:         {}", options.uri);
        println!("wall time:      {:.3} s", outcome.wall.as_secs_f64());
        println!(
            "  waiting I/O:  {:.3} s (dispatcher blocked on a completion)",
            outcome.io_wait.as_secs_f64()
        );
        println!(
            "  think time:   {:.3} s slept (trace: {:.3} s × gap scale {})",
            outcome.think.as_secs_f64(),
            trace_think.as_secs_f64(),
            options.gap_scale
        );
        println!(
            "bytes read:     {} ({:.1} MiB)",
            outcome.bytes,
            outcome.bytes as f64 / 1048576.0
        );
        println!("max in flight:  {}", outcome.max_in_flight);
        println!("latency (µs):   mean {mean:.0}, p50 {p50}, p90 {p90}, p99 {p99}, max {max}");
        if options.verify.is_some() {
            println!(
                "verify:         {} mismatching requests",
                outcome.mismatches
            );
        }
        if outcome.errors > 0 {
            println!("errors:         {} failed requests", outcome.errors);
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
