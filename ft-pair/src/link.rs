//! The primary's side of fault tolerance: the log stream to an attached backup and the output
//! rule (DESIGN.md sections 4 and 5).
//!
//! ```text
//!  vCPU thread                                   releaser thread
//!  Recorder --records--> StreamSink --Log--> Connection --Ack--> (acked seq)
//!     |        <--seq---                                             |
//!     +-- (seq, output) --> Link (OutputGate) --+                    v
//!                             held queue (seq order) --> stdout / tap / disk image
//! ```
//!
//! Every record of the stream has a sequence number (its frame's index; the stream header is
//! frame 0), which [`StreamSink`] returns to the recorder. The recorder hands each output to the
//! link under the number of the record that produced it ([`OutputGate::hold`]): the output
//! produced by record `s` (its `Output`, `DiskWrite` or `DiskFlush` record) is held until
//! the backup acknowledges: with [`AckMode::Received`], that it holds frame `s`; with
//! [`AckMode::Executed`], that it has replayed it (and so produced the same output: verified).
//! Outputs leave in sequence order, serial and disk alike; the guest keeps running meanwhile, and
//! reads see the disk writes still held. With no backup attached the primary is unprotected:
//! outputs leave at once (after any still held).
//!
//! A backup that is lost leaves the primary [`Mode::Arbitrating`]: nothing unacknowledged leaves
//! until the primary has won the test-and-set on the lock ([`crate::lock`]) in the pair's epoch
//! (then [`Link::won`]: unprotected, what it held is released) or lost it ([`Link::fence`]:
//! nothing more ever leaves; the VMM stops the guest). Without a lock the primary goes
//! unprotected at once (and a partition could leave two live sides: the role warns).

use devices::disk::{Disk, ImageFile};
use ft_core::disk::HeldWrites;
use ft_core::log::{BatchWriter, Header, LogError, LogTime, PendingCheckpoint, Record, RecordSink};
use ft_core::output::{Output, OutputGate};
use logging_channel::{Connection, Msg};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// When an output may leave the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// The backup holds the log up to the output's record (the VMware FT rule).
    Received,
    /// The backup has replayed up to the output and produced the same bytes (verified output).
    Executed,
}

/// A log batch that carries an output is sent once its first output is this old (at the next
/// record, the next kick, or when the guest halts), so that the bytes of a line, or a write and
/// its flush, go in one batch, one acknowledgement and one release: the rule's cost is per
/// message, and a serial line is an output per byte. An output waits this much longer, or until the next kick
/// (`--quantum`, 10 ms) in a guest that runs on without exits. On two stock-KVM machines it
/// halved the outputs released and gained ~25% in `diskwrite` records (docs/HARDWARE.md).
const OUTPUT_COALESCE: Duration = Duration::from_millis(2);
/// Held serial bytes join into one output up to this length.
const SERIAL_RUN: usize = 4096;
/// A log batch without an output is sent once it is this large, or as [`BatchPolicy`] says.
const BATCH_BYTES: usize = 64 << 10;

/// A guest that halts between short runs sends its batch once it ran this many `--batch-run`s.
const IDLE_RUNS: u32 = 5;

/// A log batch without an output leaves once the channel's next heartbeat is this close, to
/// go in its place: more than an idle guest's tick (10 ms), so that a record or a halt comes
/// in between.
const HEARTBEAT_LEAD: Duration = Duration::from_millis(15);

/// When an open batch leaves ([`StreamSink::batch_due`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// Not yet.
    No,
    /// Now.
    Now,
    /// With the channel's next message or in place of its next heartbeat.
    Lazy,
}

/// When a log batch without an output leaves the primary (`--batch-run`, `--batch-age`).
///
/// What the backup has not received it cannot replay: a batch held back is lag, and lag is what
/// a switchover waits for and what a failover replays. But what costs the backup time to replay
/// is the guest's *running*, not its halts (a halt replays at once): a batch leaves once the
/// guest has run `run` without halting, so a busy guest's batches leave every few milliseconds,
/// or [`IDLE_RUNS`] times that in short runs between halts, so that an idle guest's ticks (a
/// short run and a halt, a hundred times a second; the short run is slow here, where guest
/// kernel code is emulated) gather, up to `age`, into one frame, one acknowledgement and one
/// better-compressed batch. Records not yet sent are not lag a takeover waits for: no output
/// depends on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Send once the guest ran this long (wall time on the vCPU, halts not counted) since the
    /// batch's first record.
    pub run: Duration,
    /// Send once the batch is this old, whatever the guest did.
    pub age: Duration,
}

/// The default: by age alone, 50 ms (`run` as long). Short batches (`run` 2 ms, `age` 100 ms)
/// changed neither the lag nor the switchover pause on the development hosts, where the backup's
/// replay, not the log's batching, sets the lag, and cost a third more channel bandwidth
/// (docs/PROTOCOL.md, "Batches"); they are there to measure on other hosts.
impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            run: Duration::from_millis(50),
            age: Duration::from_millis(50),
        }
    }
}

/// An output waiting for the rule.
struct Held {
    /// The stream the output's record went to (0: none, unprotected).
    stream: u64,
    /// Its record's sequence number in that stream.
    seq: u64,
    out: Output,
    /// A disk write's tag among the held writes (unique per write; 0 for other outputs).
    write_id: u64,
    since: Instant,
}

/// Where the pair stands, from the primary's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No backup: this side holds the lock in the current epoch; outputs leave at once.
    Unprotected,
    /// A backup is attached: outputs leave when it acknowledges them.
    Protected,
    /// The backup was lost: outputs wait until the lock decides.
    Arbitrating,
    /// This side lost the lock (or cannot reach it): nothing more ever leaves.
    Fenced,
    /// A planned switchover: the guest is paused, everything it produced has left, and the
    /// backup is going live. Nothing leaves from here ([`Link::begin_handover`]).
    HandedOver,
}

