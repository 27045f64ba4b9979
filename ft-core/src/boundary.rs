//! The determinism boundary: the one interface through which every non-deterministic input
//! reaches the guest and every output leaves it.
//!
//! Read this file to list every source of non-determinism of the ftvmm platform:
//!
//! | input | method | where it comes from in a live run |
//! | --- | --- | --- |
//! | wall-clock time at boot (the CMOS RTC's epoch) | [`Boundary::rtc_epoch`] | the host's real-time clock |
//! | the virtual clock read by a device (PIT counter, RTC registers, port 0x61) | [`Boundary::read_clock`] | the host's monotonic clock |
//! | virtual time passing a timer deadline, and so timer interrupts | [`Boundary::poll`], [`Boundary::wait`] | the host's monotonic clock |
//! | bytes received on the serial line | [`Boundary::poll`], [`Boundary::wait`] | stdin, a file or a pipe |
//! | Ethernet frames received by the NIC | [`Boundary::poll`], [`Boundary::wait`] | a tap device |
//! | the points where a long-running guest is interrupted (kicks) | [`Point::Kick`] | a host timer |
//! | the contents of the disk the guest reads | [`Boundary::disk`] | the disk image |
//!
//! Everything else the guest sees is a function of its own state: the devices are
//! deterministic state machines, disk contents are the guest's own writes, and CPUID is a
//! fixed table. Host CPU features that leak through this KVM (ENVIRONMENT.md: leaf 1 CPUID,
//! `RDTSC` and `RDRAND` at CPL3) are kept from the guest kernel by the deterministic profile
//! on its command line; guest user space that executes them directly is a known divergence
//! source that only checkpoints can cover.
//!
//! Outputs: serial bytes ([`Boundary::output`]) and disk writes (the [`Disk`] that
//! [`Boundary::disk`] hands the device). Under fault tolerance both wait for the output rule
//! ([`crate::primary`]).
//!
//! The vCPU loop also reports every synchronous exit ([`Boundary::exit`]) and every interrupt it
//! injects ([`Boundary::interrupt`]) so that a recorder can log them and a replayer check them.

use crate::exit::{ExitDigest, SyncExit};
use crate::log::LogError;
use devices::disk::Disk;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use thiserror::Error;

/// Where an output goes to in the outside world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// Bytes transmitted by the guest's UART.
    Serial,
    /// One Ethernet frame transmitted by the guest's NIC.
    Net,
}

/// A flag another thread raises to cut a blocking boundary call short (a halted guest's
/// [`Boundary::wait`]): the VMM has a control request to serve, or was asked to stop.
pub type Attention = Arc<AtomicBool>;

/// A non-deterministic input delivered to the guest at the current position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Virtual time moved forward to this value (nanoseconds since boot).
    Time(u64),
    /// Bytes arrived on the serial line (never more than the request's `serial_room`).
    SerialRx(Vec<u8>),
    /// One Ethernet frame arrived for the guest's NIC (only when the request's `net_ready`).
    NetRx(Vec<u8>),
}

/// Where in the execution the VMM asks for inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Right after a synchronous exit was handled: a position that replay can find again.
    Exit,
    /// The vCPU was kicked because it ran a whole quantum without a synchronous exit. The
    /// position cannot be found again by replay (there is no instruction counter).
    Kick,
}

/// What the VMM knows when it asks for inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitRequest {
    /// Current virtual time, nanoseconds since boot.
    pub now_ns: u64,
    /// Virtual time of the next timer event of any device, if there is one.
    pub deadline_ns: Option<u64>,
    /// How many serial bytes the guest's UART can take now.
    pub serial_room: usize,
    /// Whether the guest's NIC has a receive buffer posted for a frame now.
    pub net_ready: bool,
}

/// Errors of a boundary implementation.
#[derive(Debug, Error)]
pub enum BoundaryError {
    /// The guest is halted with nothing that could ever wake it (no timer armed, serial input closed).
    #[error("the guest halted with interrupts on but nothing can wake it: no timer is armed and serial input is closed")]
    NothingToWaitFor,
    /// Writing an output to the world failed.
    #[error("cannot write guest output: {0}")]
    Output(#[source] std::io::Error),
    /// Replay found the execution differing from the recording.
    #[error("divergence at exit {exit}: expected {expected}, got {got}")]
    Divergence {
        /// The ordinal of the synchronous exit where it showed (the number of exits before it).
        exit: u64,
        /// What the log says happened.
        expected: String,
        /// What happened in this execution.
        got: String,
    },
    /// The log could not be read or written.
    #[error("event log: {0}")]
    Log(#[from] LogError),
    /// The log ended before the recorded run did.
    #[error("the log ends at exit {exit}, before the end of the recording (truncated log?)")]
    LogEnded {
        /// Exits replayed.
        exit: u64,
    },
    /// Replay reached the end of a recording that was stopped before its guest did: the replay
    /// stops here too (not an error).
    #[error("end of the log")]
    EndOfLog,
    /// The log was recorded on a different machine configuration.
    #[error(
        "the log was recorded with a different machine: log has [{logged}], this run is [{ours}]"
    )]
    ConfigMismatch {
        /// The log's configuration summary.
        logged: String,
        /// This run's.
        ours: String,
    },
    /// A wait was cut short by [`Attention`]: nothing arrived; the caller serves its request
    /// and waits again.
    #[error("wait interrupted by a control request")]
    Interrupted,
    /// This side may not go on: it lost the arbitration for the lock, or cannot reach it. It
    /// stops and emits nothing more.
    #[error("this side may not go on: {why}; it stops and emits nothing more")]
    Fenced {
        /// The arbitration's outcome or the failure that decided it, e.g. the lock's holder and
        /// epoch, or "the live side could not be built".
        why: String,
    },
    /// Any other failure of the implementation, described.
    #[error("{0}")]
    Other(String),
}

