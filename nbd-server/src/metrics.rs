//! The server's Prometheus metrics: per export, requests, errors and latency by
//! command, bytes read and written, and connections. Registered once into the
//! daemon's registry ([`ServerMetrics::register`]); each connection takes the handles
//! of its export when it starts, so a request costs a clock read and a few atomic
//! adds, and no lookup.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::request::Command;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExportLabels {
    export: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    export: String,
    command: &'static str,
}

/// Every command that reaches an export, as labelled, in [`command_index`]'s order.
const COMMANDS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
];

/// Where a command's label is in [`COMMANDS`]; `None` for one that never reaches an
/// export.
fn command_index(c: &Command) -> Option<usize> {
    match c {
        Command::Read { .. } => Some(0),
        Command::Write { .. } => Some(1),
        Command::Flush => Some(2),
        Command::Trim { .. } => Some(3),
        Command::Cache { .. } => Some(4),
        Command::WriteZeroes { .. } => Some(5),
        Command::BlockStatus { .. } | Command::BlockStatusWithPayload { .. } => Some(6),
        Command::Disconnect => None,
    }
}

fn latency_histogram() -> Histogram {
    // 10 µs to about 5 s.
    Histogram::new(exponential_buckets(10e-6, 2.0, 20))
}

/// The metric families of one server.
#[derive(Debug)]
pub struct ServerMetrics {
    requests: Family<CommandLabels, Counter>,
    errors: Family<CommandLabels, Counter>,
    latency: Family<CommandLabels, Histogram, fn() -> Histogram>,
    read_bytes: Family<ExportLabels, Counter>,
    write_bytes: Family<ExportLabels, Counter>,
    connections: Family<ExportLabels, Gauge>,
    connections_total: Family<ExportLabels, Counter>,
}

impl ServerMetrics {
    /// The server's metrics, registered into `registry` (as `thinline_export_…`).
    pub fn register(registry: &mut Registry) -> ServerMetrics {
        let m = ServerMetrics {
            requests: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            read_bytes: Family::default(),
            write_bytes: Family::default(),
            connections: Family::default(),
            connections_total: Family::default(),
        };
        registry.register(
            "thinline_export_requests",
            "NBD requests an export ran, by command",
            m.requests.clone(),
        );
        registry.register(
            "thinline_export_errors",
            "NBD requests an export answered with an error, by command",
            m.errors.clone(),
        );
        registry.register(
            "thinline_export_request_duration_seconds",
            "Time from a request's arrival to its reply being queued, by command",
            m.latency.clone(),
        );
        registry.register(
            "thinline_export_read_bytes",
            "Bytes read from an export by its clients",
            m.read_bytes.clone(),
        );
        registry.register(
            "thinline_export_write_bytes",
            "Bytes written to an export by its clients",
            m.write_bytes.clone(),
        );
        registry.register(
            "thinline_export_connections",
            "Connections open to an export",
            m.connections.clone(),
        );
        registry.register(
            "thinline_export_connections_opened",
            "Connections made to an export",
            m.connections_total.clone(),
        );
        m
    }

    /// Makes export `export`'s series, at zero.
    pub(crate) fn declare(&self, export: &str) {
        let labels = ExportLabels {
            export: export.to_owned(),
        };
        for command in COMMANDS {
            let labels = CommandLabels {
                export: export.to_owned(),
                command,
            };
            drop(self.requests.get_or_create(&labels));
            drop(self.errors.get_or_create(&labels));
            drop(self.latency.get_or_create(&labels));
        }
        drop(self.read_bytes.get_or_create(&labels));
        drop(self.write_bytes.get_or_create(&labels));
        drop(self.connections.get_or_create(&labels));
        drop(self.connections_total.get_or_create(&labels));
    }

    /// The handles of export `export`, for one connection: counted as open until it
    /// is dropped.
    pub(crate) fn connection(&self, export: &str) -> ConnectionMetrics {
        let labels = ExportLabels {
            export: export.to_owned(),
        };
        let by_command = |family: &Family<CommandLabels, Counter>| {
            COMMANDS.map(|command| {
                family
                    .get_or_create(&CommandLabels {
                        export: export.to_owned(),
                        command,
                    })
                    .clone()
            })
        };
        let connections = self.connections.get_or_create(&labels).clone();
        connections.inc();
        self.connections_total.get_or_create(&labels).inc();
        ConnectionMetrics {
            requests: by_command(&self.requests),
            errors: by_command(&self.errors),
            latency: COMMANDS.map(|command| {
                self.latency
                    .get_or_create(&CommandLabels {
                        export: export.to_owned(),
                        command,
                    })
                    .clone()
            }),
            read_bytes: self.read_bytes.get_or_create(&labels).clone(),
            write_bytes: self.write_bytes.get_or_create(&labels).clone(),
            connections,
        }
    }
}

/// One connection's handles into its export's metrics.
#[derive(Debug)]
pub(crate) struct ConnectionMetrics {
    requests: [Counter; 7],
    errors: [Counter; 7],
    latency: [Histogram; 7],
    read_bytes: Counter,
    write_bytes: Counter,
    connections: Gauge,
}

impl ConnectionMetrics {
    /// Counts a request of `command` that took `elapsed` and succeeded or not.
    pub(crate) fn observe(&self, command: &Command, ok: bool, elapsed: Duration) {
        let Some(i) = command_index(command) else {
            return;
        };
        self.requests[i].inc();
        if !ok {
            self.errors[i].inc();
        }
        self.latency[i].observe(elapsed.as_secs_f64());
        if ok {
            match command {
                Command::Read { length, .. } => {
                    self.read_bytes.inc_by(u64::from(*length));
                }
                Command::Write { length, .. } => {
                    self.write_bytes.inc_by(u64::from(*length));
                }
                _ => {}
            }
        }
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn a_connection_counts_its_requests_bytes_and_errors_under_its_export() {
        let mut registry = Registry::default();
        let m = ServerMetrics::register(&mut registry);
        let c = m.connection("disk");
        let read = Command::Read {
            offset: 0,
            length: 4096,
            df: false,
        };
        c.observe(&read, true, Duration::from_micros(50));
        c.observe(&read, false, Duration::from_micros(50));
        c.observe(&Command::Flush, true, Duration::from_millis(2));
        let out = text(&registry);
        for line in [
            r#"thinline_export_requests_total{export="disk",command="read"} 2"#,
            r#"thinline_export_errors_total{export="disk",command="read"} 1"#,
            r#"thinline_export_requests_total{export="disk",command="flush"} 1"#,
            r#"thinline_export_read_bytes_total{export="disk"} 4096"#,
            r#"thinline_export_connections{export="disk"} 1"#,
            r#"thinline_export_request_duration_seconds_count{export="disk",command="read"} 2"#,
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "{line} missing from:\n{out}"
            );
        }
        drop(c);
        assert!(text(&registry).contains(r#"thinline_export_connections{export="disk"} 0"#));
    }

    #[test]
    fn a_declared_export_has_every_series_at_zero_before_any_connection() {
        let mut registry = Registry::default();
        let m = ServerMetrics::register(&mut registry);
        m.declare("disk");
        let out = text(&registry);
        for line in [
            r#"thinline_export_requests_total{export="disk",command="write"} 0"#,
            r#"thinline_export_read_bytes_total{export="disk"} 0"#,
            r#"thinline_export_connections{export="disk"} 0"#,
            r#"thinline_export_connections_opened_total{export="disk"} 0"#,
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "{line} missing from:\n{out}"
            );
        }
    }
}
