//! One authenticated connection: the synchronous handle the VMM's threads use, and the two network
//! tasks (reader, writer) behind it.
//!
//! The handle and the tasks meet in [`Shared`]: a std `Mutex` + `Condvar` for what blocking callers
//! wait on (inbound messages, the latest Ack, log bytes in flight, death), a bounded tokio channel
//! for outgoing messages, and a `watch` flag that stops both tasks when the connection dies.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use snow::TransportState;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::detect::{kernel_view, unread, Detector, Verdict, TICK};
use crate::msg::{decode_messages, encode_message, AckDelta, Msg};
use crate::noise::{read_frame, seal, MAX_NOISE_MSG, MAX_PLAINTEXT};
use crate::{ChannelConfig, ChannelError};

/// Outgoing messages waiting for the writer task; `send` blocks when this many are queued.
const OUT_QUEUE: usize = 64;

/// The writer gathers queued messages up to about this much plaintext (four full Noise messages) into one socket write.
const WRITE_BATCH: usize = 4 * MAX_PLAINTEXT;

/// How long a side that said Bye keeps reading (and dropping) what its peer still sends, so that
/// its socket is not closed under data arriving: the kernel answers that with a reset, which
/// throws away what this side's kernel still holds for the peer, the Bye among it. A peer that
/// was stopped with its receive window full (a backup dropped for lagging) reads the Bye when it
/// runs again within this time.
const LINGER: Duration = Duration::from_secs(30);

/// How long a writer that cannot send leaves the verdict to the reader: a reset connection can
/// still hold the peer's last frames (its Bye, with the reason) unread on this side, and the
/// reader ends the connection with them once it reaches the reset.
const SEND_ERROR_GRACE: Duration = Duration::from_secs(1);

/// Counters of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// On the wire: frame headers and Noise messages, handshake excluded.
    pub bytes_sent: u64,
    /// On the wire, counted as `bytes_sent` is.
    pub bytes_received: u64,
    /// The longest time between two frames received, in microseconds: how close a healthy
    /// peer came to the timeout (what the failover timeout is chosen from).
    pub max_silence_us: u64,
    /// Bytes of log batches sent and not yet covered by an Ack's `received`.
    pub log_bytes_outstanding: u64,
    /// Messages of every kind, heartbeats and acks included.
    pub msgs_sent: u64,
    /// Messages of every kind received, heartbeats and acks included.
    pub msgs_received: u64,
    /// Heartbeats sent (each after `heartbeat` with nothing else to send).
    pub heartbeats_sent: u64,
    /// Times the peer fell silent for two heartbeats or more while its host still acknowledged
    /// this side's data (a slow peer: waited for, up to the timeout).
    pub slow_peer_episodes: u64,
    /// Whether the peer is slow now.
    pub peer_slow: bool,
    /// The longest this side's data waited for the peer's kernel to acknowledge it, in
    /// microseconds (as the detector saw it, every 10 ms): how close a healthy peer came to
    /// the unacknowledged-data timeout.
    pub max_unacked_us: u64,
    /// The longest silence of the peer the detector held against it (nothing of it waiting
    /// unread in this side's socket meanwhile), in microseconds, to its 10 ms tick: how close
    /// the peer came to the timeout. `max_silence_us` also counts this side's own reader
    /// falling behind.
    pub max_quiet_us: u64,
    /// Ticks of the detector that came 50 ms late or more (this side was not running); the
    /// time in between is not held against the peer.
    pub detector_stalls: u64,
}

/// A primary-backup connection after a successful handshake. Clones share the connection; it
/// closes (with a Bye) when the last clone is dropped.
///
/// Every method is synchronous and must be called from a plain thread, not from inside an async
/// task. None makes a network call: messages go to a bounded queue that the network task drains.
#[derive(Clone)]
pub struct Connection {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    out: mpsc::Sender<Outgoing>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Best effort: a full queue or a dead task simply means no Bye. The writer ends once it
        // has drained the queue, as this was the last sender.
        if self.shared.death().is_none() {
            if let Ok(bytes) = encode_message(&Msg::Bye {
                reason: "connection dropped".into(),
            }) {
                let _ = self.out.try_send(Outgoing {
                    bytes,
                    msgs: 1,
                    bye: Some("connection dropped".into()),
                    lazy: false,
                });
            }
        }
    }
}

