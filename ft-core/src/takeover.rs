//! A backup's boundary: it replays the primary's log, and when the primary is lost and this
//! side has won the lock, it goes on live from exactly the point where the log ends (DESIGN.md
//! section 6). The guest never notices: the call that finds the log's end is answered by the
//! live side instead, and every call after it.
//!
//! ```text
//!  replaying ----------- log ends, lock won ----------> live (a recorder, a primary)
//!      |                                                  ^
//!      +-- log ends, lock lost / unreachable --> Fenced   |
//!                                     go_live(SwitchPoint) builds the live side once
//! ```
//!
//! The disk switches with it ([`TakeoverDisk`]): a read or write that finds the log's end is
//! served by the live disk, so the guest's driver never sees an error.

use crate::boundary::{
    Attention, Boundary, BoundaryError, Input, OutputKind, Point, RunEnd, WaitRequest,
};
use crate::exit::{ExitDigest, SyncExit};
use crate::replay::Replayer;
use devices::disk::Disk;
use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Why a backup may not go live: the pair layer's own error (ft-core knows only that it is
/// one), kept whole so that whoever decides the exit status can look at it.
pub type Refusal = Arc<dyn std::error::Error + Send + Sync>;

/// What the arbitration decided, set by whoever raced the lock.
#[derive(Default)]
pub struct Decision {
    value: Mutex<Option<Result<u64, Refusal>>>,
    decided: Condvar,
}

impl Decision {
    /// Records the outcome: `Ok(epoch)` won, `Err(why)` lost or unreachable.
    pub fn set(&self, outcome: Result<u64, Refusal>) {
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        v.get_or_insert(outcome);
        self.decided.notify_all();
    }

    /// Waits for the outcome.
    pub fn wait(&self) -> Result<u64, Refusal> {
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = v.as_ref() {
                return r.clone();
            }
            v = self.decided.wait(v).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The outcome, if there is one yet.
    pub fn get(&self) -> Option<Result<u64, Refusal>> {
        self.value.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Where the replay ended: what the live side carries on from.
#[derive(Clone, Copy, Debug)]
pub struct SwitchPoint {
    /// RIP of the last exit replayed.
    pub rip: u64,
    /// The last virtual time the log gave out, ns.
    pub time_ns: u64,
    /// Exits replayed since boot.
    pub exits: u64,
    /// Sequence number of the first record the primary sent that never arrived.
    pub next_seq: u64,
    /// The epoch this side won.
    pub epoch: u64,
}

/// The live side a backup becomes.
pub struct LiveSide {
    /// A recorder over the live boundary (so that a new backup can attach).
    pub boundary: Box<dyn Boundary + Send>,
    /// The disk the guest uses from now on (the image, with the output rule).
    pub disk: Option<Box<dyn Disk>>,
}

/// Builds the live side, once, at the switch; its error is the pair layer's.
pub type GoLive = Box<
    dyn FnOnce(SwitchPoint) -> Result<LiveSide, Box<dyn std::error::Error + Send + Sync>> + Send,
>;

/// Called when the replay diverges, before the backup waits for its resync: the pair layer
/// marks the backup diverged (for its arbiter) and asks the primary for the resync.
pub type OnDivergence = Box<dyn FnMut(&BoundaryError) + Send>;

struct Inner<R: Read + Send + 'static> {
    replayer: Replayer<R>,
    replay_disk: Option<Box<dyn Disk>>,
    live: Option<LiveSide>,
    decision: Arc<Decision>,
    go_live: Option<GoLive>,
    attention: Option<Attention>,
    /// Set: a divergence is waited out here, in the call that found it ([`Takeover::resync_in_place`]).
    on_divergence: Option<OnDivergence>,
    /// The resync's snapshot that ended such a wait, for the VMM to restore.
    resync: Option<Vec<u8>>,
}

impl<R: Read + Send + 'static> Inner<R> {
    /// The replayer failed: if that is because its log ended, switch to live (or fail for
    /// good when this side may not go on); otherwise hand the error back.
    fn after_replay_error(&mut self, e: BoundaryError) -> Result<(), BoundaryError> {
        if self.live.is_some() {
            return Err(e);
        }
        if matches!(e, BoundaryError::Divergence { .. }) && self.on_divergence.is_some() {
            return self.wait_out_divergence(e);
        }
        if !self.replayer.at_end() {
            return Err(e);
        }
        self.switch()
    }

    /// The replay diverged (`e`) in the call under way: tells the pair layer, then waits for
    /// the resync's snapshot (handed back with `e`, for the VMM to restore) or for the log to
    /// end, the primary lost. Then the arbitration decides: a side that may go live carries on
    /// from exactly here, the call that diverged answered by the live side, as at any log's
    /// end; one that may not is fenced with the arbiter's reason.
    fn wait_out_divergence(&mut self, e: BoundaryError) -> Result<(), BoundaryError> {
        if let Some(hook) = self.on_divergence.as_mut() {
            hook(&e);
        }
        match self.replayer.skip_to_resync() {
            Ok(data) => {
                self.resync = Some(data);
                Err(e)
            }
            Err(_) if self.replayer.at_end() => {
                tracing::warn!("the log ended while this backup waited for a resync after: {e}");
                self.switch()
            }
            Err(e2) => Err(e2),
        }
    }

    fn switch(&mut self) -> Result<(), BoundaryError> {
        let epoch = self.decision.wait().map_err(|why| BoundaryError::Fenced {
            why: why.to_string(),
        })?;
        let go_live = self.go_live.take().ok_or_else(|| BoundaryError::Fenced {
            why: "the live side could not be built".into(),
        })?;
        let (rip, time_ns, exits, next_seq) = self.replayer.position();
        let point = SwitchPoint {
            rip,
            time_ns,
            exits,
            next_seq,
            epoch,
        };
        tracing::warn!(
            "the log ends at exit {exits} (record {next_seq}): going live at epoch {epoch}"
        );
        let mut live = go_live(point).map_err(|why| BoundaryError::Fenced {
            why: why.to_string(),
        })?;
        if let Some(a) = self.attention.clone() {
            live.boundary.set_attention(a);
        }
        self.replayer.clear_pending();
        self.live = Some(live);
        Ok(())
    }

    fn live(&mut self) -> &mut dyn Boundary {
        match self.live.as_mut() {
            Some(l) => l.boundary.as_mut(),
            None => &mut self.replayer,
        }
    }
}

/// A backup's boundary (see the module doc).
pub struct Takeover<R: Read + Send + 'static> {
    inner: Arc<Mutex<Inner<R>>>,
    rtc_epoch: i64,
}

