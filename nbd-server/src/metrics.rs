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
        drop(self.handles(export));
    }

    /// The handles of export `export`, for one connection: counted as open until it
    /// is dropped.
    pub(crate) fn connection(&self, export: &str) -> ConnectionMetrics {
        let handles = self.handles(export);
        handles.connections.inc();
        handles.connections_total.inc();
        ConnectionMetrics(handles)
    }

    /// Every series of export `export` (made at zero if missing).
    fn handles(&self, export: &str) -> ExportHandles {
        let labels = ExportLabels {
            export: export.to_owned(),
        };
        let by_command = |command| CommandLabels {
            export: export.to_owned(),
            command,
        };
        ExportHandles {
            requests: COMMANDS.map(|c| self.requests.get_or_create(&by_command(c)).clone()),
            errors: COMMANDS.map(|c| self.errors.get_or_create(&by_command(c)).clone()),
            latency: COMMANDS.map(|c| self.latency.get_or_create(&by_command(c)).clone()),
            read_bytes: self.read_bytes.get_or_create(&labels).clone(),
            write_bytes: self.write_bytes.get_or_create(&labels).clone(),
            connections: self.connections.get_or_create(&labels).clone(),
            connections_total: self.connections_total.get_or_create(&labels).clone(),
        }
    }
}

/// Every series of one export.
#[derive(Debug)]
struct ExportHandles {
    requests: [Counter; 7],
    errors: [Counter; 7],
    latency: [Histogram; 7],
    read_bytes: Counter,
    write_bytes: Counter,
    connections: Gauge,
    connections_total: Counter,
}

/// One connection's handles into its export's metrics; the connection is counted as
/// open until this is dropped.
#[derive(Debug)]
pub(crate) struct ConnectionMetrics(ExportHandles);

impl ConnectionMetrics {
    /// Counts a request of `command` that took `elapsed` and succeeded or not.
    pub(crate) fn observe(&self, command: &Command, ok: bool, elapsed: Duration) {
        let Some(i) = command_index(command) else {
            return;
        };
        let h = &self.0;
        h.requests[i].inc();
        if !ok {
            h.errors[i].inc();
        }
        h.latency[i].observe(elapsed.as_secs_f64());
        if ok {
            match command {
                Command::Read { length, .. } => {
                    h.read_bytes.inc_by(u64::from(*length));
                }
                Command::Write { length, .. } => {
                    h.write_bytes.inc_by(u64::from(*length));
                }
                _ => {}
            }
        }
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.0.connections.dec();
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
