//! The pair's figures (`ftvmm --metrics ADDR`) for Prometheus, at `GET /metrics` in the OpenMetrics
//! text format (encoded by the `prometheus-client` crate).
//!
//! Every metric is read from the same typed status `ftvmm ctl status` prints
//! ([`ft_pair::status::Status`]), at scrape time, so the two never disagree and a metric cannot
//! lose its field silently; docs/OPERATIONS.md lists them. The HTTP side is a small blocking
//! server on its own thread: one request per connection, GET only, bounded reads.

use crate::api::StatusFn;
use crate::serve::{socket, AcceptLoop, ServeError};
use crate::status::{BackupStatus, PrimaryStatus, Status};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// What a metric is in Prometheus' terms.
#[derive(Clone, Copy)]
enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A count that only grows (exposed with the `_total` suffix).
    Counter,
}

/// A figure of a primary's status.
type OfPrimary = Option<fn(&PrimaryStatus) -> f64>;
/// A figure of a backup's status.
type OfBackup = Option<fn(&BackupStatus) -> f64>;

/// One metric: its name (without `ftvmm_`), help, kind, the field of each role's status it
/// reads (none: the role has no such figure, and the metric is left out), and the factor from
/// that value to the metric's unit.
struct Metric {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    primary: OfPrimary,
    backup: OfBackup,
    scale: f64,
}

const fn m(
    name: &'static str,
    help: &'static str,
    kind: Kind,
    primary: OfPrimary,
    backup: OfBackup,
    scale: f64,
) -> Metric {
    Metric {
        name,
        help,
        kind,
        primary,
        backup,
        scale,
    }
}