/// Framed plaintext of one message.
struct Outgoing {
    bytes: Vec<u8>,
    msgs: u64,
    /// This is a Bye: close after sending it, with this reason.
    bye: Option<String>,
    /// It may wait for company: it leaves with the next message that leaves, or when a
    /// heartbeat would be nearly due ([`lazy_deadline`]), in place of the heartbeat.
    lazy: bool,
}

/// How long before a heartbeat would be due a message that may wait leaves in its place: a
/// twenty-fifth of the period (2 ms of 50), so that the peer's answer to it (the backup's
/// acknowledgement of a batch) also comes within the peer's own period, in place of the
/// peer's heartbeat, whatever the two sides' timers' jitter.
fn lazy_deadline(heartbeat: Duration) -> Duration {
    heartbeat - heartbeat / 25
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeathKind {
    PeerLost,
    Closed,
    Broken,
}

#[derive(Clone, Debug)]
struct Death {
    kind: DeathKind,
    reason: String,
}

impl Death {
    fn error(&self) -> ChannelError {
        let reason = self.reason.clone();
        match self.kind {
            DeathKind::PeerLost => ChannelError::PeerLost(reason),
            DeathKind::Closed => ChannelError::Closed(reason),
            DeathKind::Broken => ChannelError::Broken(reason),
        }
    }
}

#[derive(Default)]
struct State {
    death: Option<Death>,
    ack: (u64, u64, u64),
    /// Highest `received` acknowledged so far (acks are cumulative; a smaller one releases nothing).
    received: u64,
    /// Log batches in flight: (first seq past the batch, bytes).
    in_flight: VecDeque<(u64, usize)>,
    in_flight_bytes: usize,
    inbound: VecDeque<Msg>,
}

struct Shared {
    peer: SocketAddr,
    log_buffer: usize,
    close_wait: Duration,
    state: Mutex<State>,
    /// Signalled on every change of `state`.
    changed: Condvar,
    dead: watch::Sender<bool>,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    max_silence_us: AtomicU64,
    msgs_sent: AtomicU64,
    msgs_received: AtomicU64,
    heartbeats_sent: AtomicU64,
    /// When the connection started; `last_frame_us` counts from it.
    started: Instant,
    /// The last frame received, microseconds after `started`.
    last_frame_us: AtomicU64,
    slow_peer_episodes: AtomicU64,
    peer_slow: std::sync::atomic::AtomicBool,
    max_unacked_us: AtomicU64,
    max_quiet_us: AtomicU64,
    detector_stalls: AtomicU64,
    /// This side's Bye is on its way: the peer closing the connection now is the answer to it.
    bye_sent: std::sync::atomic::AtomicBool,
    /// The last write to the socket, microseconds after `started`.
    last_write_us: AtomicU64,
    /// The heartbeat period.
    heartbeat: Duration,
    /// The acknowledgements sent, for the next one's [`Msg::AckDelta`] (held while it is
    /// queued, so that they are queued in the order they are encoded).
    ack_sent: Mutex<AckDelta>,
    /// The acknowledgements received, for the next [`Msg::AckDelta`].
    ack_received: Mutex<AckDelta>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(
        &self,
        st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> MutexGuard<'a, State> {
        match deadline {
            None => self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                self.changed
                    .wait_timeout(st, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        }
    }

    fn death(&self) -> Option<Death> {
        self.lock().death.clone()
    }

    /// Marks the connection dead (the first reason wins), wakes every blocked caller and stops
    /// both network tasks.
    fn die(&self, kind: DeathKind, reason: String) {
        let mut st = self.lock();
        if st.death.is_none() {
            match kind {
                DeathKind::Closed => {
                    tracing::info!(peer = %self.peer, "logging channel closed: {reason}")
                }
                _ => {
                    tracing::warn!(peer = %self.peer, "logging channel to {} lost: {reason}", self.peer)
                }
            }
            st.death = Some(Death { kind, reason });
        }
        drop(st);
        self.changed.notify_all();
        self.dead.send_replace(true);
    }

    /// Handles one message from the peer; returns false when it ends the connection.
    fn deliver(&self, msg: Msg) -> bool {
        self.msgs_received.fetch_add(1, Ordering::Relaxed);
        let msg = match msg {
            Msg::AckDelta {
                received,
                pending,
                vtime_ns,
            } => {
                let mut last = self
                    .ack_received
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let (received, executed, vtime_ns) = last.apply(received, pending, vtime_ns);
                Msg::Ack {
                    received,
                    executed,
                    vtime_ns,
                }
            }
            Msg::Ack {
                received,
                executed,
                vtime_ns,
            } => {
                // The absolute form (version 5): the next delta is relative to it too.
                self.ack_received
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .last = (received, executed, vtime_ns);
                msg
            }
            other => other,
        };
        match msg {
            Msg::Heartbeat => true,
            Msg::Ack {
                received,
                executed,
                vtime_ns,
            } => {
                let mut st = self.lock();
                st.ack = (received, executed, vtime_ns);
                if received > st.received {
                    st.received = received;
                    let mut freed = 0;
                    st.in_flight.retain(|&(end, bytes)| {
                        let keep = end > received;
                        if !keep {
                            freed += bytes;
                        }
                        keep
                    });
                    st.in_flight_bytes -= freed;
                }
                drop(st);
                self.changed.notify_all();
                true
            }
            Msg::Bye { reason } => {
                self.lock().inbound.push_back(Msg::Bye {
                    reason: reason.clone(),
                });
                self.die(DeathKind::Closed, format!("the peer said Bye: {reason}"));
                false
            }
            other => {
                self.lock().inbound.push_back(other);
                self.changed.notify_all();
                true
            }
        }
    }
}

/// Resolves once the connection is dead (or its state is gone).
async fn dead_signal(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|dead| *dead).await;
}

impl Connection {
    /// Starts the network tasks of a connection whose handshake just completed.
    pub(crate) fn start(
        rt: &tokio::runtime::Handle,
        stream: TcpStream,
        noise: TransportState,
        cfg: &ChannelConfig,
        peer: SocketAddr,
    ) -> Connection {
        let (dead, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            peer,
            log_buffer: cfg.log_buffer,
            close_wait: cfg.timeout,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            dead,
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            max_silence_us: AtomicU64::new(0),
            msgs_sent: AtomicU64::new(0),
            msgs_received: AtomicU64::new(0),
            heartbeats_sent: AtomicU64::new(0),
            started: Instant::now(),
            last_frame_us: AtomicU64::new(0),
            slow_peer_episodes: AtomicU64::new(0),
            peer_slow: std::sync::atomic::AtomicBool::new(false),
            max_unacked_us: AtomicU64::new(0),
            max_quiet_us: AtomicU64::new(0),
            detector_stalls: AtomicU64::new(0),
            bye_sent: std::sync::atomic::AtomicBool::new(false),
            last_write_us: AtomicU64::new(0),
            heartbeat: cfg.heartbeat,
            ack_sent: Mutex::new(AckDelta::default()),
            ack_received: Mutex::new(AckDelta::default()),
        });
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let noise = Arc::new(Mutex::new(noise));
        // The detector's own handle on the socket, to ask the kernel about it (a duplicate:
        // it stays valid whatever the reader and writer have dropped).
        let watched = match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(
                    "logging channel to {peer}: no kernel view of the connection ({e}): \
                     a dead host is detected by silence alone"
                );
                None
            }
        };
        let (rd, wr) = stream.into_split();
        // Buffered: a frame is a length and a body, two reads each without it, and a burst of
        // frames comes in one.
        let rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
        rt.spawn(reader(shared.clone(), noise.clone(), rd));
        rt.spawn(writer(shared.clone(), noise, wr, out_rx, cfg.heartbeat));
        let detector = Detector::new(cfg.heartbeat, cfg.timeout, cfg.unacked_timeout);
        rt.spawn(detect(shared.clone(), watched, detector));
        Connection {
            handle: Arc::new(Handle { shared, out }),
        }
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The error a dead connection reports.
    fn dead_error(&self) -> ChannelError {
        self.shared()
            .death()
            .map(|d| d.error())
            .unwrap_or_else(|| ChannelError::Closed("the network task ended".into()))
    }

    fn enqueue(&self, out: Outgoing) -> Result<(), ChannelError> {
        if let Some(death) = self.shared().death() {
            return Err(death.error());
        }
        self.handle
            .out
            .blocking_send(out)
            .map_err(|_| self.dead_error())
    }

    /// The other side's socket address (for a backup, the primary it connected to; for a
    /// primary, the backup's source address and port).
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared().peer
    }

    /// Queues any message (a `Log` goes through [`Connection::send_log`]'s flow control; an
    /// `Ack` travels as [`Msg::AckDelta`]). Blocks only while the bounded outgoing queue is
    /// full; returns Err at once on a dead connection.
    pub fn send(&self, msg: Msg) -> Result<(), ChannelError> {
        match msg {
            Msg::Log {
                first_seq,
                frames,
                carries_output,
                bytes,
            } => self.send_log(first_seq, frames, carries_output, bytes),
            Msg::Ack {
                received,
                executed,
                vtime_ns,
            } => {
                let mut last = self
                    .shared()
                    .ack_sent
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let mut next = *last;
                let bytes = encode_message(&next.encode((received, executed, vtime_ns)))?;
                self.enqueue(Outgoing {
                    bytes,
                    msgs: 1,
                    bye: None,
                    lazy: false,
                })?;
                *last = next;
                Ok(())
            }
            msg => {
                let bye = match &msg {
                    Msg::Bye { reason } => Some(reason.clone()),
                    _ => None,
                };
                self.enqueue(Outgoing {
                    bytes: encode_message(&msg)?,
                    msgs: 1,
                    bye,
                    lazy: false,
                })
            }
        }
    }

    /// How long since this side last wrote to the socket (a message or a heartbeat).
    pub fn since_sent(&self) -> Duration {
        let shared = self.shared();
        let at =
            shared.started + Duration::from_micros(shared.last_write_us.load(Ordering::Acquire));
        at.elapsed()
    }

    /// The heartbeat period: this side writes at least this often.
    pub fn heartbeat(&self) -> Duration {
        self.shared().heartbeat
    }

    /// Queues the log batch of frames `first_seq .. first_seq + frames` (`carries_output`: one
    /// of them produces an output, see [`Msg::Log`]).
    ///
    /// Flow control: while other batches are in flight (sent, not yet covered by an Ack's
    /// `received`) and adding this one would exceed `log_buffer` bytes, blocks until Acks make room.
    /// A batch is always accepted when nothing is in flight, so one larger than the buffer cannot
    /// deadlock. Returns Err at once if the connection is or becomes dead. Batches from several
    /// threads at once are sent in an unspecified order: send the log from one thread.
    pub fn send_log(
        &self,
        first_seq: u64,
        frames: u32,
        carries_output: bool,
        bytes: Vec<u8>,
    ) -> Result<(), ChannelError> {
        self.queue_log(first_seq, frames, carries_output, bytes, false)
    }

    /// As [`Connection::send_log`], for a batch that may wait for company: it leaves with the
    /// next message this side sends, or in place of the next heartbeat, a little before that
    /// would be due (never later: the heartbeat's period and so the failure detection are the
    /// same). An idle guest's batch, made to leave once per heartbeat period, then saves the
    /// heartbeat on this side and, acknowledged at once, the heartbeat on the other.
    pub fn send_log_lazy(
        &self,
        first_seq: u64,
        frames: u32,
        carries_output: bool,
        bytes: Vec<u8>,
    ) -> Result<(), ChannelError> {
        self.queue_log(first_seq, frames, carries_output, bytes, true)
    }

    fn queue_log(
        &self,
        first_seq: u64,
        frames: u32,
        carries_output: bool,
        bytes: Vec<u8>,
        lazy: bool,
    ) -> Result<(), ChannelError> {
        let len = bytes.len();
        let end = first_seq.saturating_add(u64::from(frames));
        let msg = Msg::Log {
            first_seq,
            frames,
            carries_output,
            bytes,
        };
        let encoded = encode_message(&msg)?;
        let shared = self.shared();
        let mut st = shared.lock();
        loop {
            if let Some(death) = &st.death {
                return Err(death.error());
            }
            if st.in_flight_bytes == 0
                || st.in_flight_bytes.saturating_add(len) <= shared.log_buffer
            {
                break;
            }
            st = shared.wait(st, None);
        }
        st.in_flight.push_back((end, len));
        st.in_flight_bytes += len;
        drop(st);
        self.enqueue(Outgoing {
            bytes: encoded,
            msgs: 1,
            bye: None,
            lazy,
        })
    }

    /// The latest Ack seen: (received, executed, vtime_ns); (0, 0, 0) before any.
    pub fn acked(&self) -> (u64, u64, u64) {
        self.shared().lock().ack
    }

    /// Blocks until the Ack differs from `seen`, `timeout` passes or the connection dies; returns
    /// the current value.
    pub fn wait_ack(&self, seen: (u64, u64, u64), timeout: Duration) -> (u64, u64, u64) {
        let shared = self.shared();
        let deadline = Instant::now() + timeout;
        let mut st = shared.lock();
        while st.ack == seen && st.death.is_none() && Instant::now() < deadline {
            st = shared.wait(st, Some(deadline));
        }
        st.ack
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Result<Option<Msg>, ChannelError> {
        let shared = self.shared();
        let mut st = shared.lock();
        loop {
            if let Some(msg) = st.inbound.pop_front() {
                return Ok(Some(msg));
            }
            if let Some(death) = &st.death {
                return Err(death.error());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            st = shared.wait(st, deadline);
        }
    }

    /// The next message other than Heartbeat and Ack (Acks update [`Connection::acked`]).
    /// Messages that arrived before the connection died are still returned, in order; then the
    /// reason it died: `PeerLost` (silence past `timeout`, or the TCP connection dropped without
    /// a Bye), `Closed` (a Bye either way), `Broken` (a frame failed authentication, a message
    /// did not decode).
    pub fn recv(&self) -> Result<Msg, ChannelError> {
        loop {
            if let Some(msg) = self.recv_until(None)? {
                return Ok(msg);
            }
        }
    }

    /// As [`Connection::recv`], or `Ok(None)` once `d` has passed.
    pub fn recv_timeout(&self, d: Duration) -> Result<Option<Msg>, ChannelError> {
        self.recv_until(Some(Instant::now() + d))
    }

    /// As [`Connection::recv`], without waiting.
    pub fn try_recv(&self) -> Result<Option<Msg>, ChannelError> {
        self.recv_until(Some(Instant::now()))
    }

    /// False once the connection has died for any reason (see [`Connection::recv`]); it never
    /// comes back. Messages that arrived before may still be waiting in [`Connection::recv`].
    pub fn is_alive(&self) -> bool {
        self.shared().lock().death.is_none()
    }

    /// Why the connection died, if it did, e.g. "frame failed authentication: altered on the
    /// wire?" or "peer silent for 2.0 s".
    pub fn failure(&self) -> Option<String> {
        self.shared().death().map(|d| d.reason)
    }

    /// The connection's counters now (each read on its own, so not one consistent instant).
    pub fn stats(&self) -> ChannelStats {
        let shared = self.shared();
        ChannelStats {
            bytes_sent: shared.bytes_sent.load(Ordering::Relaxed),
            bytes_received: shared.bytes_received.load(Ordering::Relaxed),
            max_silence_us: shared.max_silence_us.load(Ordering::Relaxed),
            log_bytes_outstanding: shared.lock().in_flight_bytes as u64,
            msgs_sent: shared.msgs_sent.load(Ordering::Relaxed),
            msgs_received: shared.msgs_received.load(Ordering::Relaxed),
            heartbeats_sent: shared.heartbeats_sent.load(Ordering::Relaxed),
            slow_peer_episodes: shared.slow_peer_episodes.load(Ordering::Relaxed),
            peer_slow: shared.peer_slow.load(Ordering::Relaxed),
            max_unacked_us: shared.max_unacked_us.load(Ordering::Relaxed),
            max_quiet_us: shared.max_quiet_us.load(Ordering::Relaxed),
            detector_stalls: shared.detector_stalls.load(Ordering::Relaxed),
        }
    }

    /// Sends `Bye { reason }` after everything already queued, then closes. Waits at most the
    /// configured timeout for the Bye to leave; the connection is dead when this returns.
    pub fn close(&self, reason: &str) {
        let queued = self.send(Msg::Bye {
            reason: reason.to_owned(),
        });
        let shared = self.shared();
        if queued.is_ok() {
            let deadline = Instant::now() + shared.close_wait;
            let mut st = shared.lock();
            while st.death.is_none() && Instant::now() < deadline {
                st = shared.wait(st, Some(deadline));
            }
        }
        shared.die(DeathKind::Closed, format!("closed locally: {reason}"));
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.shared().peer)
            .field("failure", &self.failure())
            .finish()
    }
}

