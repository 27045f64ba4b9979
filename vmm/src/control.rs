//! The one control path into a running vCPU, in the manner of Firecracker's `VcpuEvent`s:
//! another thread sends a [`VcpuEvent`] and gets a [`VcpuResponse`] once the vCPU has served it
//! at the next point the VMM controls (between two exits, or in a halt waiting for input).
//!
//! ```text
//!            send(Pause)              send(Snapshot)        send(Resume)
//!  Running ---------------> Paused -----------------> Paused ------------> Running
//!     |                        |                                              |
//!     +---- send(Stop) --------+------------------------> Finished <---------+
//! ```
//!
//! A snapshot is refused while the vCPU runs: the guest would move under it. Dirty-page
//! harvests ([`VcpuEvent::DirtyPages`]) are served in either state; they are how a live state
//! transfer learns what to copy again while the guest keeps running.

use crate::snapshot::Snapshot;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request to the vCPU.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Stop running the guest (at the next point the VMM controls) until `Resume`.
    Pause,
    /// Run the guest again.
    Resume,
    /// A snapshot of the whole VM: `full` (every non-zero page) or only the pages the transfer
    /// has not copied yet ([`VcpuEvent::DirtyPages`]). Only while paused.
    Snapshot {
        /// All of RAM, or the pages dirtied since the last harvest.
        full: bool,
    },
    /// Start tracking the pages the guest writes, for a live transfer: from now on,
    /// `DirtyPages` returns the pages written since the previous call.
    StartDirtyTracking,
    /// The guest pages written since the last `DirtyPages` (or `StartDirtyTracking`).
    DirtyPages,
    /// Stop tracking for the transfer (the checkpoints' own tracking goes on).
    StopDirtyTracking,
    /// Stop the VM for good.
    Stop,
}

/// The vCPU's answer.
#[derive(Debug)]
pub enum VcpuResponse {
    /// The vCPU is paused.
    Paused,
    /// The vCPU runs again.
    Resumed,
    /// The snapshot asked for.
    Snapshot(Box<Snapshot>),
    /// Guest page numbers.
    DirtyPages(Vec<u64>),
    /// Done.
    Ok,
    /// The vCPU stopped (or was already stopped).
    Stopped,
    /// The request is not allowed in this state, or failed.
    Refused(String),
}

struct Shared {
    attention: Arc<AtomicBool>,
    /// The vCPU has finished: requests are answered `Stopped` at once.
    finished: AtomicBool,
    /// The vCPU thread while it runs the guest (kicked on a request).
    thread: Mutex<Option<libc::pthread_t>>,
}

/// The sending side, for any thread. Cheap to clone.
#[derive(Clone)]
pub struct VcpuHandle {
    shared: Arc<Shared>,
    requests: Sender<(VcpuEvent, Sender<VcpuResponse>)>,
}

/// The vCPU thread's side.
pub struct VcpuControl {
    shared: Arc<Shared>,
    requests: Receiver<(VcpuEvent, Sender<VcpuResponse>)>,
}

/// A control path: the handle for other threads, the receiving side for the vCPU thread.
pub fn channel() -> (VcpuHandle, VcpuControl) {
    let shared = Arc::new(Shared {
        attention: Arc::new(AtomicBool::new(false)),
        finished: AtomicBool::new(false),
        thread: Mutex::new(None),
    });
    let (tx, rx) = mpsc::channel();
    (
        VcpuHandle {
            shared: shared.clone(),
            requests: tx,
        },
        VcpuControl {
            shared,
            requests: rx,
        },
    )
}

impl VcpuHandle {
    /// Sends `event` and waits for the answer (`Refused` if the vCPU is gone or does not answer
    /// within `timeout`).
    pub fn request(&self, event: VcpuEvent, timeout: Duration) -> VcpuResponse {
        let (tx, rx) = mpsc::channel();
        if self.requests.send((event, tx)).is_err() {
            return VcpuResponse::Stopped;
        }
        self.shared.attention.store(true, Ordering::Release);
        self.kick();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Disconnected) => return VcpuResponse::Stopped,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.shared.finished.load(Ordering::Acquire) {
                        return VcpuResponse::Stopped;
                    }
                    if std::time::Instant::now() >= deadline {
                        return VcpuResponse::Refused(format!(
                            "the vCPU did not answer within {timeout:?}"
                        ));
                    }
                }
            }
        }
    }

    /// Whether the vCPU has finished for good.
    pub fn finished(&self) -> bool {
        self.shared.finished.load(Ordering::Acquire)
    }

    fn kick(&self) {
        let thread = self.shared.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` is the vCPU thread, registered by `VcpuControl::running` and removed
            // (under this same lock) before that thread leaves the code that can be kicked, so it
            // is alive; the kick signal has a handler (installed by the kicker before the
            // thread registers), so delivering it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(t, crate::kick::kick_signal()) };
        }
    }
}

impl VcpuControl {
    /// The flag a halted wait watches (see `ft_core::boundary::Attention`).
    pub fn attention(&self) -> Arc<AtomicBool> {
        self.shared.attention.clone()
    }

    /// Whether a request is waiting.
    pub fn pending(&self) -> bool {
        self.shared.attention.load(Ordering::Acquire)
    }

    /// The vCPU has finished: pending and future requests are answered `Stopped`.
    pub fn finish(&self) {
        self.shared.finished.store(true, Ordering::Release);
    }

    /// Registers the calling thread as the vCPU thread (true) or unregisters it (false).
    pub fn running(&self, on: bool) {
        let mut thread = self.shared.thread.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: pthread_self has no preconditions.
        *thread = on.then(|| unsafe { libc::pthread_self() });
    }

    /// The next request, waiting up to `timeout` for one (while paused), or only taking one that
    /// is there (`None` timeout).
    pub fn next(&self, timeout: Option<Duration>) -> Option<(VcpuEvent, Sender<VcpuResponse>)> {
        self.shared.attention.store(false, Ordering::Release);
        let r = match timeout {
            None => self.requests.try_recv().ok(),
            Some(t) => self.requests.recv_timeout(t).ok(),
        };
        if r.is_some() {
            // More may be queued behind this one.
            self.shared.attention.store(true, Ordering::Release);
        }
        r
    }
}
