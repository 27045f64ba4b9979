//! Regaining control of a vCPU that runs a whole quantum without a synchronous exit.
//!
//! A watcher thread samples, every quantum, whether the vCPU is still inside the same `KVM_RUN`
//! it was in at the previous sample; if so it sends the vCPU thread a signal, and `KVM_RUN`
//! returns `EINTR` (measured to work at CPL0 and CPL3 on this project's hosts, ENVIRONMENT.md).
//! A guest that exits often is never kicked. A kick lands at no particular instruction, so it is
//! never a position (DESIGN.md section 2).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The signal that kicks the vCPU thread.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being delivered is what makes KVM_RUN return EINTR.
}

/// Set by SIGTERM/SIGINT: the VMM stops at the next point it controls.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store: async-signal-safe. The watcher kicks the vCPU within a quantum.
    STOP_REQUESTED.store(true, Ordering::Release);
}

/// Makes SIGTERM and SIGINT stop the VM cleanly (at the next exit or kick) instead of killing
/// the process, so that `--snapshot-on-exit` can save it.
pub fn stop_on_signals() -> std::io::Result<()> {
    register_signal_handler(libc::SIGTERM, on_stop).map_err(std::io::Error::from)?;
    register_signal_handler(libc::SIGINT, on_stop).map_err(std::io::Error::from)?;
    Ok(())
}

/// Whether SIGTERM or SIGINT arrived since [`stop_on_signals`]: for a process that waits with
/// no VM to stop (a standby).
pub fn stop_was_requested() -> bool {
    STOP_REQUESTED.load(Ordering::Acquire)
}

#[derive(Default)]
struct Shared {
    in_guest: AtomicBool,
    generation: AtomicU64,
    stop: AtomicBool,
    kicks: AtomicU64,
}

/// The watcher of one vCPU thread.
pub struct Kicker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Kicker {
    /// Starts watching the calling thread, which must be the vCPU thread. A stop requested by a
    /// signal also raises `attention`, so that a halted guest's wait sees it.
    pub fn start(quantum: Duration, attention: Arc<AtomicBool>) -> std::io::Result<Self> {
        register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::from)?;
        // SAFETY: pthread_self has no preconditions.
        let vcpu_thread = unsafe { libc::pthread_self() };
        let shared = Arc::new(Shared::default());
        let watch = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu-kicker".into())
            .spawn(move || {
                let mut seen = u64::MAX;
                while !watch.stop.load(Ordering::Acquire) {
                    std::thread::park_timeout(quantum);
                    let generation = watch.generation.load(Ordering::Acquire);
                    let stop = STOP_REQUESTED.load(Ordering::Acquire);
                    if stop {
                        attention.store(true, Ordering::Release);
                    }
                    if watch.in_guest.load(Ordering::Acquire) && (generation == seen || stop) {
                        watch.kicks.fetch_add(1, Ordering::Relaxed);
                        // SAFETY: the vCPU thread outlives this watcher: `Kicker::drop` (run on
                        // the vCPU thread) stops and joins this thread before returning.
                        unsafe { libc::pthread_kill(vcpu_thread, kick_signal()) };
                    }
                    seen = generation;
                }
            })?;
        Ok(Kicker {
            shared,
            thread: Some(thread),
        })
    }

    /// The vCPU is about to enter the guest.
    pub fn enter(&self) {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.shared.in_guest.store(true, Ordering::Release);
    }

    /// The vCPU has left the guest.
    pub fn leave(&self) {
        self.shared.in_guest.store(false, Ordering::Release);
    }

    /// Whether a stop was requested by a signal.
    pub fn stop_requested(&self) -> bool {
        STOP_REQUESTED.load(Ordering::Acquire)
    }

    /// How many kicks were sent.
    pub fn kicks(&self) -> u64 {
        self.shared.kicks.load(Ordering::Relaxed)
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
