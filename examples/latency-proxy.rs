//! A standalone HTTP latency proxy for `benches/compare-remote.sh`: forwards
//! 127.0.0.1:`--listen` to 127.0.0.1:`--upstream` and waits `--latency-ms` before
//! forwarding each request, so every response head (first byte) arrives that much
//! later. It is the fault proxy of the integration tests (`test-support/src/faults.rs`):
//! one thread per client connection, HTTP/1.1 keep-alive aware (the delay applies
//! to every request on a connection, not once per connection), bodies copied 256 KiB
//! per system call, a small body sent together with its head.
//!
//! ```text
//! cargo build --release --example latency-proxy
//! target/release/examples/latency-proxy --upstream 8080 --listen 0 --latency-ms 20
//! ```
//!
//! Prints `listening on 127.0.0.1:PORT` on stdout once it accepts connections
//! (`--listen 0` picks a free port), then runs until it is killed.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;
use std::time::Duration;

use thinline_test_support::faults;

const USAGE: &str = "usage: latency-proxy --upstream PORT [--listen PORT] [--latency-ms N]
  --upstream PORT   the HTTP server to forward to, on 127.0.0.1
  --listen PORT     where to listen, on 127.0.0.1 (default 0: a free port)
  --latency-ms N    delay before forwarding each request, in milliseconds (default 0)";

struct Options {
    upstream: u16,
    listen: u16,
    latency_ms: u64,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let (mut upstream, mut listen, mut latency_ms) = (None, 0, 0);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        if name == "-h" || name == "--help" {
            return Err(String::new());
        }
        let value = inline
            .or_else(|| args.next())
            .ok_or_else(|| format!("{name} needs a value"))?;
        let bad = |_| format!("bad value for {name}: {value:?}");
        match name.as_str() {
            "--upstream" => upstream = Some(value.parse().map_err(bad)?),
            "--listen" => listen = value.parse().map_err(bad)?,
            "--latency-ms" => latency_ms = value.parse().map_err(bad)?,
            _ => return Err(format!("unknown argument {name:?}")),
        }
    }
    Ok(Options {
        upstream: upstream.ok_or("--upstream is required")?,
        listen,
        latency_ms,
    })
}

fn main() -> ExitCode {
    let options = match common::parse_args("latency-proxy", USAGE, parse) {
        Ok(o) => o,
        Err(status) => return status,
    };
    let listener = match TcpListener::bind(("127.0.0.1", options.listen)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "latency-proxy: cannot listen on 127.0.0.1:{}: {e}",
                options.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let proxy = faults::FaultProxy::start_on(listener, options.upstream);
    proxy.set_latency(Duration::from_millis(options.latency_ms));
    println!("listening on 127.0.0.1:{}", proxy.port);
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}
