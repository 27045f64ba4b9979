//! The status of a node, as one typed document: `ftvmm ctl status` prints it (JSON) and the
//! metrics endpoint reads it, so the two never disagree and a field cannot go missing from one
//! of them without the compiler noticing. docs/OPERATIONS.md lists every field.

use crate::attach::AttachReport;
use crate::primary::TakeoverRecord;
use ft_core::disk::DiskCheck;
use serde::Serialize;

/// What a node reports: a primary's document, or a backup's.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Status {
    /// A primary (also a backup that went live).
    Primary(Box<PrimaryStatus>),
    /// A backup following its primary.
    Backup(Box<BackupStatus>),
    /// A standby waiting for the live side to accept it as its backup.
    Standby(Box<StandbyStatus>),
}

impl Status {
    /// `primary`, `backup` or `standby`.
    pub fn role(&self) -> &'static str {
        match self {
            Status::Primary(_) => "primary",
            Status::Backup(_) => "backup",
            Status::Standby(_) => "standby",
        }
    }

    /// The same document with a standby's figures in it: a standby that attached answers as
    /// the backup (or the primary) it became, and says what it did as a standby.
    pub fn with_standby(mut self, figures: StandbyFigures) -> Status {
        match &mut self {
            Status::Primary(p) => p.standby = Some(figures),
            Status::Backup(b) => b.standby = Some(figures),
            Status::Standby(_) => {}
        }
        self
    }

    /// The document as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        // A tree of plain fields: serialising it cannot fail (non-finite floats become null).
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// The channel's traffic, either side.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChannelFigures {
    /// Bytes sent on the logging channel.
    pub bytes_sent: u64,
    /// Bytes received on it.
    pub bytes_received: u64,
    /// Both directions, per second since the last status (primary only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_s: Option<f64>,
    /// Messages sent on the logging channel, of every kind.
    pub msgs_sent: u64,
    /// Messages received on it.
    pub msgs_received: u64,
    /// Heartbeats among the messages sent.
    pub heartbeats_sent: u64,
    /// Longest gap between two messages from the peer, ms.
    pub max_silence_ms: f64,
    /// The longest the channel's data waited for the peer's host to acknowledge it, ms (against
    /// `--unacked-timeout`).
    pub max_unacked_ms: f64,
    /// The longest silence of the peer held against it (against `--failover-timeout`), ms:
    /// `max_silence_ms` without the times this side's own reader fell behind.
    pub max_quiet_ms: f64,
    /// Times the peer was silent for two heartbeats or more while its host still acknowledged
    /// (waited for, up to `--failover-timeout`).
    pub slow_peer_episodes: u64,
    /// The peer is slow now.
    pub peer_slow: bool,
    /// The nice value the network threads (heartbeats, failure detector) run at; null when they
    /// could not raise it (`--channel-nice` needs CAP_SYS_NICE).
    pub nice: Option<i32>,
}

impl ChannelFigures {
    /// The figures of a connection's counters (`bytes_per_s` left out).
    pub fn of(stats: &logging_channel::ChannelStats) -> ChannelFigures {
        ChannelFigures {
            bytes_sent: stats.bytes_sent,
            bytes_received: stats.bytes_received,
            bytes_per_s: None,
            msgs_sent: stats.msgs_sent,
            msgs_received: stats.msgs_received,
            heartbeats_sent: stats.heartbeats_sent,
            max_silence_ms: stats.max_silence_us as f64 / 1e3,
            max_unacked_ms: stats.max_unacked_us as f64 / 1e3,
            max_quiet_ms: stats.max_quiet_us as f64 / 1e3,
            slow_peer_episodes: stats.slow_peer_episodes,
            peer_slow: stats.peer_slow,
            nice: logging_channel::network_nice(),
        }
    }
}

/// A primary's log figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PrimaryLog {
    /// Records of the current stream sent.
    pub sent: u64,
    /// Records the backup holds.
    pub received: u64,
    /// Records the backup has replayed.
    pub executed: u64,
    /// Log bytes sent to backups, all streams.
    pub bytes: u64,
    /// Log batches sent to backups, all streams.
    pub batches: u64,
    /// The frames of those batches before compression, bytes.
    pub raw_bytes: u64,
}

