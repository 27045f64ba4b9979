//! The backup's side of the logging channel: the log stream as a reader for the replayer, and
//! the acknowledgements of what was received and what was replayed.
//!
//! ```text
//!  Connection --Log--> receiver thread --bytes--> StreamReader --> Replayer (vCPU thread)
//!      ^                   |  Ack{received}                          | Progress
//!      +-------------------+<------------- acker thread <------------+
//! ```

use ft_core::log::BatchReader;
use ft_core::replay::{KeptWrites, Progress};
use logging_channel::{Connection, Msg};
use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Queue {
    chunks: VecDeque<Vec<u8>>,
    /// Why the stream ended (the reader returns end-of-file once the chunks are drained).
    ended: Option<String>,
    /// Whether it ended because the primary was lost (not a clean close or a refusal).
    lost: bool,
    /// When it ended, and when the last message before that arrived.
    ended_at: Option<Instant>,
    last_message: Instant,
    bytes: u64,
    /// The epoch of a planned switchover ([`Msg::Handover`]): the stream ended by it.
    handover: Option<u64>,
    /// Since when the replay has had log it has not used up (`None`: it waits for the next
    /// batch, having read all that arrived).
    behind_since: Option<Instant>,
}

/// The backup's end of a pair's stream.
pub struct BackupLink {
    conn: Connection,
    queue: Mutex<Queue>,
    arrived: Condvar,
    /// Frames received (every frame with a lower sequence number is here).
    received: AtomicU64,
    /// The primary has released the outputs of frames below this.
    released: AtomicU64,
    /// One past the last frame of the last batch received that carries an output: no output
    /// frame at or beyond this has reached this side.
    output_end: AtomicU64,
    progress: Arc<Progress>,
    kept: Arc<Mutex<KeptWrites>>,
    acked: Mutex<(u64, u64, u64)>,
    stop: AtomicBool,
    resync_requested: AtomicBool,
    /// The acknowledgement timer also runs while the backup keeps up (`--ack-timer always`).
    ack_timer_always: AtomicBool,
}

/// When the backup's acknowledgement timer (every [`ACK_PERIOD`]) sends an acknowledgement,
/// besides those an output waits for and the one when the replay has used up what arrived
/// (`--ack-timer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckTimer {
    /// While the replay has had log waiting for it that long (a backup behind: its position as
    /// it moves): an idle pair's one acknowledgement per batch. The default.
    #[default]
    Behind,
    /// Whenever anything moved (as before protocol version 5: ~2.5 times the acknowledgements
    /// of an idle pair, the backup's position fresher in the primary's view).
    Always,
}

impl BackupLink {
    /// Starts receiving the log stream from `conn` (after the state transfer), acknowledging
    /// with the replay's `progress`, and forgetting kept writes as the primary releases them.
    pub fn start(
        conn: Connection,
        progress: Arc<Progress>,
        kept: Arc<Mutex<KeptWrites>>,
    ) -> io::Result<(Arc<BackupLink>, Vec<JoinHandle<()>>)> {
        let link = Arc::new(BackupLink {
            conn,
            queue: Mutex::new(Queue {
                chunks: VecDeque::new(),
                ended: None,
                lost: false,
                ended_at: None,
                last_message: Instant::now(),
                bytes: 0,
                handover: None,
                behind_since: None,
            }),
            arrived: Condvar::new(),
            received: AtomicU64::new(0),
            released: AtomicU64::new(0),
            output_end: AtomicU64::new(0),
            progress,
            kept,
            acked: Mutex::new((0, 0, 0)),
            stop: AtomicBool::new(false),
            resync_requested: AtomicBool::new(false),
            ack_timer_always: AtomicBool::new(false),
        });
        let rx = link.clone();
        let receiver = std::thread::Builder::new()
            .name("log-receive".into())
            .spawn(move || rx.receive_loop())?;
        let ack = link.clone();
        let acker = std::thread::Builder::new()
            .name("log-ack".into())
            .spawn(move || ack.ack_loop())?;
        Ok((link, vec![receiver, acker]))
    }