/// The one interface that carries every non-deterministic input and every output.
///
/// A live run reads the host; a recorder reads the host and logs; a replayer reads the log.
/// The VMM does not know which one it has.
pub trait Boundary {
    /// The wall-clock time (Unix seconds) the guest's RTC shows at virtual time 0.
    fn rtc_epoch(&mut self) -> Result<i64, BoundaryError>;

    /// A synchronous exit happened (called for every one, in order, before it is handled).
    fn exit(&mut self, exit: &SyncExit) -> Result<(), BoundaryError>;

    /// A device reads the virtual clock now. Never less than any time returned before.
    fn read_clock(&mut self) -> Result<u64, BoundaryError>;

    /// Inputs that are due now, at `point`. Never blocks.
    fn poll(&mut self, point: Point, req: &WaitRequest) -> Result<Option<Input>, BoundaryError>;

    /// The guest halted with interrupts enabled: block until the next input and return it, or
    /// return [`BoundaryError::Interrupted`] once the [`Attention`] flag given to
    /// [`Boundary::set_attention`] is raised.
    fn wait(&mut self, req: &WaitRequest) -> Result<Input, BoundaryError>;

    /// The flag that cuts [`Boundary::wait`] short.
    fn set_attention(&mut self, _flag: Attention) {}

    /// The disk the guest's virtio-blk device reads and writes, made from the disk image
    /// (`None` when this process may not touch the image, e.g. a backup replaying a shared
    /// disk). Disk contents are inputs and disk writes are outputs: a live run hands the image
    /// over as it is; a recorder logs what is read; a replayer serves reads from the log.
    fn disk(&mut self, image: Option<Box<dyn Disk>>, size: u64) -> Option<Box<dyn Disk>> {
        let _ = size;
        image
    }

    /// The VMM injected interrupt `vector` at the current position.
    fn interrupt(&mut self, vector: u8) -> Result<(), BoundaryError>;

    /// The guest produced output for the outside world.
    fn output(&mut self, kind: OutputKind, bytes: &[u8]) -> Result<(), BoundaryError>;

    /// The vCPU was kicked: is an input due that must be delivered here, at a point replay cannot
    /// find again, or has the interrupt the guest could take here (`waiting`: one is pending
    /// and the guest is interruptible, for this long) waited long enough for a reproducible
    /// point? Only time
    /// is ever delivered at a kick (serial input waits for an exit). A live boundary may let
    /// either wait a bounded while for the next synchronous exit, where no checkpoint is needed.
    fn kick_due(
        &mut self,
        req: &WaitRequest,
        waiting: Option<std::time::Duration>,
    ) -> Result<bool, BoundaryError>;

    /// Whether the VMM may deliver inputs or inject interrupts at a kick at all. A live run on
    /// the host clock may; a recorder may if its live side may (it checkpoints there); a run on
    /// the virtual clock and a replay may not: a kick lands at no reproducible point.
    fn acts_at_kicks(&self) -> bool {
        true
    }

    /// Whether this boundary needs a checkpoint wherever inputs are delivered at a kick (a
    /// recorder does: replay restores it instead of executing up to the kick).
    fn wants_checkpoints(&self) -> bool {
        false
    }

    /// A checkpoint taken at a kick, before the inputs delivered there.
    fn checkpoint(&mut self, _snapshot: &[u8]) -> Result<(), BoundaryError> {
        Ok(())
    }

    /// Whether [`Boundary::checkpoint_later`] lets the vCPU run on while another thread
    /// encodes the checkpoint (a recorder streaming to a backup does).
    fn defers_checkpoints(&self) -> bool {
        false
    }

    /// A checkpoint taken at a kick, before the inputs delivered there, that another thread is
    /// encoding: by default waited for and handed to [`Boundary::checkpoint`].
    fn checkpoint_later(
        &mut self,
        later: crate::log::PendingCheckpoint,
    ) -> Result<(), BoundaryError> {
        let bytes = later.wait()?;
        self.checkpoint(&bytes)
    }

    /// Replay: a checkpoint to restore before the vCPU runs again, if the log has one next.
    fn pending_checkpoint(&mut self) -> Result<Option<Vec<u8>>, BoundaryError> {
        Ok(None)
    }

    /// The VM was restored from a snapshot taken at virtual time `now_ns`: a live clock must
    /// carry on from there.
    fn restored(&mut self, _now_ns: u64) {}

    /// The run ended (`end` says who ended it); `digest` covers every synchronous exit of the
    /// run.
    fn finish(&mut self, _digest: &ExitDigest, _end: RunEnd) -> Result<(), BoundaryError> {
        Ok(())
    }
}

/// Who ended a run, for [`Boundary::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest (it wrote the exit port, halted for good, reset, triple-faulted), or the log
    /// of a replay ran out: a replay checks that the recording ended at the same exit.
    Guest,
    /// The VMM, asked by its user (a signal, a control request, `--stop-at-exit`): a recording
    /// ends here all the same, a replay stops here without looking at the rest of the log.
    Vmm,
}