/// How far the backup is behind, from the primary's side.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PrimaryLag {
    /// Records sent and not replayed.
    pub records: u64,
    /// Virtual time between the last record sent and the backup's replay, ns.
    pub vtime_ns: u64,
    /// Times the vCPU was slowed because the backup lagged.
    pub throttled: u64,
    /// Times the backup stayed more than `--max-lag` behind through a whole throttle (1 s) and
    /// the vCPU went on anyway: the bound did not hold.
    pub exceeded: u64,
    /// Backups dropped because they stayed past `--max-lag` through every throttle for
    /// `--drop-lagging-after` (the reason is in `last_backup_lost`).
    pub dropped: u64,
}

/// Percentiles of the time outputs were held, us.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
}

/// A planned switchover this primary made.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchoverReport {
    /// Always `done`.
    pub switchover: &'static str,
    /// Where the new primary accepts backups.
    pub new_primary: String,
    /// What this side does next: `stop` or `backup`.
    pub then: &'static str,
    /// The epoch the guest was handed over at.
    pub epoch: u64,
    /// From the pause to the drained log, ms.
    pub drain_ms: f64,
    /// From the pause to the backup live, ms.
    pub pause_ms: f64,
    /// Before the pause: how long the guest was slowed for the backup to come close, ms.
    pub converge_ms: f64,
    /// Whether the backup came as close as asked before the pause (`false` also when it was
    /// not asked to: `--converge 0`).
    pub converged: bool,
    /// The backup's lag when the guest paused (virtual time), ms: what the pause waited for.
    pub lag_at_pause_ms: f64,
}

/// A primary's status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PrimaryStatus {
    /// `primary`.
    pub role: &'static str,
    /// This host's KVM and the probe's findings (`vmm::host`).
    pub host: vmm::host::HostStatus,
    /// Where backups attach.
    pub listen: String,
    /// The attached backup.
    pub peer: Option<String>,
    /// A backup follows.
    pub protected: bool,
    /// `received` or `executed`.
    pub ack_mode: &'static str,
    /// Seconds since this side became a primary.
    pub uptime_s: f64,
    /// The log stream.
    pub log: PrimaryLog,
    /// The backup's lag.
    pub lag: PrimaryLag,
    /// Outputs held for the backup's acknowledgement.
    pub outputs_held: u64,
    /// Their bytes.
    pub outputs_held_bytes: u64,
    /// Outputs released.
    pub outputs_released: u64,
    /// How long outputs were held (the last 4096).
    pub output_latency_us: Latency,
    /// The channel to the backup.
    pub channel: ChannelFigures,
    /// Backups attached.
    pub attaches: u64,
    /// Backups refused.
    pub backups_refused: u64,
    /// Full snapshots sent after a divergence.
    pub resyncs: u64,
    /// Why the last backup was lost.
    pub last_backup_lost: Option<String>,
    /// The last attach's figures.
    pub attach: Option<AttachReport>,
    /// `unprotected`, `protected`, `arbitrating`, `fenced` or `handedover`.
    pub mode: String,
    /// The lock, if there is one.
    pub lock: Option<String>,
    /// The pair's epoch in the lock.
    pub epoch: u64,
    /// Takeovers this process made (as a backup that went live).
    pub takeovers: Vec<TakeoverRecord>,
    /// Why this side was fenced, once it was.
    pub fenced: Option<String>,
    /// Checkpoints recorded.
    pub checkpoints: u64,
    /// Their bytes.
    pub checkpoint_bytes: u64,
    /// Planned switchovers this primary made.
    pub switchovers: u64,
    /// The last one's figures.
    pub last_switchover: Option<SwitchoverReport>,
    /// Where the guest went in a switchover.
    pub handed_over_to: Option<String>,
    /// Verifications of a mirrored disk (`ctl verify-disk`) the backup answered.
    pub disk_checks: u64,
    /// Those that found the copies different.
    pub disk_mismatches: u64,
    /// The last verification (`pending` until the backup answers).
    pub last_disk_check: Option<DiskCheck>,
    /// This process was started as a standby (`--role standby`): what it did as one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbyFigures>,
}

