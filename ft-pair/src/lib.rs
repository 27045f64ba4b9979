//! ft-pair: the fault-tolerant pair of ftvmm, both halves side by side.
//!
//! ```text
//!  primary::run                                     backup::run
//!    golive::build (recorder, link, held disk)        attach::receive_vm (hello, pre-copy, final)
//!    Services: releaser, pair manager                 receiver::BackupLink -> Replayer
//!      attach (greet, pre-copy, final snapshot) ====>   Takeover (ft-core) at the log's end:
//!      resync, switchover, arbitrate                      arbitrate::race, then golive::takeover
//!    link: stream, output rule ------- Log / Ack ---->      (the same build as a primary's)
//! ```
//!
//! The determinism boundary it builds on is ft-core (no network there); the wire is
//! logging-channel; the arbitration lock is [`lock`]. The `ftvmm` binary turns its flags into a
//! [`config::PrimaryConfig`] or [`config::BackupConfig`], runs the node, and reports the
//! [`Finished`] run.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod arbitrate;
mod attach;
pub mod backup;
pub mod config;
pub mod console;
pub mod error;
mod golive;
pub mod link;
pub mod lock;
pub mod metrics;
pub mod mirror;
pub mod primary;
pub mod receiver;
pub mod serve;
pub mod sidecar;
pub mod standby;
pub mod status;
/// The pair's protocol tested in one process, without KVM (attach, resync, switchover,
/// arbitration); the process-level tests are the `tests` crate's.
#[cfg(test)]
mod testing;

pub use attach::AttachReport;
pub use error::PairError;
pub use primary::{Ending, HandedOverTo, TakeoverRecord};

/// A node's run, for the caller to report (snapshot, statistics, digest line) and to turn into
/// an exit status.
pub struct Finished {
    /// The VM, stopped.
    pub vm: vmm::Vm,
    /// How its vCPU loop ended.
    pub result: Result<vmm::vcpu::Stop, vmm::VmError>,
    /// How the node ended.
    pub end: End,
}

/// How a node ended.
pub enum End {
    /// As a primary: from its start, or a backup that went live.
    Primary(Ending),
    /// As a backup whose replay ended: the primary's guest stopped, or an error.
    Backup,
    /// As a backup whose primary is lost, with no takeover (no lock, a divergence that was not
    /// healed, a channel that broke, or the stream ended otherwise).
    PrimaryLost {
        /// Why this backup does not take over, for the run's last words.
        reason: String,
    },
    /// As a backup of a mirrored disk whose replay diverged (its copy differs from the
    /// primary's, found by a replayed read or by `ctl verify-disk`): it left the primary and
    /// attaches again, which brings its copy up to date with the blocks that differ.
    Reattach {
        /// The primary to attach to.
        primary: String,
        /// The divergence, for the next run's status and log.
        reason: String,
    },
    /// As a backup whose primary is lost but which may not take over: it lost the lock or could
    /// not reach it.
    Fenced {
        /// The race's outcome, or why the live side could not be built.
        why: String,
    },
}
