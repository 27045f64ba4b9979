//! The live boundary of a standalone run: inputs come from the host as they happen.
//!
//! Virtual time follows one of two clocks ([`Clock`]): the host's monotonic clock (the default:
//! the guest's time is real time), or a virtual clock that advances a fixed step at every
//! synchronous exit and jumps to the next timer deadline when the guest halts. With the virtual
//! clock and a scripted input file, two runs of the same guest are identical, whatever the
//! host's speed: a whole Linux boot takes the same exits every time.
//!
//! Serial input is delivered when the guest halts (it is waiting for something), or, for a
//! guest that polls without halting, once it has waited [`LiveBoundary::INPUT_LATENCY`]: so a
//! scripted input reaches a guest that waits for it at the same positions in every run.

use crate::boundary::{Attention, Boundary, BoundaryError, Input, OutputKind, Point, WaitRequest};
use crate::exit::SyncExit;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What virtual time follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// The host's monotonic clock.
    Host,
    /// `step_ns` per synchronous exit, and idle time skipped: deterministic.
    Virtual {
        /// Nanoseconds of virtual time per synchronous exit.
        step_ns: u64,
    },
}

/// The RTC epoch of a virtual-clock run: 2026-01-01T00:00:00Z, the same in every run.
pub const VIRTUAL_EPOCH: i64 = 1_767_225_600;

/// Where serial input comes from.
pub enum SerialSource {
    /// No input: the line stays idle.
    None,
    /// All the input, known up front (a script file): it waits for the guest to be ready.
    Bytes(Vec<u8>),
    /// Any reader (stdin, a file, a pipe), read on a thread of its own.
    Reader(Box<dyn Read + Send>),
    /// Bytes others send as they come (the API socket's consoles, and stdin forwarded), after
    /// a script known up front (as [`SerialSource::Bytes`]; may be empty). The line closes when
    /// every sender is gone.
    Channel {
        /// Input known up front.
        script: Vec<u8>,
        /// Bytes as they arrive.
        rx: Receiver<Vec<u8>>,
    },
}