/// Every metric, primary and backup alike; one a role does not have is left out.
const METRICS: &[Metric] = &[
    m(
        "protected",
        "1 while a backup follows this primary (or this backup follows its primary)",
        Kind::Gauge,
        Some(|s| f64::from(u8::from(s.protected))),
        Some(|s| f64::from(u8::from(s.protected))),
        1.0,
    ),
    m(
        "epoch",
        "The pair's epoch in the lock",
        Kind::Gauge,
        Some(|s| s.epoch as f64),
        Some(|s| s.epoch as f64),
        1.0,
    ),
    m(
        "lag_seconds",
        "How far the backup's replay is behind the primary, in guest virtual time",
        Kind::Gauge,
        Some(|s| s.lag.vtime_ns as f64),
        Some(|s| s.lag.vtime_ns as f64),
        1e-9,
    ),
    m(
        "lag_records",
        "Log records sent (primary) or received (backup) and not yet replayed by the backup",
        Kind::Gauge,
        Some(|s| s.lag.records as f64),
        Some(|s| s.lag.records as f64),
        1.0,
    ),
    m(
        "log_records_sent",
        "Log records sent to the current backup",
        Kind::Counter,
        Some(|s| s.log.sent as f64),
        None,
        1.0,
    ),
    m(
        "log_records_received",
        "Log records the backup holds",
        Kind::Counter,
        Some(|s| s.log.received as f64),
        Some(|s| s.log.received as f64),
        1.0,
    ),
    m(
        "log_records_executed",
        "Log records the backup has replayed",
        Kind::Counter,
        Some(|s| s.log.executed as f64),
        Some(|s| s.log.executed as f64),
        1.0,
    ),
    m(
        "log_bytes",
        "Log bytes sent to backups, all streams",
        Kind::Counter,
        Some(|s| s.log.bytes as f64),
        None,
        1.0,
    ),
    m(
        "log_buffered_bytes",
        "Log bytes the backup holds and has not replayed",
        Kind::Gauge,
        None,
        Some(|s| s.log.buffered_bytes as f64),
        1.0,
    ),
    m(
        "outputs_held",
        "Outputs (serial, disk writes, frames) held for the backup's acknowledgement",
        Kind::Gauge,
        Some(|s| s.outputs_held as f64),
        None,
        1.0,
    ),
    m(
        "outputs_held_bytes",
        "Bytes of the outputs held",
        Kind::Gauge,
        Some(|s| s.outputs_held_bytes as f64),
        None,
        1.0,
    ),
    m(
        "outputs_released",
        "Outputs released",
        Kind::Counter,
        Some(|s| s.outputs_released as f64),
        None,
        1.0,
    ),
    m(
        "output_latency_p50_seconds",
        "Median time an output was held (last 4096)",
        Kind::Gauge,
        Some(|s| s.output_latency_us.p50 as f64),
        None,
        1e-6,
    ),
    m(
        "output_latency_p99_seconds",
        "99th percentile of the time an output was held (last 4096)",
        Kind::Gauge,
        Some(|s| s.output_latency_us.p99 as f64),
        None,
        1e-6,
    ),
    m(
        "throttled",
        "Times the vCPU was slowed because the backup lagged more than --max-lag",
        Kind::Counter,
        Some(|s| s.lag.throttled as f64),
        None,
        1.0,
    ),
    m(
        "lag_exceeded",
        "Times the backup stayed more than --max-lag behind through a whole throttle and the vCPU went on",
        Kind::Counter,
        Some(|s| s.lag.exceeded as f64),
        None,
        1.0,
    ),
    m(
        "lag_dropped",
        "Backups dropped because they stayed more than --max-lag behind for --drop-lagging-after",
        Kind::Counter,
        Some(|s| s.lag.dropped as f64),
        None,
        1.0,
    ),
    m(
        "kept_output_bytes",
        "Bytes of replayed output the backup keeps until the primary releases it",
        Kind::Gauge,
        None,
        Some(|s| s.kept_output_bytes as f64),
        1.0,
    ),
    m(
        "checkpoints",
        "Checkpoints recorded (a paused guest's dirty pages, where no exit came)",
        Kind::Counter,
        Some(|s| s.checkpoints as f64),
        None,
        1.0,
    ),
    m(
        "checkpoint_bytes",
        "Bytes of the checkpoints recorded",
        Kind::Counter,
        Some(|s| s.checkpoint_bytes as f64),
        None,
        1.0,
    ),
    m(
        "divergences",
        "Divergences the backup found",
        Kind::Counter,
        None,
        Some(|s| s.divergences as f64),
        1.0,
    ),
    m(
        "resyncs",
        "Full snapshots sent (primary) or restored (backup) after a divergence",
        Kind::Counter,
        Some(|s| s.resyncs as f64),
        Some(|s| s.resyncs as f64),
        1.0,
    ),
    m(
        "disk_verifications",
        "Comparisons of the two copies of a mirrored disk at one log position (ctl verify-disk)",
        Kind::Counter,
        Some(|s| s.disk_checks as f64),
        Some(|s| s.disk_checks as f64),
        1.0,
    ),
    m(
        "disk_verify_mismatches",
        "Comparisons of the two copies of a mirrored disk that found them different",
        Kind::Counter,
        Some(|s| s.disk_mismatches as f64),
        Some(|s| s.disk_mismatches as f64),
        1.0,
    ),
    m(
        "disk_verify_seconds",
        "How long this side took for the last comparison of the copies",
        Kind::Gauge,
        Some(|s| s.last_disk_check.as_ref().map_or(0.0, |c| c.ms)),
        Some(|s| s.last_disk_check.as_ref().map_or(0.0, |c| c.ms)),
        1e-3,
    ),
    m(
        "attaches",
        "Backups attached",
        Kind::Counter,
        Some(|s| s.attaches as f64),
        None,
        1.0,
    ),
    m(
        "backups_refused",
        "Backups refused (another attached, other machine flags, wrong key)",
        Kind::Counter,
        Some(|s| s.backups_refused as f64),
        None,
        1.0,
    ),
    m(
        "switchovers",
        "Planned switchovers this primary handed its guest over in",
        Kind::Counter,
        Some(|s| s.switchovers as f64),
        None,
        1.0,
    ),
    m(
        "channel_sent_bytes",
        "Bytes sent on the logging channel",
        Kind::Counter,
        Some(|s| s.channel.bytes_sent as f64),
        Some(|s| s.channel.bytes_sent as f64),
        1.0,
    ),
    m(
        "channel_received_bytes",
        "Bytes received on the logging channel",
        Kind::Counter,
        Some(|s| s.channel.bytes_received as f64),
        Some(|s| s.channel.bytes_received as f64),
        1.0,
    ),
    m(
        "channel_max_silence_seconds",
        "Longest gap between two messages from the peer",
        Kind::Gauge,
        Some(|s| s.channel.max_silence_ms),
        Some(|s| s.channel.max_silence_ms),
        1e-3,
    ),
    m(
        "channel_max_unacked_seconds",
        "Longest time the channel's data waited for the peer's host to acknowledge it",
        Kind::Gauge,
        Some(|s| s.channel.max_unacked_ms),
        Some(|s| s.channel.max_unacked_ms),
        1e-3,
    ),
    m(
        "channel_max_quiet_seconds",
        "Longest silence of the peer held against it (nothing of it unread meanwhile)",
        Kind::Gauge,
        Some(|s| s.channel.max_quiet_ms),
        Some(|s| s.channel.max_quiet_ms),
        1e-3,
    ),
    m(
        "channel_slow_peer",
        "Times the peer was silent for two heartbeats or more while its host acknowledged",
        Kind::Counter,
        Some(|s| s.channel.slow_peer_episodes as f64),
        Some(|s| s.channel.slow_peer_episodes as f64),
        1.0,
    ),
    m(
        "uptime_seconds",
        "Seconds since this side became a primary",
        Kind::Gauge,
        Some(|s| s.uptime_s),
        None,
        1.0,
    ),
];

