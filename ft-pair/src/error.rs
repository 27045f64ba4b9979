//! How the pair fails. One enum for what stops a node or one of its operations
//! ([`PairError`]), one for a switchover that did not happen ([`SwitchoverError`]), one for why
//! a backup does not take over ([`NoTakeover`]). The doc comment of each variant is its
//! message. The exit status is not decided here: a node's run ends in a [`crate::End`], which
//! the binary turns into one.

use crate::arbitrate::Lost;
use crate::lock::LockError;
use ft_core::BoundaryError;
use logging_channel::ChannelError;
use std::io;
use thiserror::Error;
use vmm::snapshot::SnapshotError;
use vmm::VmError;

/// What stops a node, or one of its operations.
#[derive(Debug, Error)]
pub enum PairError {
    /// {0} (what the host could not open: serial line, tap, API socket, metrics)
    #[error("{0}")]
    Host(Box<dyn std::error::Error + Send + Sync>),
    /// The lock: opening, claiming, racing.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Building, restoring or running the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The boundary: the recorder, the replayer, the event log.
    #[error(transparent)]
    Boundary(#[from] BoundaryError),
    /// A snapshot that does not decode.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The logging channel.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// {context}: {source}
    #[error("{context}: {source}")]
    ChannelAt {
        /// What was being done.
        context: String,
        /// The channel's error.
        source: ChannelError,
    },
    /// {context}: {source}
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The system's error.
        source: io::Error,
    },
    /// the primary {addr} refused this backup: {reason}
    #[error("the primary {addr} refused this backup: {reason}")]
    Refused {
        /// The primary.
        addr: String,
        /// What it said.
        reason: String,
    },
    /// primary {addr}: {what} (the primary did what the protocol does not allow there)
    #[error("primary {addr}: {what}")]
    Primary {
        /// The primary.
        addr: String,
        /// What it did.
        what: String,
    },
    /// {0} (the channel to the backup failed)
    #[error("{0}")]
    BackupLost(String),
    /// {0} (the vCPU refused a request)
    #[error("{0}")]
    VcpuRefused(String),
    /// the guest stopped
    #[error("the guest stopped")]
    GuestStopped,
    /// unexpected answer {0}
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
    /// no backup to hand over to: this primary is {0}
    #[error("no backup to hand over to: this primary is {0}")]
    NoBackup(String),
    /// switchover to {peer} abandoned, the guest runs on here: {source}
    #[error("switchover to {peer} abandoned, the guest runs on here: {source}")]
    Abandoned {
        /// The backup's address.
        peer: String,
        /// What went wrong in the drain or the handover.
        source: Handover,
    },
    /// {why}; this side is fenced
    #[error("{why}; this side is fenced")]
    Fenced {
        /// Why the backup did not take the guest.
        why: String,
    },
    /// {why}; this side won the lock and runs on, UNPROTECTED
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
    /// the backup was lost while the log drained
    #[error("the backup was lost while the log drained")]
    LostWhileDraining,
    /// the backup did not acknowledge the log within {0} s
    #[error("the backup did not acknowledge the log within {0} s")]
    NotAcknowledged(u64),
    /// it declined: {0}
    #[error("it declined: {0}")]
    Declined(String),
    /// it left: {0}
    #[error("it left: {0}")]
    Left(String),
    /// it did not confirm within {0} s
    #[error("it did not confirm within {0} s")]
    NotConfirmed(u64),
    /// {0} (the channel failed)
    #[error("{0}")]
    Channel(String),
    /// Flushing the log.
    #[error(transparent)]
    Boundary(#[from] BoundaryError),
}

/// Why a backup does not go live at the end of its log.
#[derive(Debug, Error)]
pub enum NoTakeover {
    /// {why}; without --lock a backup never takes over (it could not rule out a live primary)
    #[error(
        "{why}; without --lock a backup never takes over (it could not rule out a live primary)"
    )]
    NoLock {
        /// Why the stream ended.
        why: String,
    },
    /// {why}; {lost} (the lock went to the other side, or could not be reached)
    #[error("{why}; {lost}")]
    Lost {
        /// Why the stream ended.
        why: String,
        /// The race's outcome.
        lost: Lost,
        /// It was a planned switchover (the old primary stops anyway), not a loss.
        planned: bool,
    },
    /// {0} (the primary closed the stream, or refused)
    #[error("{0}")]
    Ended(String),
}