    /// When the acknowledgement timer acknowledges ([`AckTimer`]): besides the acknowledgements
    /// an output waits for and the one when the replay has used up what arrived (one per
    /// batch), every [`ACK_PERIOD`] while the replay has had log to replay for that long
    /// (`Behind`, the default), or whenever anything moved (`Always`).
    pub fn set_ack_timer(&self, timer: AckTimer) {
        self.ack_timer_always
            .store(timer == AckTimer::Always, Ordering::Relaxed);
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reader of the log stream for the replayer.
    pub fn reader(self: &Arc<Self>) -> StreamReader {
        StreamReader {
            link: self.clone(),
            current: Vec::new(),
            pos: 0,
        }
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Frames received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// One past the last frame of the last batch received with an output in it: every frame
    /// this side received that carries an output lies below.
    pub fn output_end(&self) -> u64 {
        self.output_end.load(Ordering::Acquire)
    }

    /// The primary has released the outputs of frames below this.
    pub fn released(&self) -> u64 {
        self.released.load(Ordering::Acquire)
    }

    /// Bytes received and not yet replayed.
    pub fn buffered(&self) -> u64 {
        self.queue().bytes
    }

    /// Why the stream ended, if it did.
    pub fn ended(&self) -> Option<String> {
        self.queue().ended.clone()
    }

    /// Whether the stream ended because the primary was lost (silence, a broken connection),
    /// rather than closed by it; and how long before the end its last message came.
    pub fn lost(&self) -> Option<(String, Duration)> {
        let q = self.queue();
        match (&q.ended, q.lost, q.ended_at) {
            (Some(why), true, Some(at)) => {
                Some((why.clone(), at.saturating_duration_since(q.last_message)))
            }
            _ => None,
        }
    }

    /// Time since the last message other than a heartbeat or an ack came from the primary.
    pub fn since_last_message(&self) -> Duration {
        self.queue().last_message.elapsed()
    }

    /// The primary's epoch, when the stream ended by a planned switchover: this side is to go
    /// live at its end.
    pub fn handover(&self) -> Option<u64> {
        self.queue().handover
    }

    /// Asks the primary for a full snapshot to carry on from (after a divergence).
    pub fn request_resync(&self, reason: &str) {
        self.resync_requested.store(true, Ordering::Release);
        if let Err(e) = self.conn.send(Msg::ResyncRequest {
            reason: reason.to_string(),
        }) {
            tracing::warn!("cannot ask the primary for a resync: {e}");
        }
    }

    /// Stops the threads: the reader then ends.
    pub fn stop(&self, why: &str) {
        self.stop.store(true, Ordering::Release);
        self.end(why.to_string(), false);
    }

    fn end(&self, why: String, lost: bool) {
        let mut q = self.queue();
        if q.ended.is_none() {
            q.ended = Some(why);
            q.lost = lost;
            q.ended_at = Some(Instant::now());
        }
        self.arrived.notify_all();
        self.progress.notify();
    }

    /// Sends an Ack if anything moved; acks are cumulative and sent in order.
    fn ack(&self) {
        let mut last = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        let now = (
            self.received.load(Ordering::Acquire),
            self.progress.executed.load(Ordering::Acquire),
            self.progress.vtime_ns.load(Ordering::Relaxed),
        );
        if now == *last {
            return;
        }
        *last = now;
        if let Err(e) = self.conn.send(Msg::Ack {
            received: now.0,
            executed: now.1,
            vtime_ns: now.2,
        }) {
            tracing::debug!("ack not sent: {e}");
        }
    }

    fn receive_loop(&self) {
        let mut batches = BatchReader::new();
        while !self.stop.load(Ordering::Acquire) {
            let msg = match self.conn.recv_timeout(Duration::from_millis(100)) {
                Ok(None) => continue,
                Ok(Some(msg)) => msg,
                Err(e) => {
                    let why = self.conn.failure().unwrap_or_else(|| e.to_string());
                    // A close the primary announced (its Bye came first) is not a loss.
                    let clean = matches!(e, logging_channel::ChannelError::Closed(_));
                    self.end(format!("the primary is lost: {why}"), !clean);
                    return;
                }
            };
            self.queue().last_message = Instant::now();
            match msg {
                Msg::Log {
                    first_seq,
                    frames,
                    carries_output,
                    bytes,
                } => {
                    let expected = self.received.load(Ordering::Acquire);
                    if first_seq != expected {
                        self.end(
                            format!(
                                "the primary's log stream skipped from frame {expected} to {first_seq}"
                            ),
                            true,
                        );
                        return;
                    }
                    let bytes = match batches.unpack(first_seq, frames, &bytes) {
                        Ok(b) => b,
                        Err(e) => {
                            self.end(format!("the primary sent a bad log batch: {e}"), true);
                            return;
                        }
                    };
                    if carries_output {
                        self.output_end
                            .fetch_max(first_seq + u64::from(frames), Ordering::AcqRel);
                    }
                    {
                        let mut q = self.queue();
                        q.bytes += bytes.len() as u64;
                        q.chunks.push_back(bytes);
                        q.behind_since.get_or_insert_with(Instant::now);
                        self.arrived.notify_all();
                    }
                    self.received
                        .store(first_seq + u64::from(frames), Ordering::Release);
                    // An output on the primary waits for this: acknowledge now. Otherwise the
                    // acker's next round will (bandwidth: one ack per batch was most of an
                    // idle pair's traffic).
                    if carries_output {
                        self.ack();
                    }
                }
                Msg::Released { seq } => {
                    self.released.fetch_max(seq, Ordering::AcqRel);
                    self.kept
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .released(seq);
                }
                Msg::Bye { reason } => {
                    self.end(format!("the primary closed the channel: {reason}"), false);
                    return;
                }
                Msg::Refused { reason } => {
                    self.end(format!("the primary refused: {reason}"), false);
                    return;
                }
                Msg::Handover { epoch } => {
                    self.queue().handover = Some(epoch);
                    self.end("the primary handed the guest over".into(), false);
                    return;
                }
                other => {
                    tracing::warn!("unexpected message from the primary: {other:?}");
                }
            }
        }
    }

    fn ack_loop(&self) {
        let mut seen = 0;
        while !self.stop.load(Ordering::Acquire) && self.ended().is_none() {
            // Woken at once when the replay passes an output (verified output waits for that)
            // or has used up all that arrived (the primary's lag, throttle and flow control
            // count from here: one acknowledgement per batch while the backup keeps up).
            // Otherwise every ACK_PERIOD while the replay has had log waiting that long (a
            // backup behind: its position, as it moves), or whenever anything moved with
            // --ack-timer always.
            let now = self.progress.wait(seen, ACK_PERIOD);
            let woken = now != seen;
            seen = now;
            let behind = self
                .queue()
                .behind_since
                .is_some_and(|t| t.elapsed() >= ACK_PERIOD);
            if woken || behind || self.ack_timer_always.load(Ordering::Relaxed) {
                self.ack();
            }
        }
    }
}

/// How often the backup acknowledges when no output waits for it.
const ACK_PERIOD: Duration = Duration::from_millis(20);

/// The log stream as bytes, for the replayer's [`ft_core::log::LogReader`]: blocks until bytes
/// arrive; end of file once the stream ended and everything received was read.
pub struct StreamReader {
    link: Arc<BackupLink>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos >= self.current.len() {
            let mut q = self.link.queue();
            loop {
                if let Some(chunk) = q.chunks.pop_front() {
                    q.bytes -= chunk.len() as u64;
                    self.current = chunk;
                    self.pos = 0;
                    break;
                }
                if q.ended.is_some() {
                    return Ok(0);
                }
                if q.behind_since.take().is_some() {
                    // The replay waits for the next batch: everything before is replayed (but
                    // the record it read last), and the primary counts the time until it
                    // hears so as lag. One acknowledgement per batch at most.
                    self.link.progress.notify();
                }
                q = self
                    .link
                    .arrived
                    .wait_timeout(q, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