/// A backup's log figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BackupLog {
    /// Records received.
    pub received: u64,
    /// Records replayed.
    pub executed: u64,
    /// The primary released the outputs of records below this.
    pub released: u64,
    /// Bytes received and not replayed.
    pub buffered_bytes: u64,
}

/// How far the replay is behind, from the backup's side.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BackupLag {
    /// Records received and not replayed.
    pub records: u64,
    /// Exits replayed.
    pub exits_replayed: u64,
    /// The replay's virtual time, ns.
    pub vtime_ns: u64,
}

/// A backup's status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BackupStatus {
    /// `backup`.
    pub role: &'static str,
    /// This host's KVM and the probe's findings (`vmm::host`).
    pub host: vmm::host::HostStatus,
    /// The primary.
    pub peer: String,
    /// Its stream has not ended.
    pub protected: bool,
    /// The log stream.
    pub log: BackupLog,
    /// The replay's lag.
    pub lag: BackupLag,
    /// Replayed disk writes kept until the primary releases them.
    pub kept_writes: usize,
    /// Bytes of replayed output kept.
    pub kept_output_bytes: u64,
    /// The channel to the primary.
    pub channel: ChannelFigures,
    /// Divergences found.
    pub divergences: u64,
    /// Full snapshots restored after a divergence.
    pub resyncs: u64,
    /// How long the attach took, ms.
    pub attach_ms: u64,
    /// Why the stream ended, once it did.
    pub ended: Option<String>,
    /// The pair's epoch the primary attached this backup at.
    pub epoch: u64,
    /// Blocks of a mirrored disk the attach wrote into this side's copy.
    pub attach_disk_blocks: u64,
    /// Why this process attached again, if it did to heal its copy (the previous one's
    /// divergence).
    pub healing: Option<String>,
    /// Verifications of a mirrored disk this backup made (`ctl verify-disk`).
    pub disk_checks: u64,
    /// Those that found the copies different.
    pub disk_mismatches: u64,
    /// The last verification.
    pub last_disk_check: Option<DiskCheck>,
    /// This process was started as a standby (`--role standby`): what it did as one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbyFigures>,
}

/// What a standby did since it was started (kept across the runs of one process: a standby
/// whose backup run ended waits again as the same process).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StandbyFigures {
    /// Attempts to attach to the live side.
    pub attach_attempts: u64,
    /// Attempts the live side refused (it had a backup already, most often).
    pub refusals: u64,
    /// Attempts that ended in a backup attached.
    pub attaches: u64,
    /// What the last attempt came to (`attached to ADDR`, the refusal, the error), or `null`.
    pub last_attempt: Option<String>,
}

/// The live side as a standby last read it from the lock.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LiveSide {
    /// The lock's owner record (`role@host:pid listen=ADDR`).
    pub owner: String,
    /// The pair's epoch in the lock.
    pub epoch: u64,
    /// Where it accepts backups, if its record says.
    pub listen: Option<String>,
}

/// A standby's status, while it waits (once attached it answers as a backup).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StandbyStatus {
    /// `standby`.
    pub role: &'static str,
    /// This host's KVM and the probe's findings (`vmm::host`).
    pub host: vmm::host::HostStatus,
    /// `waiting` (for a live side to attach to, or for the lock to change after a refusal),
    /// or `attaching`.
    pub state: &'static str,
    /// Why it waits, in a sentence.
    pub waiting_for: String,
    /// The lock it watches.
    pub lock: String,
    /// Where it accepts backups once it goes live.
    pub listen: String,
    /// The live side, as the lock last said, or `null` (no owner, or the lock unreadable).
    pub live: Option<LiveSide>,
    /// Seconds since it began waiting this time.
    pub waiting_s: f64,
    /// What it did so far.
    #[serde(flatten)]
    pub figures: StandbyFigures,
}
