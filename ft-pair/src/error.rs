//! How the pair fails. One enum for what stops a node or one of its operations
//! ([`PairError`]), one for a switchover that did not happen ([`SwitchoverError`]), one for why
//! a backup does not take over ([`NoTakeover`]). Each variant's `#[error]` string is its
//! message; its doc comment says when it happens. The exit status is not decided here: a node's run ends in a [`crate::End`], which
//! the binary turns into one.

use crate::arbitrate::Lost;
use crate::lock::LockError;
use ft_core::BoundaryError;
use logging_channel::ChannelError;
use std::io;
use thiserror::Error;
use vmm::snapshot::SnapshotError;
use vmm::transfer::TransferError;
use vmm::VmError;

/// What stops a node, or one of its operations.
#[derive(Debug, Error)]
pub enum PairError {
    /// The host side of a node could not be set up: the serial line, the tap device, the API
    /// socket or the metrics endpoint (the binary's error, as it worded it).
    #[error("{0}")]
    Host(Box<dyn std::error::Error + Send + Sync>),
    /// A configuration the pair refuses to run with (the reason is the message).
    #[error("{0}")]
    Config(String),
    /// The lock: opening, claiming, racing.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A mirrored copy a primary may not start on (docs/OPERATIONS.md, "Disk modes"), or whose
    /// sidecar does not read.
    #[error("{0}")]
    StaleCopy(String),
    /// Building, restoring or running the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The boundary: the recorder, the replayer, the event log.
    #[error(transparent)]
    Boundary(#[from] BoundaryError),
    /// A snapshot that does not decode or encode.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A state-transfer message that does not encode (a received one that does not decode is
    /// the primary's fault: [`PairError::Primary`]).
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The logging channel.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A logging-channel operation failed; `context` says which one (connecting to the primary,
    /// sending a page round, ...).
    #[error("{context}: {source}")]
    ChannelAt {
        /// What was being done.
        context: String,
        /// The channel's error.
        source: ChannelError,
    },
    /// A system call failed outside the VM and the channel (starting a thread, opening a
    /// file); `context` says what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The system's error.
        source: io::Error,
    },
    /// The primary answered this backup's `Hello` with `Refused`: another protocol version,
    /// machine flags that differ, or a primary that already has a backup.
    #[error("the primary {addr} refused this backup: {reason}")]
    Refused {
        /// The primary.
        addr: String,
        /// What it said.
        reason: String,
    },
    /// The primary broke the protocol: a message out of place during the attach, or a log stream
    /// the backup's replayer cannot read.
    #[error("primary {addr}: {what}")]
    Primary {
        /// The primary.
        addr: String,
        /// What it did.
        what: String,
    },
    /// The backup's connection died during an attach; the string is the channel's reason.
    #[error("{0}")]
    BackupLost(String),
    /// The backup sent what the attach does not allow there; the string says what.
    #[error("the backup broke the attach: {0}")]
    BackupBroke(String),
    /// The vCPU thread answered a control request (pause, snapshot, dirty pages) with a refusal;
    /// the string is its reason.
    #[error("{0}")]
    VcpuRefused(String),
    /// The vCPU thread had already stopped (the guest exited or failed) when a control request
    /// reached it.
    #[error("the guest stopped")]
    GuestStopped,
    /// The vCPU thread answered a control request with a response of another kind (a bug); the
    /// string is that response, `Debug`-formatted.
    #[error("unexpected answer {0}")]
    UnexpectedAnswer(String),
}

impl PairError {
    /// An I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> PairError {
        let context = context.into();
        move |source| PairError::Io { context, source }
    }

    /// A channel error with what was being done.
    pub(crate) fn channel(context: impl Into<String>) -> impl FnOnce(ChannelError) -> PairError {
        let context = context.into();
        move |source| PairError::ChannelAt { context, source }
    }
}

