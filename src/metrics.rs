//! `--metrics-listen ADDR`: Prometheus metrics of a `serve` or `proxy` daemon over
//! HTTP at `/metrics`, in the Prometheus text format. The server's request metrics are
//! counted as requests run ([`thinline_nbd::metrics`]); the copy-on-read caches', the
//! fetch engines' and the process's are read from their own counters at each scrape.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use thinline_cor::CorExport;
use thinline_nbd::metrics::ServerMetrics;

/// At most this many scrapes are answered at once; others wait for their turn.
const MAX_SCRAPES: usize = 8;

/// The registry of one daemon: its server's metrics, and collectors for `caches`
/// (export name, cache), the fetch engines and the process.
pub fn registry(caches: Vec<(String, CorExport)>) -> (Registry, Arc<ServerMetrics>) {
    let mut registry = Registry::default();
    let server = Arc::new(ServerMetrics::register(&mut registry));
    registry.register_collector(Box::new(Caches(caches)));
    registry.register_collector(Box::new(FetchEngines));
    registry.register_collector(Box::new(Process));
    (registry, server)
}

/// Binds `address` (TCP) for the metrics endpoint.
pub async fn bind(address: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for metrics on {address}"))
}

/// Answers `GET /metrics` on `listener` until the process exits (404 for any other
/// path, 405 for any other method).
pub async fn serve(listener: tokio::net::TcpListener, registry: Registry) {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let registry = Arc::new(registry);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = answer(&registry, &req);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // A client that stops reading is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
            drop(slot);
        });
    }
}

type Body = http_body_util::Full<bytes::Bytes>;

fn answer<B>(registry: &Registry, req: &hyper::Request<B>) -> hyper::Response<Body> {
    let reply = |status: u16, content_type: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Body::new(body.into()))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return reply(404, "text/plain", "metrics are at /metrics\n".into());
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(405, "text/plain", "GET /metrics\n".into());
    }
    let mut text = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
        Ok(()) => reply(
            200,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            text,
        ),
        Err(_) => reply(500, "text/plain", "cannot encode the metrics\n".into()),
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExportLabel {
    export: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateLabel {
    template: String,
}

/// Encodes one family (a counter's `name` without `_total`, or a gauge's): a value
/// per label set.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counter: bool,
    values: impl Iterator<Item = (L, f64)>,
) -> Result<(), std::fmt::Error> {
    let kind = if counter {
        prometheus_client::metrics::MetricType::Counter
    } else {
        prometheus_client::metrics::MetricType::Gauge
    };
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        let metric = family.encode_family(&labels)?;
        if counter {
            ConstCounter::new(value).encode(metric)?;
        } else {
            ConstGauge::new(value).encode(metric)?;
        }
    }
    Ok(())
}

/// The copy-on-read caches' counters, read from their status at each scrape.
#[derive(Debug)]
struct Caches(Vec<(String, CorExport)>);

impl Collector for Caches {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let statuses: Vec<(ExportLabel, thinline_cor::Status)> = self
            .0
            .iter()
            .map(|(name, cache)| {
                (
                    ExportLabel {
                        export: name.clone(),
                    },
                    cache.status(),
                )
            })
            .collect();
        type Field = fn(&thinline_cor::Status) -> f64;
        let fields: [(&str, &str, bool, Field); 10] = [
            (
                "thinline_cache_hits",
                "Reads answered from the cache alone",
                true,
                |s| s.hits as f64,
            ),
            (
                "thinline_cache_misses",
                "Reads that needed the upstream",
                true,
                |s| s.misses as f64,
            ),
            (
                "thinline_cache_served_bytes",
                "Bytes read from the cache's export",
                true,
                |s| s.bytes_served as f64,
            ),
            (
                "thinline_cache_upstream_reads",
                "Reads sent to the upstream",
                true,
                |s| s.upstream_reads as f64,
            ),
            (
                "thinline_cache_upstream_bytes",
                "Bytes received from the upstream",
                true,
                |s| s.bytes_from_upstream as f64,
            ),
            (
                "thinline_cache_upstream_errors",
                "Upstream reads that failed",
                true,
                |s| s.upstream_errors as f64,
            ),
            (
                "thinline_cache_checksum_errors",
                "Cached chunks found not to match their checksum",
                true,
                |s| s.checksum_errors as f64,
            ),
            (
                "thinline_cache_chunks",
                "Chunks of the template",
                false,
                |s| s.chunks as f64,
            ),
            (
                "thinline_cache_chunks_present",
                "Chunks held by the cache",
                false,
                |s| s.chunks_present as f64,
            ),
            (
                "thinline_cache_hydration_ratio",
                "Share of the template's chunks held by the cache (0 to 1)",
                false,
                |s| s.percent_present / 100.0,
            ),
        ];
        for (name, help, counter, value) in fields {
            let values = statuses.iter().map(|(l, s)| (l.clone(), value(s)));
            family(&mut encoder, name, help, counter, values)?;
        }
        Ok(())
    }
}

/// The remote templates' fetch engines, summed per template.
#[derive(Debug)]
struct FetchEngines;

impl Collector for FetchEngines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut per_template: std::collections::BTreeMap<String, [u64; 5]> = Default::default();
        for e in thinline_source::fetch::live_engines() {
            let sums = per_template.entry(e.uri).or_default();
            for (sum, v) in sums.iter_mut().zip([
                e.requests,
                e.retries,
                e.bytes_fetched,
                e.memory_hits,
                e.in_flight,
            ]) {
                *sum += v;
            }
        }
        let fields: [(&str, &str, bool); 5] = [
            (
                "thinline_fetch_requests",
                "Range requests sent to remote templates, retries included",
                true,
            ),
            (
                "thinline_fetch_retries",
                "Range requests that were retries",
                true,
            ),
            (
                "thinline_fetch_bytes",
                "Bytes received from remote templates",
                true,
            ),
            (
                "thinline_fetch_memory_hits",
                "Reads answered from the fetch engine's memory",
                true,
            ),
            (
                "thinline_fetch_in_flight",
                "Range requests running now",
                false,
            ),
        ];
        for (i, (name, help, counter)) in fields.into_iter().enumerate() {
            let values = per_template.iter().map(|(uri, sums)| {
                (
                    TemplateLabel {
                        template: uri.clone(),
                    },
                    sums[i] as f64,
                )
            });
            family(&mut encoder, name, help, counter, values)?;
        }
        Ok(())
    }
}

/// The process's memory and threads, from `/proc/self/status`.
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory of the process",
                field("VmRSS:").map(|kib| kib * 1024.0),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory of the process",
                field("VmSize:").map(|kib| kib * 1024.0),
            ),
            (
                "process_threads",
                "Threads of the process",
                field("Threads:"),
            ),
        ];
        for (name, help, value) in gauges {
            let Some(value) = value else { continue };
            let metric = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(value).encode(metric)?;
        }
        Ok(())
    }
}