struct State {
    /// The attached backup's connection and its stream number.
    conn: Option<(u64, Connection)>,
    mode: Mode,
    next_stream: u64,
    held: VecDeque<Held>,
    shutdown: bool,
    /// Why the last backup was lost.
    lost: Option<String>,
}

/// Counters of the pair, from the primary's side (read by the status endpoint).
#[derive(Debug, Default)]
pub struct PrimaryStats {
    /// Records of the current stream written (its next sequence number).
    pub sent_seq: AtomicU64,
    /// Log bytes sent to backups, all streams.
    pub log_bytes: AtomicU64,
    /// Log batches sent to backups, all streams.
    pub log_batches: AtomicU64,
    /// The frames of those batches before compression.
    pub log_raw_bytes: AtomicU64,
    /// Outputs held now, and their bytes.
    pub held: AtomicU64,
    /// Bytes of the outputs held now.
    pub held_bytes: AtomicU64,
    /// Outputs released in all.
    pub released: AtomicU64,
    /// Virtual time of the primary's guest as recorded, ns.
    pub vtime_ns: AtomicU64,
    /// Virtual time of the last record sent to the backup, ns: the backup's lag is how far its
    /// replay is behind this.
    pub sent_vtime_ns: AtomicU64,
    /// Output latency samples (ns from hold to release), for the benchmark: the last 4096.
    latencies: Mutex<VecDeque<u64>>,
    /// Times the vCPU was slowed because the backup lagged.
    pub throttled: AtomicU64,
    /// Times a throttle gave up ([`THROTTLE_LIMIT`]) with the backup still lagging more than
    /// `--max-lag`: the bound did not hold, and the vCPU went on anyway.
    pub lag_exceeded: AtomicU64,
    /// Backups dropped because they stayed behind (`--drop-lagging-after`).
    pub dropped_lagging: AtomicU64,
}

/// The longest one throttle holds the vCPU back: a backup that does not catch up within it
/// gets the vCPU back for another `--max-lag` of virtual time before the next wait, so that
/// a wedged backup slows the guest instead of stopping it until the channel's timeout.
const THROTTLE_LIMIT: Duration = Duration::from_secs(1);