fn lock<R: Read + Send + 'static>(i: &Arc<Mutex<Inner<R>>>) -> MutexGuard<'_, Inner<R>> {
    i.lock().unwrap_or_else(|e| e.into_inner())
}

/// Calls `$method` on the replayer, or on the live side once switched; a replay that fails
/// because the log ended switches and asks the live side.
macro_rules! delegate {
    ($self:ident, $($call:tt)*) => {{
        let mut g = lock(&$self.inner);
        if g.live.is_none() {
            match g.replayer.$($call)* {
                Err(e) => g.after_replay_error(e)?,
                ok => {
                    g.replayer.verified();
                    return ok;
                }
            }
        }
        g.live().$($call)*
    }};
}

impl<R: Read + Send + 'static> Takeover<R> {
    /// Replays with `replayer`; at the log's end waits for `decision` and goes live with
    /// `go_live`.
    pub fn new(mut replayer: Replayer<R>, decision: Arc<Decision>, go_live: GoLive) -> Self {
        let rtc_epoch = replayer.rtc_epoch().unwrap_or(0);
        Takeover {
            inner: Arc::new(Mutex::new(Inner {
                replayer,
                replay_disk: None,
                live: None,
                decision,
                go_live: Some(go_live),
                attention: None,
                on_divergence: None,
                resync: None,
            })),
            rtc_epoch,
        }
    }

    /// Whether this side is live now.
    pub fn is_live(&self) -> bool {
        lock(&self.inner).live.is_some()
    }

    /// From now on a divergence is waited out in the call that found it: `hook` is told, then
    /// the call waits for the resync's snapshot ([`Takeover::take_resync`], the call fails
    /// with the divergence) or for the log's end, where the arbitration decides whether this
    /// side goes live from there, like at any log's end (the arbiter weighs the divergence:
    /// DESIGN.md's output rule says which outputs a diverged backup may not contradict).
    pub fn resync_in_place(&mut self, hook: OnDivergence) {
        lock(&self.inner).on_divergence = Some(hook);
    }

    /// The resync's snapshot a divergence waited for, if one came.
    pub fn take_resync(&self) -> Option<Vec<u8>> {
        lock(&self.inner).resync.take()
    }

    /// The replayer, for what only it does (resync after a divergence).
    pub fn with_replayer<T>(&self, f: impl FnOnce(&mut Replayer<R>) -> T) -> T {
        f(&mut lock(&self.inner).replayer)
    }
}