async fn reader(
    shared: Arc<Shared>,
    noise: Arc<Mutex<TransportState>>,
    mut rd: tokio::io::BufReader<OwnedReadHalf>,
) {
    let mut dead = shared.dead.subscribe();
    let mut frame = Box::new([0u8; MAX_NOISE_MSG]);
    let mut chunk = vec![0u8; MAX_NOISE_MSG];
    let mut plain = Vec::new();
    let mut last = Instant::now();
    loop {
        let read = tokio::select! {
            _ = dead_signal(&mut dead) => return linger(&shared, rd).await,
            r = read_frame(&mut rd, &mut frame) => r,
        };
        // Silence is the detector's to judge (`detect`); the reader only reads.
        let len = match read {
            Ok(len) => len,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                if shared.bye_sent.load(Ordering::Acquire) {
                    // The peer read this side's Bye and closed before this side's writer
                    // marked the connection closed.
                    return shared.die(DeathKind::Closed, "closed locally after a Bye".into());
                }
                let why = "the peer closed the TCP connection without a Bye";
                return shared.die(DeathKind::PeerLost, why.into());
            }
            Err(e) => {
                let why = format!("cannot receive from the peer: {e}");
                return shared.die(DeathKind::PeerLost, why);
            }
        };
        shared
            .bytes_received
            .fetch_add(2 + len as u64, Ordering::Relaxed);
        let gap = u64::try_from(last.elapsed().as_micros()).unwrap_or(u64::MAX);
        shared.max_silence_us.fetch_max(gap, Ordering::Relaxed);
        last = Instant::now();
        let at = u64::try_from(last.duration_since(shared.started).as_micros()).unwrap_or(u64::MAX);
        shared.last_frame_us.store(at, Ordering::Release);
        let decrypted = noise
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read_message(&frame[..len], &mut chunk);
        let Ok(n) = decrypted else {
            let why = "frame failed authentication: altered on the wire?";
            return shared.die(DeathKind::Broken, why.into());
        };
        if n == 0 {
            // A heartbeat (version 6): a Noise message with nothing inside.
            shared.msgs_received.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        plain.extend_from_slice(&chunk[..n]);
        let msgs = match decode_messages(&mut plain) {
            Ok(msgs) => msgs,
            Err(e) => {
                let why = format!("the peer sent a message this side cannot read: {e}");
                return shared.die(DeathKind::Broken, why);
            }
        };
        for msg in msgs {
            if !shared.deliver(msg) {
                return;
            }
        }
    }
}