/// The metrics of one status document, in the OpenMetrics text format.
pub(crate) fn render(status: &Status) -> String {
    let mut registry = Registry::with_prefix("ftvmm");
    let role = status.role().to_string();
    let roles = Family::<Vec<(String, String)>, Gauge>::default();
    roles.get_or_create(&vec![("role".into(), role)]).set(1);
    registry.register(
        "role",
        "What this ftvmm is now: primary or backup (1 on the current role)",
        roles,
    );
    let (failovers, fenced_now) = match status {
        Status::Primary(p) => (
            p.takeovers.iter().filter(|r| !r.planned).count() as u64,
            p.fenced.is_some(),
        ),
        Status::Backup(_) | Status::Standby(_) => (0, false),
    };
    let c = Counter::<u64>::default();
    c.inc_by(failovers);
    registry.register(
        "failovers",
        "Takeovers this process made after losing its primary (switchovers not counted)",
        c,
    );
    let fenced = Gauge::<i64>::default();
    fenced.set(i64::from(fenced_now));
    registry.register(
        "fenced",
        "1 once this side lost the lock and stopped",
        fenced,
    );
    standby_metrics(&mut registry, status);
    for metric in METRICS {
        let value = match status {
            Status::Primary(p) => metric.primary.map(|f| f(p)),
            Status::Backup(b) => metric.backup.map(|f| f(b)),
            Status::Standby(_) => None,
        };
        let Some(value) = value.map(|v| v * metric.scale) else {
            continue;
        };
        match metric.kind {
            Kind::Gauge => {
                let g = Gauge::<f64, AtomicU64>::default();
                g.set(value);
                registry.register(metric.name, metric.help, g);
            }
            Kind::Counter => {
                let c = Counter::<f64, AtomicU64>::default();
                c.inc_by(value.max(0.0));
                registry.register(metric.name, metric.help, c);
            }
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

/// A standby's metrics (also of a backup or primary started as one), and a primary's time
/// from its last takeover to protected again.
fn standby_metrics(registry: &mut Registry, status: &Status) {
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(value);
        registry.register(name, help, g);
    };
    let (figures, waiting) = match status {
        Status::Primary(p) => {
            if let Some(ms) = p.takeovers.last().and_then(|t| t.protected_again_ms) {
                gauge(
                    registry,
                    "protected_again_seconds",
                    "From the end of the lost primary's stream to the next backup attached, for this side's last takeover",
                    ms / 1e3,
                );
            }
            (p.standby.as_ref(), false)
        }
        Status::Backup(b) => (b.standby.as_ref(), false),
        Status::Standby(s) => (Some(&s.figures), true),
    };
    let Some(f) = figures else {
        return;
    };
    gauge(
        registry,
        "standby_waiting",
        "1 while this standby waits for a live side to attach to",
        f64::from(u8::from(waiting)),
    );
    for (name, help, value) in [
        (
            "standby_attach_attempts",
            "Attempts of this standby to attach to the live side",
            f.attach_attempts,
        ),
        (
            "standby_refusals",
            "Attempts of this standby the live side refused",
            f.refusals,
        ),
        (
            "standby_attaches",
            "Attempts of this standby that attached it as the backup",
            f.attaches,
        ),
    ] {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        registry.register(name, help, c);
    }
}

/// The metrics server; stops when dropped.
pub struct MetricsServer {
    _accept: AcceptLoop,
}

/// Serves the metrics of `status` at `http://addr/metrics` (`addr` as `host:port`; port 0
/// picks one, and the address bound is logged).
pub fn serve(addr: &str, status: StatusFn) -> Result<MetricsServer, ServeError> {
    let listener =
        TcpListener::bind(addr).map_err(socket(format!("--metrics: cannot listen on {addr}")))?;
    listener
        .set_nonblocking(true)
        .map_err(socket(format!("--metrics {addr}")))?;
    let bound = listener
        .local_addr()
        .map_or_else(|_| addr.to_string(), |a| a.to_string());
    tracing::warn!("metrics at http://{bound}/metrics");
    let accept = AcceptLoop::spawn(
        "metrics",
        move || listener.accept().map(|(stream, _)| stream),
        move |stream| answer(stream, &status),
    )?;
    Ok(MetricsServer { _accept: accept })
}

/// The longest request head read.
const MAX_HEAD: usize = 8192;

fn answer(mut stream: TcpStream, status: &StatusFn) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (code, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(&status()),
        ),
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "ftvmm: metrics at /metrics\n".to_string(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PrimaryLag, PrimaryLog};
    use crate::TakeoverRecord;

    #[test]
    fn a_status_document_becomes_metrics() {
        let status = Status::Primary(Box::new(PrimaryStatus {
            role: "primary",
            protected: true,
            epoch: 3,
            lag: PrimaryLag {
                vtime_ns: 25_000_000,
                records: 4,
                throttled: 0,
                exceeded: 0,
                dropped: 0,
            },
            log: PrimaryLog {
                sent: 10,
                bytes: 4096,
                ..PrimaryLog::default()
            },
            outputs_held: 2,
            takeovers: vec![TakeoverRecord {
                at_unix_s: 0,
                epoch: 2,
                from: "10.0.0.1:7000".into(),
                why: "the primary is lost".into(),
                planned: false,
                detect_ms: 0.0,
                go_live_ms: 0.0,
                protected_again_ms: Some(1250.0),
                lost_at: std::time::Instant::now(),
            }],
            fenced: None,
            checkpoints: 7,
            ..PrimaryStatus::default()
        }));
        let text = render(&status);
        for want in [
            "ftvmm_role{role=\"primary\"} 1",
            "ftvmm_protected 1",
            "ftvmm_epoch 3",
            "ftvmm_lag_seconds 0.025",
            "ftvmm_log_bytes_total 4096",
            "ftvmm_outputs_held 2",
            "ftvmm_failovers_total 1",
            "ftvmm_fenced 0",
            "ftvmm_checkpoints_total 7",
            "ftvmm_protected_again_seconds 1.25",
            "# TYPE ftvmm_log_bytes counter",
            "# EOF",
        ] {
            assert!(text.contains(want), "no `{want}` in:\n{text}");
        }
        // A figure the role does not have is left out, not shown as 0.
        assert!(!text.contains("ftvmm_divergences"), "{text}");
    }
}
