//! The process's network runtime: tokio on its own threads, shared by every listener and
//! connection. Callers of the public API never run on it; they wait on std primitives.
//!
//! The runtime's threads carry the heartbeats and run the failure detector, so they run at a
//! higher scheduling priority than the VMM's own threads ([`set_network_nice`], default
//! [`DEFAULT_NICE`]): a host busy with vCPUs and other processes must not delay the one thing
//! that tells the peer this side lives. A nice value rather than a real-time class: the same
//! threads also move the log and the attach's memory, and a real-time thread encrypting a
//! 256 MiB transfer would take whole CPUs from everything else on the host.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};

use crate::ChannelError;

/// The nice value the network threads ask for unless told otherwise: weight ~9,500 against
/// 1,024 for a task at the default 0, so a busy host still runs them within a few ms of a
/// wake-up, while a bulk transfer leaves other tasks about a tenth of a CPU each.
pub const DEFAULT_NICE: i32 = -10;

/// What the threads ask for; set before the runtime starts.
static WANTED: AtomicI32 = AtomicI32::new(DEFAULT_NICE);

/// What the last network thread started got: its nice value, or [`NOT_SET`] when it could not
/// change it (no CAP_SYS_NICE and an RLIMIT_NICE too low for a negative value).
static GOT: AtomicI32 = AtomicI32::new(NOT_SET);
const NOT_SET: i32 = i32::MIN;

/// Sets the nice value (-20..=19) of the process's network threads: those started from now on
/// (the runtime starts with the first listener or connection). A negative value needs
/// CAP_SYS_NICE or RLIMIT_NICE; without them the threads keep the process's own and
/// [`network_nice`] says so.
pub fn set_network_nice(nice: i32) {
    WANTED.store(nice.clamp(-20, 19), Ordering::Relaxed);
}

/// The nice value the network threads run at, or None if they could not set the one asked for
/// (or have not started).
pub fn network_nice() -> Option<i32> {
    match GOT.load(Ordering::Relaxed) {
        NOT_SET => None,
        n => Some(n),
    }
}

/// Gives the calling thread (only it: Linux's `setpriority` takes a thread id) the wanted nice
/// value; records the outcome.
fn prioritize_this_thread() {
    let nice = WANTED.load(Ordering::Relaxed);
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let Ok(who) = libc::id_t::try_from(tid) else {
        return;
    };
    // SAFETY: setpriority on our own thread id; it only changes this thread's scheduling.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) };
    if rc == 0 {
        GOT.store(nice, Ordering::Relaxed);
    } else {
        GOT.store(NOT_SET, Ordering::Relaxed);
        tracing::debug!(
            "network thread: cannot set nice {nice}: {} (needs CAP_SYS_NICE)",
            std::io::Error::last_os_error()
        );
    }
}

/// The runtime's handle, started on first use.
pub(crate) fn handle() -> Result<Handle, ChannelError> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ftvmm-net")
            .on_thread_start(prioritize_this_thread)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(ChannelError::Runtime(e.clone())),
    }
}
