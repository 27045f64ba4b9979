//! What a node is told: typed configurations for the two roles, built by the binary from its
//! flags, and what a node opens on its host ([`Host`]).

use crate::api::{ApiFn, StatusFn};
use crate::error::PairError;
use crate::link::{AckMode, BatchPolicy};
pub use crate::receiver::AckTimer;
use ft_core::disk::DiskMode;
use ft_core::live::{Clock, NetQueue, SerialSource};
use logging_channel::ChannelConfig;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmm::VmConfig;

/// What a node opens on its host, when it needs it: the serial line, the NIC's tap, the API
/// socket and the metrics endpoint. A backup opens the serial line and the tap only when it goes
/// live.
pub trait Host: Send + Sync {
    /// Where the guest's serial input comes from (a fresh source each call).
    fn serial_input(&self) -> Result<SerialSource, PairError>;
    /// Where the guest's serial output goes (released by the output rule).
    fn serial_output(&self) -> Result<Box<dyn Write + Send>, PairError>;
    /// On a backup that follows: where the serial output its primary released goes, if
    /// anywhere (the recent output this side's console shows once it goes live).
    fn serial_released(&self) -> Option<ft_core::replay::SerialTap> {
        None
    }
    /// The NIC's host side, if the machine has one: the tap, opened, with a thread reading its
    /// frames into the queue the boundary delivers from.
    fn net(&self, config: &VmConfig) -> Result<Option<(vmm::tap::Tap, Arc<NetQueue>)>, PairError>;
    /// Starts serving the API socket and the metrics, if asked for; they stop when the guard
    /// returned is dropped.
    fn serve(&self, api: ApiFn, status: StatusFn) -> Result<Box<dyn Send>, PairError>;
}

/// How the guest runs live (a primary, or a backup once it went live).
#[derive(Clone, Debug)]
pub struct LiveConfig {
    /// What guest time follows.
    pub clock: Clock,
    /// How long a due tick may wait for an exit before a kick delivers it.
    pub checkpoint_bound: Duration,
    /// Serial input is held back until the guest printed this (a primary from its start only).
    pub input_after: Option<Vec<u8>>,
    /// Checkpoint pages travel as deltas.
    pub checkpoint_delta: bool,
}

/// What both sides of a pair share.
#[derive(Clone)]
pub struct PairConfig {
    /// The logging channel: key, log buffer, failure timeout.
    pub channel: ChannelConfig,
    /// When an output may leave the primary.
    pub ack: AckMode,
    /// The backup's replay may lag this much virtual time before the primary slows.
    pub max_lag: Duration,
    /// A backup still more than `max_lag` behind at the end of every throttle for this long is
    /// dropped: the primary runs on, unprotected until a backup attaches. None keeps it however
    /// far behind.
    pub drop_lagging_after: Option<Duration>,
    /// When the primary's log batches leave.
    pub batch: BatchPolicy,
    /// When the backup acknowledges besides at outputs and once its replay has used up what
    /// arrived: every 20 ms while it is behind, or whenever anything moved (`--ack-timer`).
    pub ack_timer: AckTimer,
    /// Where the pair arbitrates (`file:PATH`, `etcd:...`), if anywhere.
    pub lock: Option<String>,
    /// Where the guest's disk is kept: one image both hosts reach, or a copy on each.
    pub disk: DiskMode,
}

impl PairConfig {
    /// What a pair with this configuration refuses to run with: a mirrored disk needs a lock
    /// that a majority keeps (etcd), because there is no shared storage for the lock to live
    /// on and a file only one host sees decides nothing.
    pub(crate) fn check(&self) -> Result<(), PairError> {
        if self.disk == DiskMode::Mirrored
            && !self.lock.as_deref().is_some_and(|l| l.starts_with("etcd:"))
        {
            return Err(PairError::Config(
                "--disk-mode mirrored needs --lock etcd:...: the sides share no storage, so a \
                 file lock would be on one host only and could not prevent a split brain"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The identity both sides of a pair must share: the machine's (`vmm::config_identity`) and
/// the disk mode, so that a backup of the other mode is refused at its hello.
pub(crate) fn identity(machine: &VmConfig, disk: DiskMode) -> Result<(u64, String), PairError> {
    let (hash, mut summary) = vmm::config_identity(machine, &vmm::vm::kernel_cmdline(machine))?;
    if disk == DiskMode::Shared {
        return Ok((hash, summary));
    }
    summary.push_str(&format!(", disk {disk}"));
    Ok((u64::from(crc32c::crc32c(summary.as_bytes())), summary))
}

/// A primary: runs the guest and accepts backups on `listen`.
#[derive(Clone)]
pub struct PrimaryConfig {
    /// The machine.
    pub machine: VmConfig,
    /// The pair.
    pub pair: PairConfig,
    /// The live side.
    pub live: LiveConfig,
    /// Where backups attach.
    pub listen: String,
    /// Start from this snapshot instead of booting.
    pub restore: Option<PathBuf>,
}

/// A backup: attaches to `primary`, follows it, and takes over when it is lost.
#[derive(Clone)]
pub struct BackupConfig {
    /// The machine (the primary's machine flags).
    pub machine: VmConfig,
    /// The pair.
    pub pair: PairConfig,
    /// The live side it becomes.
    pub live: LiveConfig,
    /// The primary's address.
    pub primary: String,
    /// Where it accepts a backup once it went live (any port on the loopback if unset).
    pub listen: Option<String>,
}