/// After this side's Bye: reads and drops what the peer sends until it closes, or [`LINGER`].
async fn linger(shared: &Shared, mut rd: tokio::io::BufReader<OwnedReadHalf>) {
    if !shared.bye_sent.load(Ordering::Acquire) {
        return;
    }
    let mut sink = vec![0u8; 64 << 10];
    let drain = async {
        use tokio::io::AsyncReadExt;
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

async fn writer(
    shared: Arc<Shared>,
    noise: Arc<Mutex<TransportState>>,
    mut wr: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Outgoing>,
    heartbeat: Duration,
) {
    let mut dead = shared.dead.subscribe();
    let mut wire = Vec::new();
    // Messages that may wait (`Outgoing::lazy`), in order, and how many.
    let mut held: Vec<u8> = Vec::new();
    let mut held_msgs = 0u64;
    let mut last_write = tokio::time::Instant::now();
    loop {
        // A heartbeat goes once nothing went for a period; what may wait goes a little before.
        let due = if held_msgs > 0 {
            last_write + lazy_deadline(heartbeat)
        } else {
            last_write + heartbeat
        };
        let next = tokio::select! {
            _ = dead_signal(&mut dead) => return,
            r = tokio::time::timeout_at(due, queue.recv()) => r,
        };
        let (mut plain, mut msgs, mut bye) = match next {
            Err(_) if held_msgs > 0 => (
                std::mem::take(&mut held),
                std::mem::take(&mut held_msgs),
                None,
            ),
            Err(_) => {
                // A heartbeat (version 6): a Noise message with nothing inside.
                shared.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                (Vec::new(), 1, None)
            }
            Ok(None) => {
                if held_msgs > 0 {
                    // The last sender is gone: what waited still goes, then the close.
                    let _ =
                        write_sealed(&shared, &noise, &mut wr, &mut dead, &held, &mut wire).await;
                }
                let _ = wr.shutdown().await;
                return shared.die(DeathKind::Closed, "closed locally".into());
            }
            Ok(Some(out)) if out.lazy && out.bye.is_none() => {
                held.extend_from_slice(&out.bytes);
                held_msgs += out.msgs;
                continue;
            }
            Ok(Some(out)) => {
                let mut plain = std::mem::take(&mut held);
                plain.extend_from_slice(&out.bytes);
                (plain, std::mem::take(&mut held_msgs) + out.msgs, out.bye)
            }
        };
        // Whatever else is queued goes along, waiting or not.
        while bye.is_none() && plain.len() < WRITE_BATCH {
            let Ok(out) = queue.try_recv() else { break };
            plain.extend_from_slice(&out.bytes);
            msgs += out.msgs;
            bye = out.bye;
        }
        if bye.is_some() {
            shared.bye_sent.store(true, Ordering::Release);
        }
        match write_sealed(&shared, &noise, &mut wr, &mut dead, &plain, &mut wire).await {
            Ok(()) => {}
            Err(None) => return,
            Err(Some(death)) => return shared.die(death.kind, death.reason),
        }
        last_write = tokio::time::Instant::now();
        let at = u64::try_from(
            last_write
                .into_std()
                .duration_since(shared.started)
                .as_micros(),
        )
        .unwrap_or(u64::MAX);
        shared.last_write_us.store(at, Ordering::Release);
        shared.msgs_sent.fetch_add(msgs, Ordering::Relaxed);
        if let Some(reason) = bye {
            let _ = wr.shutdown().await;
            return shared.die(DeathKind::Closed, format!("closed locally: {reason}"));
        }
    }
}

/// Seals `plain` (empty: a heartbeat, one Noise message with nothing inside) and writes it, a
/// slice at a time, so that one large message neither holds a runtime thread for long nor
/// needs a second copy of itself. `Err(None)`: the connection died meanwhile; `Err(Some)`: how
/// it is to die.
async fn write_sealed(
    shared: &Shared,
    noise: &Mutex<TransportState>,
    wr: &mut OwnedWriteHalf,
    dead: &mut watch::Receiver<bool>,
    plain: &[u8],
    wire: &mut Vec<u8>,
) -> Result<(), Option<Death>> {
    let slices: Vec<&[u8]> = if plain.is_empty() {
        vec![plain]
    } else {
        plain.chunks(WRITE_BATCH).collect()
    };
    for slice in slices {
        wire.clear();
        let sealed = seal(
            &mut noise.lock().unwrap_or_else(PoisonError::into_inner),
            slice,
            wire,
        );
        if let Err(e) = sealed {
            return Err(Some(Death {
                kind: DeathKind::Broken,
                reason: format!("cannot encrypt: {e}"),
            }));
        }
        let written = tokio::select! {
            _ = dead_signal(dead) => return Err(None),
            r = async { wr.write_all(wire).await?; wr.flush().await } => r,
        };
        if let Err(e) = written {
            let _ = tokio::time::timeout(SEND_ERROR_GRACE, dead_signal(dead)).await;
            return Err(Some(Death {
                kind: DeathKind::PeerLost,
                reason: format!("cannot send to the peer: {e}"),
            }));
        }
        shared
            .bytes_sent
            .fetch_add(wire.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// The failure detector of one connection (`crate::detect`): every [`TICK`], the time since the
/// last frame and the kernel's view of the socket; ends the connection when they say the peer
/// is lost.
async fn detect(shared: Arc<Shared>, sock: Option<OwnedFd>, mut d: Detector) {
    let mut dead = shared.dead.subscribe();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = dead_signal(&mut dead) => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let last_frame =
            shared.started + Duration::from_micros(shared.last_frame_us.load(Ordering::Acquire));
        let kernel = sock.as_ref().and_then(|s| kernel_view(s.as_fd()));
        let waiting = sock.as_ref().map_or(0, |s| unread(s.as_fd()));
        let verdict = d.observe(now, last_frame, kernel, waiting);
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        shared
            .max_unacked_us
            .store(micros(d.max_unacked), Ordering::Relaxed);
        shared
            .max_quiet_us
            .store(micros(d.max_quiet), Ordering::Relaxed);
        shared.detector_stalls.store(d.stalls, Ordering::Relaxed);
        shared
            .slow_peer_episodes
            .store(d.slow_episodes, Ordering::Relaxed);
        let was_slow = shared.peer_slow.swap(d.is_slow(), Ordering::Relaxed);
        match verdict {
            Verdict::Lost(why) => return shared.die(DeathKind::PeerLost, why),
            Verdict::Slow if !was_slow => tracing::debug!(
                peer = %shared.peer,
                "logging channel: the peer is silent but its host acknowledges: slow, waiting"
            ),
            _ => {}
        }
    }
}