impl PrimaryStats {
    fn record_latency(&self, d: Duration) {
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() == 4096 {
            l.pop_front();
        }
        l.push_back(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The output latencies measured so far (ns), oldest first.
    pub fn latencies(&self) -> Vec<u64> {
        self.latencies
            .lock()
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// What the vCPU thread, the releaser and the VMM's control thread share.
pub struct Link {
    state: Mutex<State>,
    changed: Condvar,
    /// Bumped on every attach and detach, so the sink notices without taking the lock.
    generation: AtomicU64,
    header: Header,
    mode: AckMode,
    max_lag_ns: u64,
    writes: Mutex<HeldWrites>,
    write_ids: AtomicU64,
    /// Counters for status.
    pub stats: PrimaryStats,
    protected: AtomicBool,
    /// Whether losing a backup needs arbitration (a lock is configured).
    arbitrated: bool,
    /// The pair's epoch in the lock (0 without one).
    epoch: AtomicU64,
    /// `--drop-lagging-after` in ns; 0: never.
    drop_after_ns: AtomicU64,
    /// Since when every throttle has ended with the backup still past `--max-lag` (None: it
    /// kept within at the last check).
    behind_since: Mutex<Option<Instant>>,
    /// The vCPU thread found the backup behind for too long: why, for the manager to drop it.
    drop_request: Mutex<Option<String>>,
    /// When log batches leave.
    batch: Mutex<BatchPolicy>,
    /// While a switchover converges: the guest runs at half speed and every record leaves at
    /// once ([`Link::converge`]).
    converging: AtomicBool,
    /// While it converges: when each batch left, as (the seq after its last frame, then); the
    /// first entry, without a time, covers every frame made before it began.
    sent_at: Mutex<VecDeque<(u64, Option<Instant>)>>,
}

/// How long the guest runs between holds while a switchover converges; each hold lasts as
/// long as the run before it, so the backup's replay (as fast as the recording here) gains
/// half of every run.
const CONVERGE_RUN: Duration = Duration::from_millis(2);

impl Link {
    /// A link whose streams start with `header`. With `epoch`, this side holds the lock at
    /// that epoch and a lost backup is arbitrated; without, a lost backup leaves it unprotected
    /// at once.
    pub fn new(header: Header, mode: AckMode, max_lag: Duration, epoch: Option<u64>) -> Arc<Link> {
        Arc::new(Link {
            arbitrated: epoch.is_some(),
            epoch: AtomicU64::new(epoch.unwrap_or(0)),
            state: Mutex::new(State {
                conn: None,
                mode: Mode::Unprotected,
                next_stream: 1,
                held: VecDeque::new(),
                shutdown: false,
                lost: None,
            }),
            changed: Condvar::new(),
            generation: AtomicU64::new(0),
            header,
            mode,
            max_lag_ns: u64::try_from(max_lag.as_nanos()).unwrap_or(u64::MAX),
            writes: Mutex::new(HeldWrites::default()),
            write_ids: AtomicU64::new(1),
            stats: PrimaryStats::default(),
            protected: AtomicBool::new(false),
            drop_after_ns: AtomicU64::new(0),
            behind_since: Mutex::new(None),
            drop_request: Mutex::new(None),
            batch: Mutex::new(BatchPolicy::default()),
            converging: AtomicBool::new(false),
            sent_at: Mutex::new(VecDeque::new()),
        })
    }

    /// When log batches leave from now on (the sink reads it at the next attach).
    pub fn set_batch_policy(&self, policy: BatchPolicy) {
        *self.batch.lock().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    fn batch_policy(&self) -> BatchPolicy {
        *self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A switchover converging (`true`) before its pause, or done with it: while it converges
    /// every record leaves at once and the guest runs at half speed ([`CONVERGE_RUN`]), so
    /// that the backup's replay catches up with it ([`Link::replayed_all_sent_before`]); what
    /// the backup has not replayed when the guest pauses is what the pause waits for.
    pub fn converge(&self, on: bool) {
        let mut sent = self.sent_at.lock().unwrap_or_else(|e| e.into_inner());
        sent.clear();
        if on {
            // Frames made before: however recently they leave, they count as old (a batch
            // made at its leisure holds up to its age of the guest's running).
            sent.push_back((self.stats.sent_seq.load(Ordering::Acquire), None));
        }
        self.converging.store(on, Ordering::Release);
    }

    /// How far the backup's replay is behind what was sent to it, in virtual time, as its
    /// acknowledgement `acked` ([`Connection::acked`]) tells: 0 before it acknowledged a
    /// replayed frame, when there is no lag to speak of.
    pub fn lag_ns(&self, acked: (u64, u64, u64)) -> u64 {
        let (_, executed, backup_vtime) = acked;
        if executed == 0 {
            return 0;
        }
        self.stats
            .sent_vtime_ns
            .load(Ordering::Relaxed)
            .saturating_sub(backup_vtime)
    }

    fn note_sent(&self, next_seq: u64) {
        let mut sent = self.sent_at.lock().unwrap_or_else(|e| e.into_inner());
        if sent.len() >= 1 << 16 {
            // The oldest timed entry goes; the untimed first one stays.
            sent.remove(1);
        }
        sent.push_back((next_seq, Some(Instant::now())));
    }

    /// While converging: whether a backup that acknowledged replaying every frame before
    /// `executed` had replayed everything sent before `before` (or everything sent but the
    /// last frame, which a replay may wait at until the next one comes).
    pub fn replayed_all_sent_before(&self, executed: u64, before: Instant) -> bool {
        let sent = self.sent_at.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&(last, _)) = sent.back() else {
            return false;
        };
        if executed + 1 >= last {
            return true;
        }
        // The batch holding frame `executed`, the first one not replayed.
        sent.iter()
            .find(|(end, _)| *end > executed)
            .is_some_and(|(_, at)| at.is_some_and(|at| at >= before))
    }

    /// A backup still past `--max-lag` at the end of every throttle for `after` is dropped
    /// ([`Link::take_drop_request`]); None (the default) keeps it however far behind.
    pub fn drop_lagging_after(&self, after: Option<Duration>) {
        let ns = after.map_or(0, |d| {
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
        });
        self.drop_after_ns.store(ns, Ordering::Relaxed);
    }

    /// Why the attached backup is to be dropped, once: it stayed too far behind for too long.
    /// The caller detaches it ([`Link::detach`]), off the vCPU thread that found it.
    pub fn take_drop_request(&self) -> Option<String> {
        self.drop_request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The backup kept within `--max-lag` at a check: it is not behind.
    fn caught_up(&self) {
        *self.behind_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A whole throttle ended with the backup still `lag_ns` behind. Once every throttle has
    /// ended so for `--drop-lagging-after` (the guest meanwhile running a tenth of its speed or
    /// less, and the backup falling further behind all the same), the backup cannot keep up:
    /// asks for it to be dropped.
    fn still_behind(&self, lag_ns: u64) {
        let after = self.drop_after_ns.load(Ordering::Relaxed);
        if after == 0 {
            return;
        }
        let mut since = self.behind_since.lock().unwrap_or_else(|e| e.into_inner());
        let behind = since.get_or_insert_with(Instant::now).elapsed();
        if u64::try_from(behind.as_nanos()).unwrap_or(u64::MAX) < after {
            return;
        }
        *since = None;
        let mut request = self.drop_request.lock().unwrap_or_else(|e| e.into_inner());
        if request.is_none() {
            *request = Some(format!(
                "dropped: it could not keep up: it stayed more than --max-lag {} ms behind \
                 through every slow-down for {:.0} s ({:.0} ms behind now; --drop-lagging-after)",
                self.max_lag_ns / 1_000_000,
                behind.as_secs_f64(),
                lag_ns as f64 / 1e6
            ));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts streaming to a backup. Call with the vCPU paused, then write the stream's
    /// [`Record::Base`] through the recorder: the header goes out before it.
    pub fn attach(&self, conn: Connection) {
        let mut s = self.lock();
        let stream = s.next_stream;
        s.next_stream += 1;
        s.conn = Some((stream, conn));
        s.mode = Mode::Protected;
        s.lost = None;
        self.caught_up();
        self.take_drop_request();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.protected.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// The backup is gone. Without a lock, the primary runs unprotected and releases what it
    /// held; with one, it holds everything until the lock decides ([`Link::won`],
    /// [`Link::fence`]).
    pub fn detach(&self, why: &str) {
        let mut s = self.lock();
        if let Some((_, conn)) = s.conn.take() {
            if s.mode == Mode::HandedOver {
                // The backup went live (or is going live) by a switchover: not a loss.
            } else if self.arbitrated {
                tracing::warn!(
                    "backup {} lost ({why}): output held until the lock decides",
                    conn.peer_addr()
                );
                s.mode = Mode::Arbitrating;
            } else {
                tracing::warn!(
                    "backup {} lost ({why}): running UNPROTECTED until a backup attaches",
                    conn.peer_addr()
                );
                s.mode = Mode::Unprotected;
            }
            conn.close(why);
            s.lost = Some(why.to_string());
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.protected.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Whether a backup is attached.
    pub fn protected(&self) -> bool {
        self.protected.load(Ordering::Acquire)
    }

    /// Where the pair stands.
    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    /// The pair's epoch in the lock.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// This side won the lock at `epoch` after losing its backup: it runs unprotected and
    /// releases what it held.
    pub fn won(&self, epoch: u64) {
        let mut s = self.lock();
        self.epoch.store(epoch, Ordering::Release);
        if s.mode == Mode::Arbitrating {
            s.mode = Mode::Unprotected;
            tracing::warn!(
                "won the lock at epoch {epoch}: running UNPROTECTED until a backup attaches"
            );
        }
        self.changed.notify_all();
    }

    /// This side lost the lock (or cannot reach it): nothing it holds, and nothing it will
    /// produce, ever leaves.
    pub fn fence(&self, why: &str) {
        let mut s = self.lock();
        s.mode = Mode::Fenced;
        if let Some((_, conn)) = s.conn.take() {
            conn.close(why);
        }
        let dropped = s.held.len();
        s.held.clear();
        self.stats.held.store(0, Ordering::Relaxed);
        self.stats.held_bytes.store(0, Ordering::Relaxed);
        self.protected.store(false, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::error!("fenced ({why}): {dropped} held outputs dropped, nothing more leaves");
        self.changed.notify_all();
    }

    /// A planned switchover begins: call with the guest paused, its log flushed and nothing
    /// held. From here nothing leaves this side; the backup goes live at the stream's end.
    pub fn begin_handover(&self) {
        let mut s = self.lock();
        s.mode = Mode::HandedOver;
        self.protected.store(false, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_all();
    }

    /// The switchover did not complete (the backup did not confirm it went live): whether it
    /// did is unknown, so the lock decides as when a backup is lost; without a lock this side
    /// cannot rule out a live backup and is fenced.
    pub fn handover_failed(&self, why: &str) {
        let mut s = self.lock();
        if let Some((_, conn)) = s.conn.take() {
            conn.close(why);
        }
        s.lost = Some(why.to_string());
        if self.arbitrated {
            tracing::warn!("switchover failed ({why}): the lock decides which side runs");
            s.mode = Mode::Arbitrating;
            self.changed.notify_all();
        } else {
            drop(s);
            self.fence(&format!(
                "switchover failed ({why}) and without --lock this side cannot rule out a live backup"
            ));
        }
    }

    /// The attached backup's connection.
    pub fn connection(&self) -> Option<Connection> {
        self.lock().conn.as_ref().map(|(_, c)| c.clone())
    }

    /// Why the last backup was lost, if one was.
    pub fn lost(&self) -> Option<String> {
        self.lock().lost.clone()
    }

    /// The ack mode.
    pub fn ack_mode(&self) -> AckMode {
        self.mode
    }

    /// Starts the thread that releases held outputs to `serial`, the network `net` (one write
    /// per frame) and the disk `image`.
    pub fn start_releaser(
        self: &Arc<Self>,
        serial: Box<dyn Write + Send>,
        net: Option<Box<dyn Write + Send>>,
        image: Option<ImageFile>,
    ) -> io::Result<Releaser> {
        let link = self.clone();
        let thread = std::thread::Builder::new()
            .name("output-release".into())
            .spawn(move || link.release_loop(serial, net, image))?;
        Ok(Releaser {
            link: self.clone(),
            thread: Some(thread),
        })
    }

    fn releasable(&self, h: &Held, s: &State) -> bool {
        match s.mode {
            Mode::Fenced | Mode::Arbitrating | Mode::HandedOver => return false,
            Mode::Unprotected => return true,
            Mode::Protected => {}
        }
        let Some((stream, c)) = &s.conn else {
            return true;
        };
        if h.stream != *stream {
            // Produced before this backup attached, while this side held the lock alone.
            return true;
        }
        let (received, executed, _) = c.acked();
        let acked = match self.mode {
            AckMode::Received => received,
            AckMode::Executed => executed,
        };
        acked > h.seq
    }

    fn release_loop(
        &self,
        mut serial: Box<dyn Write + Send>,
        mut net: Option<Box<dyn Write + Send>>,
        mut image: Option<ImageFile>,
    ) {
        let mut released_seq = 0u64;
        let mut released_stream = 0u64;
        loop {
            let mut batch = Vec::new();
            let wait_on = {
                let mut s = self.lock();
                if let Some((_, c)) = &s.conn {
                    if !c.is_alive() {
                        let why = c.failure().unwrap_or_else(|| "connection closed".into());
                        drop(s);
                        self.detach(&why);
                        continue;
                    }
                }
                while let Some(h) = s.held.front() {
                    if !self.releasable(h, &s) {
                        break;
                    }
                    if let Some(h) = s.held.pop_front() {
                        batch.push(h);
                    }
                }
                if batch.is_empty() {
                    if s.shutdown {
                        // Stopping: what the rule allows has gone (`finish` waited for the
                        // acknowledgements); what it still holds stays held, rather than the
                        // VMM waiting forever for a backup that does not answer.
                        if !s.held.is_empty() {
                            tracing::warn!(
                                "stopping with {} outputs the backup never acknowledged: not released",
                                s.held.len()
                            );
                        }
                        return;
                    }
                    match (&s.conn, s.held.is_empty()) {
                        (Some((_, c)), false) => Some(c.clone()),
                        _ => {
                            let _unused = self
                                .changed
                                .wait_timeout(s, Duration::from_millis(50))
                                .unwrap_or_else(|e| e.into_inner());
                            None
                        }
                    }
                } else {
                    None
                }
            };
            if let Some(c) = wait_on {
                c.wait_ack(c.acked(), Duration::from_millis(20));
                continue;
            }
            let mut serial_dirty = false;
            for h in &batch {
                if let Err(e) =
                    self.perform(h, &mut serial, &mut net, &mut image, &mut serial_dirty)
                {
                    tracing::error!("cannot release guest output: {e}");
                }
                self.stats.held.fetch_sub(1, Ordering::Relaxed);
                self.stats
                    .held_bytes
                    .fetch_sub(h.out.len(), Ordering::Relaxed);
                self.stats.released.fetch_add(1, Ordering::Relaxed);
                self.stats.record_latency(h.since.elapsed());
                if h.stream != 0 {
                    released_stream = h.stream;
                    released_seq = h.seq + 1;
                }
            }
            if serial_dirty {
                let _ = serial.flush();
            }
            if released_stream != 0 {
                let s = self.lock();
                if let Some((stream, c)) = &s.conn {
                    if *stream == released_stream {
                        let _ = c.send(Msg::Released { seq: released_seq });
                    }
                }
                released_stream = 0;
            }
        }
    }

    fn perform(
        &self,
        h: &Held,
        serial: &mut Box<dyn Write + Send>,
        net: &mut Option<Box<dyn Write + Send>>,
        image: &mut Option<ImageFile>,
        serial_dirty: &mut bool,
    ) -> io::Result<()> {
        match &h.out {
            Output::Serial(bytes) => {
                serial.write_all(bytes)?;
                *serial_dirty = true;
            }
            Output::Net(frame) => {
                if let Some(n) = net.as_mut() {
                    // A frame the tap refuses is lost, as on a wire.
                    if let Err(e) = n.write_all(frame) {
                        tracing::debug!("frame not sent: {e}");
                    }
                }
            }
            Output::DiskWrite { offset, data } => {
                // Under the lock: a read must see either the held write or the image with it.
                let mut w = self.writes.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(img) = image.as_mut() {
                    img.write_at(data, *offset)?;
                }
                w.release(h.write_id, *offset, data.len());
            }
            Output::DiskFlush => {
                if let Some(img) = image.as_mut() {
                    img.flush()?;
                }
            }
        }
        Ok(())
    }

    /// Holds the vCPU back while the backup's replay is more than `--max-lag` of virtual time
    /// behind `vtime_ns` (the last record sent), for at most [`THROTTLE_LIMIT`]. Returns the
    /// virtual time up to which the vCPU may go on before the next check: the backup's
    /// position plus the bound; or another bound's worth past `vtime_ns` when there is no
    /// position to wait for (nothing replayed yet, the connection gone), or the bound's worth
    /// past the end of the hold when the backup did not catch up in time (counted in
    /// `lag_exceeded`, and said).
    ///
    /// A backup whose replay waits at the last frame sent (`executed` one short of `sent_seq`)
    /// has caught up, whatever its virtual time: a replay takes a frame once it reads the next,
    /// and the last frame's time delta holds the time the vCPU spent held here, which the
    /// backup replays at once. Counted by virtual time alone, each hold made the next one
    /// longer, up to [`THROTTLE_LIMIT`] (a guest under `--max-lag 10ms` held a second at a
    /// time).
    fn throttle(&self, conn: &Connection, vtime_ns: u64, sent_seq: u64) -> u64 {
        let start = Instant::now();
        let mut counted = false;
        let next_check = vtime_ns.saturating_add(self.max_lag_ns);
        loop {
            let (_, executed, backup_vtime) = conn.acked();
            if executed == 0 || !conn.is_alive() {
                // Nothing replayed yet (the backup is starting), or no backup to wait for: asking
                // again at every record would send every record as a batch of its own.
                return next_check;
            }
            if executed + 1 >= sent_seq {
                self.caught_up();
                return next_check;
            }
            if vtime_ns.saturating_sub(backup_vtime) <= self.max_lag_ns {
                // Once per --max-lag of guest time: the lock costs nothing to speak of.
                self.caught_up();
                return backup_vtime.saturating_add(self.max_lag_ns);
            }
            if start.elapsed() > THROTTLE_LIMIT {
                let n = self.stats.lag_exceeded.fetch_add(1, Ordering::Relaxed);
                self.still_behind(vtime_ns.saturating_sub(backup_vtime));
                // Said once, then every hundredth time: the counter is in status and metrics.
                if n.is_multiple_of(100) {
                    tracing::warn!(
                        "the backup is {:.0} ms of virtual time behind after {} s of throttling \
                         (--max-lag {} ms): the guest goes on, the lag bound does not hold \
                         ({} times so far)",
                        vtime_ns.saturating_sub(backup_vtime) as f64 / 1e6,
                        THROTTLE_LIMIT.as_secs(),
                        self.max_lag_ns / 1_000_000,
                        n + 1
                    );
                }
                // The guest's clock ran on while the vCPU was held here: the time held is in
                // the next record's time delta. The guest goes on for the bound's worth of its
                // own time past the hold (a tenth of its speed under the 1 s limit), not up to
                // `vtime_ns` plus the bound, which the first record after the hold has passed:
                // counted from before the hold, the first record after it throttled again, and a
                // guest whose backup stopped acknowledging made one batch a second (`ticks`: 3%
                // of its records, `scripts/bench --ft --only costs`).
                let held = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                return next_check.saturating_add(held);
            }
            if !counted {
                self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                counted = true;
            }
            conn.wait_ack(conn.acked(), Duration::from_millis(1));
        }
    }
}

/// The thread that releases held outputs; stopping it releases whatever the rule allows
/// (unprotected: everything); what a live backup never acknowledged stays held.
pub struct Releaser {
    link: Arc<Link>,
    thread: Option<JoinHandle<()>>,
}

impl Releaser {
    /// Releases everything still held that the rule allows, waiting for acknowledgements up to
    /// `timeout`, then stops.
    pub fn finish(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && self.link.stats.held.load(Ordering::Relaxed) > 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.stop();
    }

    fn stop(&mut self) {
        {
            let mut s = self.link.lock();
            s.shutdown = true;
            self.link.changed.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Releaser {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The output rule's way in: the recorder hands each output over with its record's number.
impl OutputGate for Link {
    fn hold(&self, seq: u64, out: Output) {
        let write_id = match &out {
            Output::DiskWrite { offset, data } => {
                // The guest's reads see the write from now on, until the image has it.
                let id = self.write_ids.fetch_add(1, Ordering::Relaxed);
                self.writes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, *offset, data);
                id
            }
            _ => 0,
        };
        let mut s = self.lock();
        if s.mode == Mode::Fenced {
            return;
        }
        let stream = s.conn.as_ref().map_or(0, |(n, _)| *n);
        self.stats
            .held_bytes
            .fetch_add(out.len(), Ordering::Relaxed);
        // Serial bytes are an output each (the guest writes the UART a byte at a time): bytes
        // that follow held bytes of the same stream, made less than OUTPUT_COALESCE before,
        // join them, to leave with the later record (as a rule in the same batch) in one
        // write. The first byte of a run waits no longer than its batch would.
        if let (Output::Serial(more), Some(last)) = (&out, s.held.back_mut()) {
            if let Output::Serial(bytes) = &mut last.out {
                let young = last.since.elapsed() < OUTPUT_COALESCE;
                if last.stream == stream && young && bytes.len() < SERIAL_RUN {
                    bytes.extend_from_slice(more);
                    last.seq = seq;
                    return;
                }
            }
        }
        // The releaser waits on `changed` only while nothing is held.
        let wake = s.held.is_empty();
        self.stats.held.fetch_add(1, Ordering::Relaxed);
        s.held.push_back(Held {
            stream,
            seq,
            out,
            write_id,
            since: Instant::now(),
        });
        if wake {
            self.changed.notify_all();
        }
    }
}

/// The recorder's sink on a primary: records go to the attached backup's stream, in batches;
/// with no backup they go nowhere.
pub struct StreamSink {
    link: Arc<Link>,
    generation: u64,
    conn: Option<Connection>,
    /// The current stream's batch (`None` with no backup).
    batch: Option<BatchWriter>,
    batch_started: Option<Instant>,
    /// When the current batch's first output record went in.
    output_since: Option<Instant>,
    /// The virtual time the records give out, followed as a replay follows it.
    time: LogTime,
    /// The virtual time up to which the vCPU goes on without asking the backup's position
    /// again (the last throttle's answer): checked at every record, so the lag overshoots the
    /// bound by one record's step at most.
    lag_ok_until: u64,
    /// A checkpoint another thread is encoding, with the sequence number it has, and the
    /// records made since, held back until it is in ([`RecordSink::record_later`]).
    pending: Option<(u64, PendingCheckpoint)>,
    held_back: Vec<(Record, bool)>,
    bytes: u64,
    policy: BatchPolicy,
    /// How long the guest ran since the open batch's first record.
    ran: Duration,
    /// How long it ran since its last halt in the open batch.
    ran_since_halt: Duration,
    /// The last record, and whether the guest halted at it (its time until the next record
    /// was not running).
    last_record: Option<(Instant, bool)>,
    /// How long the guest ran since the last hold of a converging switchover.
    run_since_hold: Duration,
    /// When the last batch that may wait was cut ([`Due::Lazy`]).
    lazy_cut: Option<Instant>,
}

impl StreamSink {
    /// A sink feeding `link`.
    pub fn new(link: Arc<Link>) -> StreamSink {
        StreamSink {
            link,
            generation: u64::MAX,
            conn: None,
            batch: None,
            batch_started: None,
            output_since: None,
            time: LogTime::default(),
            lag_ok_until: 0,
            pending: None,
            held_back: Vec::new(),
            bytes: 0,
            policy: BatchPolicy::default(),
            ran: Duration::ZERO,
            ran_since_halt: Duration::ZERO,
            last_record: None,
            run_since_hold: Duration::ZERO,
            lazy_cut: None,
        }
    }

    /// Counts the guest's running time up to now (a record, or a kick), and notes whether it
    /// halts here.
    fn track_run(&mut self, halts: bool) {
        let now = Instant::now();
        if let Some((at, halted)) = self.last_record {
            if !halted {
                let ran = now.saturating_duration_since(at);
                self.run_since_hold += ran;
                if self.batch_started.is_some() {
                    self.ran += ran;
                    self.ran_since_halt += ran;
                }
            }
        }
        if halts {
            self.ran_since_halt = Duration::ZERO;
        }
        self.last_record = Some((now, halts));
    }

    /// Whether the open batch (without an output that is due) should leave: now, once it is
    /// [`BATCH_BYTES`] or the guest ran `run` without halting, or [`IDLE_RUNS`] times that
    /// between its halts (an idle guest's ticks: each is a short run, and it is the guest's
    /// running the backup must replay), or the batch is `age` old; with the channel's next
    /// message, or in place of its next heartbeat ([`Connection::send_log_lazy`]), once that
    /// heartbeat is less than [`HEARTBEAT_LEAD`] away (once per period): an idle guest's log
    /// then leaves once per heartbeat period, as the heartbeat would, and the backup's
    /// acknowledgement of it in place of the backup's heartbeat.
    fn batch_due(&self, pending: usize) -> Due {
        if pending >= BATCH_BYTES
            || self.ran_since_halt >= self.policy.run
            || self.ran >= self.policy.run * IDLE_RUNS
        {
            return Due::Now;
        }
        let aged = self
            .batch_started
            .is_some_and(|t| t.elapsed() >= self.policy.age);
        // Once per heartbeat period: not again until the channel wrote after the last such cut.
        let heartbeat_near = self.conn.as_ref().is_some_and(|c| {
            let quiet = c.since_sent();
            quiet + HEARTBEAT_LEAD >= c.heartbeat()
                && self.lazy_cut.is_none_or(|t| quiet < t.elapsed())
        });
        if heartbeat_near && self.output_since.is_none() {
            return Due::Lazy;
        }
        if aged {
            return Due::Now;
        }
        Due::No
    }

    /// What [`StreamSink::batch_due`] says of the open batch, if it has a record.
    fn open_batch_due(&self) -> Due {
        match &self.batch {
            Some(b) if !b.is_empty() => self.batch_due(b.len()),
            _ => Due::No,
        }
    }

    /// Notices an attach or a detach.
    fn follow_link(&mut self) -> Result<(), LogError> {
        let g = self.link.generation.load(Ordering::Acquire);
        if g == self.generation {
            return Ok(());
        }
        self.generation = g;
        // A checkpoint of the stream that ended is no part of the next one.
        self.pending = None;
        self.held_back.clear();
        self.batch = None;
        self.batch_started = None;
        self.ran = Duration::ZERO;
        self.ran_since_halt = Duration::ZERO;
        self.output_since = None;
        self.lag_ok_until = 0;
        self.policy = self.link.batch_policy();
        self.conn = self.link.connection();
        if self.conn.is_some() {
            // A new stream: magic and header (frame 0) first.
            self.batch = Some(BatchWriter::start(&self.link.header)?);
            self.batch_started = Some(Instant::now());
        }
        Ok(())
    }

    /// A switchover converging: once the guest ran [`CONVERGE_RUN`] since the last hold, holds
    /// it as long (half speed: the backup's replay gains what the guest would have run).
    fn converge_hold(&mut self) {
        if self.run_since_hold < CONVERGE_RUN {
            return;
        }
        std::thread::sleep(self.run_since_hold.min(CONVERGE_RUN * 4));
        self.run_since_hold = Duration::ZERO;
        // The hold was not running.
        if let Some((_, halted)) = self.last_record {
            self.last_record = Some((Instant::now(), halted));
        }
    }

    /// Whether the batch's first output has waited [`OUTPUT_COALESCE`] for company.
    fn output_due(&self) -> bool {
        self.output_since
            .is_some_and(|t| t.elapsed() >= OUTPUT_COALESCE)
    }

    fn send_batch(&mut self) {
        self.send_batch_as(false)
    }

    /// Sends the open batch: `now`, or when [`StreamSink::open_batch_due`] says.
    fn send_if_due(&mut self, now: bool) {
        match if now { Due::Now } else { self.open_batch_due() } {
            Due::Now => self.send_batch(),
            Due::Lazy => self.send_batch_as(true),
            Due::No => {}
        }
    }

    /// Sends the open batch; `lazy`: it may wait for the channel's next message or heartbeat
    /// ([`Connection::send_log_lazy`]).
    fn send_batch_as(&mut self, lazy: bool) {
        let (Some(conn), Some(writer)) = (&self.conn, self.batch.as_mut()) else {
            return;
        };
        let raw = writer.len() as u64;
        let Some(batch) = writer.take() else { return };
        let len = batch.packed.len() as u64;
        let next_seq = batch.first_seq + u64::from(batch.frames);
        self.link
            .stats
            .sent_vtime_ns
            .store(self.time.0, Ordering::Relaxed);
        self.batch_started = None;
        self.ran = Duration::ZERO;
        self.ran_since_halt = Duration::ZERO;
        self.output_since = None;
        // Blocks while the backup's buffer is full: the vCPU stalls, nothing is dropped.
        let send = if lazy {
            self.lazy_cut = Some(Instant::now());
            Connection::send_log_lazy
        } else {
            Connection::send_log
        };
        match send(
            conn,
            batch.first_seq,
            batch.frames,
            batch.carries_output,
            batch.packed,
        ) {
            Ok(()) => {
                self.link.stats.log_bytes.fetch_add(len, Ordering::Relaxed);
                self.link.stats.log_batches.fetch_add(1, Ordering::Relaxed);
                self.link
                    .stats
                    .log_raw_bytes
                    .fetch_add(raw, Ordering::Relaxed);
                if self.link.converging.load(Ordering::Relaxed) {
                    self.link.note_sent(next_seq);
                }
            }
            Err(e) => {
                self.conn = None;
                self.batch = None;
                self.link.detach(&e.to_string());
            }
        }
    }
}

impl StreamSink {
    /// Appends a record to the open batch (`output`: it produced an output the rule holds);
    /// sends the batch when it is due.
    fn push(&mut self, record: &Record, output: bool) -> Result<u64, LogError> {
        self.follow_link()?;
        self.time.follow(record);
        self.track_run(matches!(
            record,
            Record::Exit { kind, .. } if *kind == ft_core::exit::ExitKind::Hlt as u8
        ));
        self.link
            .stats
            .vtime_ns
            .store(self.time.0, Ordering::Relaxed);
        if self.conn.is_none() || self.batch.is_none() {
            return Ok(0);
        }
        self.settle_pending(false)?;
        if let Some((checkpoint, _)) = &self.pending {
            // After a checkpoint still being encoded: in order behind it, once it is in.
            let seq = checkpoint + 1 + self.held_back.len() as u64;
            self.held_back.push((record.clone(), output));
            self.link.stats.sent_seq.store(seq + 1, Ordering::Relaxed);
            return Ok(seq);
        }
        self.append(record, output)
    }

    /// A checkpoint being encoded: if its bytes are in (or `wait`, once they are), appends it
    /// and the records held back behind it.
    fn settle_pending(&mut self, wait: bool) -> Result<(), LogError> {
        let Some((seq, mut later)) = self.pending.take() else {
            return Ok(());
        };
        let data = if wait {
            later.wait()?
        } else {
            match later.poll() {
                Some(r) => r?,
                None => {
                    self.pending = Some((seq, later));
                    return Ok(());
                }
            }
        };
        let at = self.append(&Record::Checkpoint { data }, false)?;
        debug_assert!(
            at == seq || self.batch.is_none(),
            "checkpoint {at} != {seq}"
        );
        for (record, output) in std::mem::take(&mut self.held_back) {
            self.append(&record, output)?;
        }
        Ok(())
    }

    /// Appends a record to the open batch, in order; sends the batch when it is due, and holds
    /// the vCPU when the backup lags too far.
    fn append(&mut self, record: &Record, output: bool) -> Result<u64, LogError> {
        let Some(batch) = self.batch.as_mut() else {
            return Ok(0);
        };
        if batch.is_empty() {
            self.batch_started = Some(Instant::now());
        }
        let (seq, len) = batch.push(record, output)?;
        self.bytes += len as u64;
        let next_seq = batch.next_seq();
        self.link.stats.sent_seq.store(next_seq, Ordering::Relaxed);
        if output && self.output_since.is_none() {
            self.output_since = Some(Instant::now());
        }
        // An output has waited long enough for company, or a backup needs this record to start:
        // send it now. Otherwise batch by size and age.
        let urgent = self.output_due()
            || matches!(
                record,
                Record::Checkpoint { .. }
                    | Record::Resync { .. }
                    | Record::Base { .. }
                    | Record::End { .. }
            );
        let converging = self.link.converging.load(Ordering::Relaxed);
        self.send_if_due(urgent || converging);
        if converging {
            self.converge_hold();
        }
        let sent = self.link.stats.sent_vtime_ns.load(Ordering::Relaxed);
        if self.conn.is_some() && sent > self.lag_ok_until {
            // What the backup is to catch up with must be on its way first: a throttle that
            // held the open batch back would wait for progress it prevents.
            self.send_batch();
            if let Some(conn) = &self.conn {
                let sent = self.link.stats.sent_vtime_ns.load(Ordering::Relaxed);
                let sent_seq = self.link.stats.sent_seq.load(Ordering::Relaxed);
                self.lag_ok_until = self.link.throttle(conn, sent, sent_seq);
            }
        }
        Ok(seq)
    }
}

impl RecordSink for StreamSink {
    fn record(&mut self, record: &Record) -> Result<u64, LogError> {
        self.push(record, false)
    }

    fn record_later(&mut self, later: PendingCheckpoint) -> Result<u64, LogError> {
        self.follow_link()?;
        if self.conn.is_none() || self.batch.is_none() {
            // No backup: no stream to put it in.
            return Ok(0);
        }
        // One at a time: an earlier one still being encoded goes in first.
        self.settle_pending(true)?;
        // What came before leaves now; the checkpoint follows as soon as it is in.
        self.send_batch();
        let Some(batch) = self.batch.as_ref() else {
            return Ok(0);
        };
        let seq = batch.next_seq();
        self.link.stats.sent_seq.store(seq + 1, Ordering::Relaxed);
        self.pending = Some((seq, later));
        Ok(seq)
    }

    fn defers(&self) -> bool {
        true
    }

    fn record_output(&mut self, record: &Record) -> Result<u64, LogError> {
        self.push(record, true)
    }

    fn tick(&mut self) -> Result<(), LogError> {
        // A guest that runs on without exits: the time since the last record was running.
        self.track_run(false);
        self.settle_pending(false)?;
        let converging = self.link.converging.load(Ordering::Relaxed);
        self.send_if_due(self.output_due() || converging);
        if converging {
            self.converge_hold();
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), LogError> {
        // The guest is about to halt, or the VMM wants the log out (a switchover's drain): an
        // output waits for its batch; what is left otherwise only moves the backup along, and
        // waits for the batch's policy.
        self.follow_link()?;
        self.settle_pending(true)?;
        self.send_if_due(self.output_since.is_some());
        Ok(())
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn following(&self) -> bool {
        self.link.protected()
    }
}

/// The shared disk of a primary as the guest reads it: the image, with the writes the rule
/// still holds laid over it. Writes do not come this way: the recorder hands each to the link
/// ([`OutputGate::hold`]) with its record's number.
pub struct HeldDisk {
    link: Arc<Link>,
    image: ImageFile,
}

impl HeldDisk {
    /// Reads of `image` through `link`'s held writes.
    pub fn new(link: Arc<Link>, image: ImageFile) -> HeldDisk {
        HeldDisk { link, image }
    }
}

/// What a write that bypassed the recorder's gate gets: it would leave without a record.
fn not_through_the_gate() -> io::Error {
    io::Error::other("a held disk is written through the output gate, with the write's record")
}

impl Disk for HeldDisk {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let w = self.link.writes.lock().unwrap_or_else(|e| e.into_inner());
        self.image.read_at(buf, offset)?;
        w.overlay(buf, offset);
        Ok(())
    }

    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(not_through_the_gate())
    }

    fn flush(&mut self) -> io::Result<()> {
        Err(not_through_the_gate())
    }
}