/// Frames a NIC's host side received, waiting for the guest: a bounded queue (a frame that
/// finds it full is dropped at the tap, as a NIC drops what it has no room for).
#[derive(Default)]
pub struct NetQueue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// Frames dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl NetQueue {
    /// The most frames that wait for the guest.
    pub const CAPACITY: usize = 256;

    /// Queues a frame; false (and counted) if the queue is full.
    pub fn push(&self, frame: Vec<u8>) -> bool {
        let mut q = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= Self::CAPACITY {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.push_back(frame);
        true
    }

    fn pop(&self) -> Option<Vec<u8>> {
        self.frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
}

/// The host side of the guest's NIC: frames in (filled by a reader of the tap), frames out.
pub struct NetPort {
    /// Frames received, waiting for the guest.
    pub rx: Arc<NetQueue>,
    /// Where transmitted frames go (one `write` per frame).
    pub tx: Box<dyn Write + Send>,
}

/// Inputs from the host, outputs to a writer.
pub struct LiveBoundary {
    clock: Clock,
    start: Instant,
    /// Virtual time at `start` (non-zero after a restore), or, with the virtual clock, the
    /// idle time skipped so far.
    base_ns: u64,
    /// Synchronous exits seen (the virtual clock's ticks).
    exits: u64,
    last_clock: u64,
    rx: Option<Receiver<Vec<u8>>>,
    pending: VecDeque<u8>,
    /// Virtual time at which the oldest pending byte arrived.
    pending_since: Option<u64>,
    /// Input is held until the guest has printed this (then `None`).
    gate: Option<Vec<u8>>,
    /// The last output bytes, to find the gate in.
    recent: Vec<u8>,
    out: Box<dyn Write + Send>,
    attention: Option<Attention>,
    net: Option<NetPort>,
    /// How long a due timer tick or a pending interrupt may wait at kicks for a synchronous
    /// exit before the VMM acts at a kick ([`Boundary::kick_due`]).
    kick_bound: Duration,
}

impl LiveBoundary {
    /// How long received bytes wait for the guest to halt before they are delivered anyway.
    pub const INPUT_LATENCY: Duration = Duration::from_millis(50);
    /// The longest a halted wait sleeps before it looks at the [`Attention`] flag again.
    pub const ATTENTION_SLICE: Duration = Duration::from_millis(2);

    /// A boundary whose clock starts now, reading serial input from `input` and writing serial
    /// output to `out`.
    pub fn new(input: SerialSource, out: Box<dyn Write + Send>) -> Self {
        Self::with_clock(input, out, Clock::Host)
    }

    /// The same, with the given clock.
    pub fn with_clock(input: SerialSource, out: Box<dyn Write + Send>, clock: Clock) -> Self {
        let mut pending = VecDeque::new();
        let rx = match input {
            SerialSource::None => None,
            SerialSource::Bytes(bytes) => {
                pending.extend(bytes);
                None
            }
            SerialSource::Reader(r) => {
                let (tx, rx) = mpsc::channel();
                forward_serial_input(r, tx).then_some(rx)
            }
            SerialSource::Channel { script, rx } => {
                pending.extend(script);
                Some(rx)
            }
        };
        let pending_since = (!pending.is_empty()).then_some(0);
        LiveBoundary {
            clock,
            start: Instant::now(),
            base_ns: 0,
            exits: 0,
            last_clock: 0,
            rx,
            pending,
            pending_since,
            gate: None,
            recent: Vec::new(),
            out,
            attention: None,
            net: None,
            kick_bound: Duration::ZERO,
        }
    }

    /// Lets a due timer tick or a pending interrupt wait up to `bound` at kicks for a
    /// synchronous exit (where a recorder needs no checkpoint) before the VMM acts at a kick.
    pub fn with_kick_bound(mut self, bound: Duration) -> Self {
        self.kick_bound = bound;
        self
    }

    /// Gives the guest a NIC whose frames come from and go to `port`.
    pub fn with_net(mut self, port: NetPort) -> Self {
        self.net = Some(port);
        self
    }

    /// Sends transmitted frames to `tx` from now on (keeps the receive queue).
    pub fn set_net_output(&mut self, tx: Box<dyn Write + Send>) {
        if let Some(n) = self.net.as_mut() {
            n.tx = tx;
        }
    }

    fn take_frame(&mut self, ready: bool) -> Option<Input> {
        if !ready {
            return None;
        }
        self.net.as_ref()?.rx.pop().map(Input::NetRx)
    }

    /// Sends serial output to `out` from now on.
    pub fn set_output(&mut self, out: Box<dyn Write + Send>) {
        self.out = out;
    }

    /// Holds serial input back until the guest has printed `marker` (like `expect`): input sent
    /// before the guest reads it would be lost, and the guest's output is deterministic.
    pub fn input_after(mut self, marker: &[u8]) -> Self {
        if !marker.is_empty() {
            self.gate = Some(marker.to_vec());
        }
        self
    }

    /// Virtual time now, from the chosen clock; never goes back.
    fn host_ns(&mut self) -> u64 {
        let t = match self.clock {
            Clock::Host => u64::try_from(self.start.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_add(self.base_ns),
            Clock::Virtual { step_ns } => self
                .exits
                .saturating_mul(step_ns)
                .saturating_add(self.base_ns),
        };
        self.last_clock = self.last_clock.max(t);
        self.last_clock
    }

    /// Moves whatever the reader thread has sent into `pending`, without blocking.
    fn drain_channel(&mut self) {
        let Some(rx) = &self.rx else { return };
        let mut received = Vec::new();
        let closed = loop {
            match rx.try_recv() {
                Ok(bytes) => received.push(bytes),
                Err(mpsc::TryRecvError::Empty) => break false,
                Err(mpsc::TryRecvError::Disconnected) => break true,
            }
        };
        if closed {
            self.rx = None;
        }
        for bytes in received {
            self.push_pending(bytes);
        }
    }

    fn push_pending(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() && self.pending.is_empty() {
            self.pending_since = Some(self.host_ns());
        }
        self.pending.extend(bytes);
    }

    fn take_pending(&mut self, room: usize) -> Option<Input> {
        if room == 0 || self.pending.is_empty() || self.gate.is_some() {
            return None;
        }
        let n = room.min(self.pending.len());
        let bytes: Vec<u8> = self.pending.drain(..n).collect();
        self.pending_since = if self.pending.is_empty() {
            None
        } else {
            Some(self.host_ns())
        };
        Some(Input::SerialRx(bytes))
    }
}

impl Boundary for LiveBoundary {
    fn rtc_epoch(&mut self) -> Result<i64, BoundaryError> {
        if let Clock::Virtual { .. } = self.clock {
            return Ok(VIRTUAL_EPOCH);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| BoundaryError::Other(format!("host clock before 1970: {e}")))?;
        Ok(i64::try_from(now.as_secs()).unwrap_or(i64::MAX))
    }

    fn exit(&mut self, _exit: &SyncExit) -> Result<(), BoundaryError> {
        self.exits += 1;
        Ok(())
    }

    fn read_clock(&mut self) -> Result<u64, BoundaryError> {
        Ok(self.host_ns())
    }

    fn poll(&mut self, point: Point, req: &WaitRequest) -> Result<Option<Input>, BoundaryError> {
        if let Some(deadline) = req.deadline_ns {
            let now = self.host_ns();
            if now >= deadline && now > req.now_ns {
                return Ok(Some(Input::Time(now)));
            }
        }
        if point == Point::Kick {
            // Only time is delivered at a kick: see `Boundary::kick_due`.
            return Ok(None);
        }
        if let Some(frame) = self.take_frame(req.net_ready) {
            return Ok(Some(frame));
        }
        self.drain_channel();
        let now = self.host_ns();
        let latency = Self::INPUT_LATENCY.as_nanos() as u64;
        let overdue = self
            .pending_since
            .is_some_and(|t| now.saturating_sub(t) >= latency);
        if overdue {
            return Ok(self.take_pending(req.serial_room));
        }
        Ok(None)
    }

    fn wait(&mut self, req: &WaitRequest) -> Result<Input, BoundaryError> {
        loop {
            self.drain_channel();
            if let Some(input) = self.take_pending(req.serial_room) {
                return Ok(input);
            }
            if let Some(frame) = self.take_frame(req.net_ready) {
                return Ok(frame);
            }
            let now = self.host_ns();
            if let Some(deadline) = req.deadline_ns {
                if now >= deadline {
                    return Ok(Input::Time(now.max(req.now_ns)));
                }
                if let Clock::Virtual { .. } = self.clock {
                    // Idle time is skipped: the deadline is now.
                    self.base_ns += deadline - now;
                    self.last_clock = deadline;
                    return Ok(Input::Time(deadline));
                }
            }
            if self
                .attention
                .as_ref()
                .is_some_and(|a| a.load(Ordering::Acquire))
            {
                return Err(BoundaryError::Interrupted);
            }
            // Sleep in slices, so that a control request is seen within one.
            let slice = Self::ATTENTION_SLICE;
            let timeout = Some(
                req.deadline_ns
                    .map_or(slice, |d| Duration::from_nanos(d.saturating_sub(now)))
                    .min(slice),
            );
            // Input only counts while the guest can take it.
            let rx = if req.serial_room > 0 {
                self.rx.as_ref()
            } else {
                None
            };
            if rx.is_none() && req.deadline_ns.is_none() && self.net.is_none() {
                return Err(BoundaryError::NothingToWaitFor);
            }
            let received = match (rx, timeout) {
                (Some(rx), Some(t)) => match rx.recv_timeout(t) {
                    Ok(bytes) => Some(bytes),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => None,
                },
                (Some(rx), None) => rx.recv().ok(),
                (None, Some(t)) => {
                    std::thread::sleep(t);
                    continue;
                }
                (None, None) => return Err(BoundaryError::NothingToWaitFor),
            };
            match received {
                Some(bytes) => self.push_pending(bytes),
                None => self.rx = None,
            }
        }
    }

    fn interrupt(&mut self, _vector: u8) -> Result<(), BoundaryError> {
        Ok(())
    }

    fn set_attention(&mut self, flag: Attention) {
        self.attention = Some(flag);
    }

    fn restored(&mut self, now_ns: u64) {
        self.start = Instant::now();
        self.exits = 0;
        self.base_ns = now_ns;
        self.last_clock = now_ns;
    }

    fn acts_at_kicks(&self) -> bool {
        self.clock == Clock::Host
    }

    fn kick_due(
        &mut self,
        req: &WaitRequest,
        waiting: Option<Duration>,
    ) -> Result<bool, BoundaryError> {
        let now = self.host_ns();
        let bound = u64::try_from(self.kick_bound.as_nanos()).unwrap_or(u64::MAX);
        let time_due = req
            .deadline_ns
            .is_some_and(|d| now >= d.saturating_add(bound) && self.last_clock > req.now_ns);
        let waited = waiting.is_some_and(|w| w >= self.kick_bound);
        Ok(time_due || waited)
    }

    fn output(&mut self, kind: OutputKind, bytes: &[u8]) -> Result<(), BoundaryError> {
        match kind {
            OutputKind::Serial => {
                if let Some(marker) = &self.gate {
                    self.recent.extend_from_slice(bytes);
                    if self.recent.windows(marker.len()).any(|w| w == &marker[..]) {
                        self.gate = None;
                        self.recent = Vec::new();
                        // The input waited for this: it counts from now.
                        self.pending_since = Some(self.last_clock);
                    } else {
                        let keep = self.recent.len().saturating_sub(marker.len());
                        self.recent.drain(..keep);
                    }
                }
                self.out.write_all(bytes).map_err(BoundaryError::Output)?;
                self.out.flush().map_err(BoundaryError::Output)
            }
            OutputKind::Net => match self.net.as_mut() {
                // A frame the tap refuses (down, no reader) is lost, as on a wire.
                Some(n) => {
                    if let Err(e) = n.tx.write_all(bytes) {
                        tracing::debug!("frame not sent: {e}");
                    }
                    Ok(())
                }
                None => Ok(()),
            },
        }
    }
}

/// Forwards what `r` reads to `tx` on a thread of its own (`serial-in`) until either ends:
/// the serial line's input from stdin, a file or a console. False if the thread did not start
/// (said in the log).
pub fn forward_serial_input(
    mut r: Box<dyn std::io::Read + Send>,
    tx: mpsc::Sender<Vec<u8>>,
) -> bool {
    let spawned = std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!("serial input closed: {e}");
                        break;
                    }
                }
            }
        });
    if let Err(e) = &spawned {
        tracing::warn!("serial input: cannot start its reader: {e}");
    }
    spawned.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(now: u64, deadline: Option<u64>, room: usize) -> WaitRequest {
        WaitRequest {
            now_ns: now,
            deadline_ns: deadline,
            serial_room: room,
            net_ready: false,
        }
    }

    #[test]
    fn frames_wait_in_a_bounded_queue_and_go_out_whole() {
        let q = Arc::new(NetQueue::default());
        for i in 0..NetQueue::CAPACITY + 3 {
            let _ = q.push(vec![i as u8; 60]);
        }
        assert_eq!(q.dropped.load(Ordering::Relaxed), 3);
        let sent = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        struct Frames(Arc<Mutex<Vec<Vec<u8>>>>);
        impl Write for Frames {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().push(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut b =
            LiveBoundary::new(SerialSource::None, Box::new(std::io::sink())).with_net(NetPort {
                rx: q.clone(),
                tx: Box::new(Frames(sent.clone())),
            });
        // Not ready: nothing is delivered; ready: one frame per poll, oldest first.
        assert_eq!(b.poll(Point::Exit, &req(0, None, 0)).unwrap(), None);
        let mut ready = req(0, None, 0);
        ready.net_ready = true;
        assert_eq!(
            b.poll(Point::Exit, &ready).unwrap(),
            Some(Input::NetRx(vec![0u8; 60]))
        );
        b.output(OutputKind::Net, &[1, 2, 3]).unwrap();
        assert_eq!(sent.lock().unwrap().as_slice(), &[vec![1u8, 2, 3]]);
        // A halted guest with only a NIC waits for frames rather than failing.
        assert!(matches!(b.wait(&ready), Ok(Input::NetRx(_))));
    }

    #[test]
    fn clock_is_monotonic() {
        let mut b = LiveBoundary::new(SerialSource::None, Box::new(std::io::sink()));
        let a = b.read_clock().unwrap();
        let c = b.read_clock().unwrap();
        assert!(c >= a);
    }

    #[test]
    fn wait_returns_time_at_deadline() {
        let mut b = LiveBoundary::new(SerialSource::None, Box::new(std::io::sink()));
        let t0 = b.read_clock().unwrap();
        let deadline = t0 + 5_000_000;
        match b.wait(&req(t0, Some(deadline), 16)).unwrap() {
            Input::Time(t) => assert!(t >= deadline),
            other => panic!("expected time, got {other:?}"),
        }
    }

    #[test]
    fn wait_with_nothing_to_wait_for_is_an_error() {
        let mut b = LiveBoundary::new(SerialSource::None, Box::new(std::io::sink()));
        assert!(matches!(
            b.wait(&req(0, None, 16)),
            Err(BoundaryError::NothingToWaitFor)
        ));
    }

    #[test]
    fn serial_input_respects_room_and_closes() {
        let input = SerialSource::Reader(Box::new(std::io::Cursor::new(b"abcdef".to_vec())));
        let mut b = LiveBoundary::new(input, Box::new(std::io::sink()));
        let mut got = Vec::new();
        while got.len() < 6 {
            match b.wait(&req(0, None, 4)).unwrap() {
                Input::SerialRx(bytes) => {
                    assert!(bytes.len() <= 4);
                    got.extend(bytes);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, b"abcdef");
        // The reader reached EOF: nothing can wake a guest without a timer now.
        assert!(matches!(
            b.wait(&req(0, None, 4)),
            Err(BoundaryError::NothingToWaitFor)
        ));
    }

    #[test]
    fn virtual_clock_counts_exits_and_skips_idle_time() {
        let clock = Clock::Virtual { step_ns: 1000 };
        let mut b = LiveBoundary::with_clock(SerialSource::None, Box::new(std::io::sink()), clock);
        assert_eq!(b.rtc_epoch().unwrap(), VIRTUAL_EPOCH);
        let exit = SyncExit {
            kind: crate::exit::ExitKind::Hlt,
            addr: 0,
            data: 0,
            len: 0,
            rip: 0,
        };
        for _ in 0..5 {
            b.exit(&exit).unwrap();
        }
        assert_eq!(b.read_clock().unwrap(), 5000);
        // A halt jumps straight to the deadline, without sleeping.
        let start = Instant::now();
        assert_eq!(
            b.wait(&req(5000, Some(10_000_000_000), 16)).unwrap(),
            Input::Time(10_000_000_000)
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        b.exit(&exit).unwrap();
        assert_eq!(b.read_clock().unwrap(), 10_000_001_000);
    }

    #[test]
    fn input_waits_for_the_marker() {
        let mut b = LiveBoundary::new(
            SerialSource::Bytes(b"ls\n".to_vec()),
            Box::new(std::io::sink()),
        )
        .input_after(b"# ");
        let t = b.read_clock().unwrap();
        assert!(matches!(
            b.wait(&req(t, Some(t + 1_000_000), 16)).unwrap(),
            Input::Time(_)
        ));
        b.output(OutputKind::Serial, b"ftvmm").unwrap();
        b.output(OutputKind::Serial, b"# ").unwrap();
        assert_eq!(
            b.wait(&req(t, None, 16)).unwrap(),
            Input::SerialRx(b"ls\n".to_vec())
        );
    }

    #[test]
    fn scripted_bytes_wait_for_room() {
        let mut b = LiveBoundary::new(
            SerialSource::Bytes(b"hello".to_vec()),
            Box::new(std::io::sink()),
        );
        // No room (the guest's driver is not ready): nothing, and no error while a timer runs.
        let t = b.read_clock().unwrap();
        assert!(matches!(
            b.wait(&req(t, Some(t + 1_000_000), 0)).unwrap(),
            Input::Time(_)
        ));
        assert_eq!(
            b.wait(&req(t, None, 3)).unwrap(),
            Input::SerialRx(b"hel".to_vec())
        );
    }

    #[test]
    fn channel_input_follows_its_script_and_closes_with_its_senders() {
        let (tx, rx) = mpsc::channel();
        let input = SerialSource::Channel {
            script: b"ab".to_vec(),
            rx,
        };
        let mut b = LiveBoundary::new(input, Box::new(std::io::sink()));
        let first = b.wait(&req(0, None, 16)).unwrap();
        assert!(
            matches!(first, Input::SerialRx(ref v) if v == b"ab"),
            "{first:?}"
        );
        tx.send(b"cd".to_vec()).unwrap();
        let second = b.wait(&req(0, None, 16)).unwrap();
        assert!(
            matches!(second, Input::SerialRx(ref v) if v == b"cd"),
            "{second:?}"
        );
        drop(tx);
        assert!(matches!(
            b.wait(&req(0, None, 16)),
            Err(BoundaryError::NothingToWaitFor)
        ));
    }

    #[test]
    fn poll_does_not_deliver_fresh_input() {
        let input = SerialSource::Reader(Box::new(std::io::Cursor::new(b"x".to_vec())));
        let mut b = LiveBoundary::new(input, Box::new(std::io::sink()));
        std::thread::sleep(Duration::from_millis(5));
        // Fresh input waits for the guest to halt...
        assert_eq!(b.poll(Point::Exit, &req(0, None, 16)).unwrap(), None);
        // ...or for the latency to pass.
        std::thread::sleep(LiveBoundary::INPUT_LATENCY);
        assert_eq!(
            b.poll(Point::Exit, &req(0, None, 16)).unwrap(),
            Some(Input::SerialRx(b"x".to_vec()))
        );
    }
}