/// A planned switchover that did not happen, and where that leaves this side.
#[derive(Debug, Error)]
pub enum SwitchoverError {
    /// A switchover was asked for while the primary is not protected (no backup attached, or
    /// one still attaching); the string is the primary's mode.
    #[error("no backup to hand over to: this primary is {0}")]
    NoBackup(String),
    /// The drain before the handover failed; the guest was resumed on this side, which stays the
    /// primary.
    #[error("switchover to {peer} abandoned, the guest runs on here: {source}")]
    Abandoned {
        /// The backup's address.
        peer: String,
        /// What went wrong in the drain or the handover.
        source: Handover,
    },
    /// The handover was sent but the backup did not confirm it, and this side then lost the lock
    /// (or could not reach it): its guest is stopped for good.
    #[error("{why}; this side is fenced")]
    Fenced {
        /// Why the backup did not take the guest.
        why: String,
    },
    /// The handover was sent but the backup did not confirm it; this side won the lock and resumed
    /// its guest, with no backup.
    #[error("{why}; this side won the lock and runs on, UNPROTECTED")]
    RunsOn {
        /// Why the backup did not take the guest.
        why: String,
    },
    /// The pair manager could not pause or resume the guest.
    #[error(transparent)]
    Pair(#[from] PairError),
}

/// Why a handover (the drain, then the backup's confirmation) failed.
#[derive(Debug, Error)]
pub enum Handover {
    /// The backup's connection died, or the primary left protected mode, before the backup had
    /// acknowledged the whole log.
    #[error("the backup was lost while the log drained")]
    LostWhileDraining,
    /// The held output was not all released within the switchover limit; the number is that
    /// limit, in seconds.
    #[error("the backup did not acknowledge the log within {0} s")]
    NotAcknowledged(u64),
    /// The backup answered the handover with `Refused`; the string is its reason.
    #[error("it declined: {0}")]
    Declined(String),
    /// The backup closed the connection (a `Bye`) instead of confirming; the string is its reason.
    #[error("it left: {0}")]
    Left(String),
    /// No `HandedOver` arrived within the switchover limit; the number is that limit, in seconds.
    #[error("it did not confirm within {0} s")]
    NotConfirmed(u64),
    /// The connection failed while sending the handover or waiting for its confirmation; the
    /// string is the channel's reason.
    #[error("{0}")]
    Channel(String),
    /// Flushing the log before the drain failed.
    #[error(transparent)]
    Boundary(#[from] BoundaryError),
}

/// Why a backup does not go live at the end of its log.
#[derive(Debug, Error)]
pub enum NoTakeover {
    /// The stream ended, and this backup has no `--lock` to arbitrate with, so it cannot rule out
    /// a primary that still runs.
    #[error(
        "{why}; without --lock a backup never takes over (it could not rule out a live primary)"
    )]
    NoLock {
        /// Why the stream ended.
        why: String,
    },
    /// The stream ended and the race for the lock was lost: the other side holds it, or it could
    /// not be reached.
    #[error("{why}; {lost}")]
    Lost {
        /// Why the stream ended.
        why: String,
        /// The race's outcome.
        lost: Lost,
        /// It was a planned switchover (the old primary stops anyway), not a loss.
        planned: bool,
    },
    /// The primary ended the stream on purpose (a `Bye` or a refusal), so there is nothing to
    /// take over; the string is its reason.
    #[error("{0}")]
    Ended(String),
    /// The primary was lost while this backup waited for a resync after a divergence: its
    /// state is not the primary's, so it may not go live, and it does not race for the lock (a
    /// primary that still runs, behind a partition, keeps the guest).
    #[error("{why}; this backup diverged ({divergence}) and was waiting for a resync: {because}; it does not race for the lock")]
    Diverged {
        /// Why the stream ended.
        why: String,
        /// The divergence.
        divergence: String,
        /// Why it may not go on from the last state it verified.
        because: String,
    },
}