impl<R: Read + Send + 'static> Boundary for Takeover<R> {
    fn rtc_epoch(&mut self) -> Result<i64, BoundaryError> {
        Ok(self.rtc_epoch)
    }

    fn exit(&mut self, exit: &SyncExit) -> Result<(), BoundaryError> {
        delegate!(self, exit(exit))
    }

    fn read_clock(&mut self) -> Result<u64, BoundaryError> {
        delegate!(self, read_clock())
    }

    fn poll(&mut self, point: Point, req: &WaitRequest) -> Result<Option<Input>, BoundaryError> {
        delegate!(self, poll(point, req))
    }

    fn wait(&mut self, req: &WaitRequest) -> Result<Input, BoundaryError> {
        delegate!(self, wait(req))
    }

    fn set_attention(&mut self, flag: Attention) {
        let mut g = lock(&self.inner);
        g.attention = Some(flag.clone());
        g.live().set_attention(flag);
    }

    fn disk(&mut self, image: Option<Box<dyn Disk>>, size: u64) -> Option<Box<dyn Disk>> {
        let mut g = lock(&self.inner);
        // The replayer uses the image only for a mirrored disk (`Replayer::mirror_disk`).
        g.replay_disk = g.replayer.disk(image, size);
        Some(Box::new(TakeoverDisk {
            inner: self.inner.clone(),
            size,
        }))
    }

    fn interrupt(&mut self, vector: u8) -> Result<(), BoundaryError> {
        delegate!(self, interrupt(vector))
    }

    fn output(&mut self, kind: OutputKind, bytes: &[u8]) -> Result<(), BoundaryError> {
        delegate!(self, output(kind, bytes))
    }

    fn kick_due(
        &mut self,
        req: &WaitRequest,
        waiting: Option<std::time::Duration>,
    ) -> Result<bool, BoundaryError> {
        lock(&self.inner).live().kick_due(req, waiting)
    }

    fn acts_at_kicks(&self) -> bool {
        let mut g = lock(&self.inner);
        g.live().acts_at_kicks()
    }

    fn wants_checkpoints(&self) -> bool {
        let mut g = lock(&self.inner);
        g.live().wants_checkpoints()
    }

    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), BoundaryError> {
        lock(&self.inner).live().checkpoint(snapshot)
    }

    fn defers_checkpoints(&self) -> bool {
        lock(&self.inner).live().defers_checkpoints()
    }

    fn checkpoint_later(
        &mut self,
        later: crate::log::PendingCheckpoint,
    ) -> Result<(), BoundaryError> {
        lock(&self.inner).live().checkpoint_later(later)
    }

    fn pending_checkpoint(&mut self) -> Result<Option<Vec<u8>>, BoundaryError> {
        delegate!(self, pending_checkpoint())
    }

    fn restored(&mut self, now_ns: u64) {
        lock(&self.inner).live().restored(now_ns);
    }

    fn finish(&mut self, digest: &ExitDigest, end: RunEnd) -> Result<(), BoundaryError> {
        delegate!(self, finish(digest, end))
    }
}

/// The backup's disk: served from the log while replaying, by the live disk once switched (a
/// request that finds the log's end switches first).
pub struct TakeoverDisk<R: Read + Send + 'static> {
    inner: Arc<Mutex<Inner<R>>>,
    size: u64,
}

fn disk_op<R: Read + Send + 'static, T>(
    inner: &Arc<Mutex<Inner<R>>>,
    mut op: impl FnMut(&mut dyn Disk) -> io::Result<T>,
) -> io::Result<T> {
    let mut g = lock(inner);
    if g.live.is_none() {
        let r = match g.replay_disk.as_mut() {
            Some(d) => op(d.as_mut()),
            None => Err(io::Error::other("no disk")),
        };
        match r {
            Err(e) if g.replayer.at_end() => {
                if let Err(b) = g.switch() {
                    tracing::error!("disk request at the end of the log: {b}");
                    return Err(e);
                }
            }
            r => return r,
        }
    }
    match g.live.as_mut().and_then(|l| l.disk.as_mut()) {
        Some(d) => op(d.as_mut()),
        None => Err(io::Error::other("the live side has no disk")),
    }
}

impl<R: Read + Send + 'static> Disk for TakeoverDisk<R> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        disk_op(&self.inner, |d| d.read_at(buf, offset))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        disk_op(&self.inner, |d| d.write_at(buf, offset))
    }

    fn flush(&mut self) -> io::Result<()> {
        disk_op(&self.inner, |d| d.flush())
    }
}
