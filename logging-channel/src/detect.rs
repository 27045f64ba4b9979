//! Failure detection: when is the peer lost?
//!
//! Two witnesses, consulted every [`TICK`] by a task of their own (not the reader, which may be
//! busy, nor the writer, which may be blocked on a full socket):
//!
//! - **The peer's kernel.** Every frame this side sends is TCP data the peer's kernel must
//!   acknowledge, whether or not its process runs: a stopped or starved process still has a
//!   kernel that ACKs within its delayed-ACK time (40 ms on Linux, or one round trip if longer).
//!   Data in flight that nothing acknowledges for `unacked_timeout` (`TCP_INFO`:
//!   `tcpi_unacked` > 0 and no ACK at all, `tcpi_last_ack_recv`) means the host is down or the
//!   link is cut: the peer is lost at once. Heartbeats go every `heartbeat` both ways, so there
//!   is data in flight within one heartbeat of a death.
//! - **The peer's process.** No frame at all for `timeout` is a loss even while its kernel
//!   still acknowledges (a stopped, hung or starved process). Between two heartbeats' worth of
//!   silence and that limit the peer is *slow*: counted, not lost.
//!
//! Evidence is only what this side saw while it ran itself: a tick that comes [`STALL`] late
//! (this process or its whole host was not scheduled) restarts the count of unacknowledged time,
//! and bytes waiting unread in this side's socket mean the peer spoke and this side is behind.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// How often the detector looks.
pub(crate) const TICK: Duration = Duration::from_millis(10);

/// A tick this late means this side itself was not running: what happened meanwhile is no
/// evidence against the peer.
pub(crate) const STALL: Duration = Duration::from_millis(50);

/// Linux's shortest delayed ACK (`TCP_DELACK_MIN`); a delayed ACK waits at most this or the
/// round trip, whichever is longer.
const DELAYED_ACK: Duration = Duration::from_millis(40);

/// `tcpi_last_ack_recv` counts in jiffies (4 ms at HZ=250): an ACK is taken to have come since
/// the previous tick when it is younger than the time since that tick plus this.
const ACK_SLACK: Duration = Duration::from_millis(5);

/// What the kernel says about this side's TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KernelView {
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Since the last ACK from the peer (any segment acknowledging anything, data included).
    pub last_ack: Duration,
    /// Smoothed round-trip time.
    pub rtt: Duration,
}

/// The kernel's view of the socket `fd`, or None if it cannot say (not TCP, closed).
pub(crate) fn kernel_view(fd: BorrowedFd<'_>) -> Option<KernelView> {
    // SAFETY: tcp_info is plain integers; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: a valid fd, a buffer of `len` bytes, and `len` to update.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    Some(KernelView {
        unacked: info.tcpi_unacked,
        last_ack: Duration::from_millis(u64::from(info.tcpi_last_ack_recv)),
        rtt: Duration::from_micros(u64::from(info.tcpi_rtt)),
    })
}

/// Bytes received by the kernel that this side has not read yet.
pub(crate) fn unread(fd: BorrowedFd<'_>) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ on a TCP socket) writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// What the detector concluded at one tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Frames arrive.
    Alive,
    /// Silent for two heartbeats or more, but its host acknowledges: waiting.
    Slow,
    /// Lost, and why.
    Lost(String),
}

/// The detector's state between ticks.
#[derive(Debug)]
pub(crate) struct Detector {
    heartbeat: Duration,
    timeout: Duration,
    unacked_timeout: Duration,
    prev_tick: Option<Instant>,
    /// The first tick since which data has been in flight with no ACK seen.
    unacked_since: Option<Instant>,
    slow: bool,
    /// Times the peer turned slow.
    pub slow_episodes: u64,
    /// The longest this side's data waited for an ACK, as the ticks saw it.
    pub max_unacked: Duration,
    /// The longest silence held against the peer (nothing waiting unread meanwhile), as the
    /// ticks saw it: what came closest to `timeout`.
    pub max_quiet: Duration,
    /// Ticks that came [`STALL`] late.
    pub stalls: u64,
}

impl Detector {
    pub(crate) fn new(heartbeat: Duration, timeout: Duration, unacked_timeout: Duration) -> Self {
        Detector {
            heartbeat,
            timeout,
            unacked_timeout,
            prev_tick: None,
            unacked_since: None,
            slow: false,
            slow_episodes: 0,
            max_unacked: Duration::ZERO,
            max_quiet: Duration::ZERO,
            stalls: 0,
        }
    }

    /// Whether the last verdict was [`Verdict::Slow`].
    pub(crate) fn is_slow(&self) -> bool {
        self.slow
    }

    /// One tick at `now`: the last frame received at `last_frame`, the kernel's view (None: the
    /// kernel witness is unavailable), `unread` bytes waiting in this side's socket.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        last_frame: Instant,
        kernel: Option<KernelView>,
        unread: usize,
    ) -> Verdict {
        let gap = self
            .prev_tick
            .map_or(Duration::ZERO, |p| now.saturating_duration_since(p));
        self.prev_tick = Some(now);
        if gap > STALL {
            self.stalls += 1;
            self.unacked_since = None;
        }
        if let Some(k) = kernel {
            if k.unacked == 0 {
                self.unacked_since = None;
            } else if self.unacked_since.is_none() || k.last_ack <= gap + ACK_SLACK {
                // Newly in flight, or the peer acknowledged something since the last tick:
                // what is still in flight may have been sent just now.
                self.unacked_since = Some(now);
            }
            if let Some(since) = self.unacked_since {
                let waited = now.saturating_duration_since(since);
                self.max_unacked = self.max_unacked.max(waited);
                let limit = self
                    .unacked_timeout
                    .max(DELAYED_ACK + k.rtt.saturating_mul(3));
                if waited >= limit && k.last_ack >= limit {
                    self.slow = false;
                    return Verdict::Lost(format!(
                        "the peer's host acknowledged none of this side's data for {} ms \
                         (host down or link cut)",
                        k.last_ack.as_millis()
                    ));
                }
            }
        }
        let silence = now.saturating_duration_since(last_frame);
        if unread == 0 {
            self.max_quiet = self.max_quiet.max(silence);
        }
        if silence >= self.timeout && unread == 0 {
            self.slow = false;
            let host = match kernel {
                Some(_) => " though its host acknowledges this side's data (its process is stopped, hung or starved)",
                None => "",
            };
            return Verdict::Lost(format!(
                "peer silent for {:.1} s{host}",
                self.timeout.as_secs_f64()
            ));
        }
        if silence >= self.heartbeat.saturating_mul(2) && unread == 0 {
            if !self.slow {
                self.slow = true;
                self.slow_episodes += 1;
            }
            Verdict::Slow
        } else {
            self.slow = false;
            Verdict::Alive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_millis(50);
    const SLOW_LIMIT: Duration = Duration::from_secs(1);
    const UNACKED: Duration = Duration::from_millis(80);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn view(unacked: u32, last_ack_ms: u64) -> Option<KernelView> {
        Some(KernelView {
            unacked,
            last_ack: ms(last_ack_ms),
            rtt: Duration::from_micros(100),
        })
    }

    /// Ticks every 10 ms from `t0 + from` to `t0 + to`, the kernel's view given by `k(t)` (t in
    /// ms since t0), the last frame at `t0 + frame`; returns the first non-Alive-or-Slow verdict
    /// and when, or the last verdict.
    fn run(
        d: &mut Detector,
        t0: Instant,
        (from, to): (u64, u64),
        frame: u64,
        k: impl Fn(u64) -> Option<KernelView>,
    ) -> (u64, Verdict) {
        let mut last = Verdict::Alive;
        let mut t = from;
        while t <= to {
            last = d.observe(t0 + ms(t), t0 + ms(frame), k(t), 0);
            if matches!(last, Verdict::Lost(_)) {
                return (t, last);
            }
            t += 10;
        }
        (to, last)
    }

    #[test]
    fn a_host_that_stops_acknowledging_is_lost_after_the_unacked_timeout() {
        let mut d = Detector::new(HB, SLOW_LIMIT, UNACKED);
        let t0 = Instant::now();
        // Healthy until 100 ms (ACKs at every tick), then the host dies: a heartbeat at 110 ms
        // is never acknowledged.
        let (t, v) = run(&mut d, t0, (0, 1000), 100, |t| {
            if t <= 100 {
                view(1, 1)
            } else if t < 110 {
                view(0, t - 100)
            } else {
                view(1, t - 100)
            }
        });
        assert!(
            matches!(&v, Verdict::Lost(why) if why.contains("acknowledged none")),
            "{v:?}"
        );
        assert_eq!(t, 190, "in flight since the tick at 110, 80 ms");
    }

    #[test]
    fn a_peer_whose_kernel_acknowledges_is_slow_until_the_slow_limit() {
        let mut d = Detector::new(HB, SLOW_LIMIT, UNACKED);
        let t0 = Instant::now();
        // The process stopped at 0; each heartbeat (every 50 ms) is ACKed 40 ms later.
        let (t, v) = run(&mut d, t0, (0, 2000), 0, |t| {
            let phase = t % 50;
            if phase < 40 {
                view(1, phase + 10)
            } else {
                view(0, phase - 40)
            }
        });
        assert_eq!(t, 1000, "{v:?}");
        assert!(
            matches!(&v, Verdict::Lost(why) if why.contains("peer silent for 1.0 s") && why.contains("acknowledges")),
            "{v:?}"
        );
        assert_eq!(d.slow_episodes, 1);
        assert!(d.max_unacked < UNACKED, "{:?}", d.max_unacked);
        assert_eq!(d.max_quiet, SLOW_LIMIT);
    }

    #[test]
    fn data_in_flight_all_along_but_acknowledged_is_not_a_death() {
        let mut d = Detector::new(HB, SLOW_LIMIT, UNACKED);
        let t0 = Instant::now();
        // A bulk transfer: always something in flight, an ACK every 30 ms.
        let (_, v) = run(&mut d, t0, (0, 500), 490, |t| view(10, t % 30));
        assert_eq!(v, Verdict::Alive);
        assert!(d.max_unacked <= ms(30), "{:?}", d.max_unacked);
    }

    #[test]
    fn a_stall_of_this_side_is_no_evidence() {
        let mut d = Detector::new(HB, SLOW_LIMIT, UNACKED);
        let t0 = Instant::now();
        assert_eq!(d.observe(t0, t0, view(1, 0), 0), Verdict::Alive);
        // This process did not run for 300 ms: when it wakes the kernel has seen no ACK for
        // 300 ms and a frame waits unread (the peer is fine; this side is behind).
        let v = d.observe(t0 + ms(300), t0, view(1, 300), 200);
        assert_eq!(v, Verdict::Alive);
        assert_eq!(d.stalls, 1);
        assert_eq!(
            d.max_quiet,
            Duration::ZERO,
            "a silence with a frame unread is none"
        );
        // Then the ACK arrives and the unread frame is read.
        let v = d.observe(t0 + ms(310), t0 + ms(305), view(0, 2), 0);
        assert_eq!(v, Verdict::Alive);
    }

    #[test]
    fn a_long_round_trip_raises_the_unacked_limit() {
        let mut d = Detector::new(HB, SLOW_LIMIT, UNACKED);
        let t0 = Instant::now();
        let slow_link = |unacked, last: u64| {
            Some(KernelView {
                unacked,
                last_ack: ms(last),
                rtt: ms(60),
            })
        };
        // 40 + 3 x 60 = 220 ms before unacknowledged data means a death.
        let (t, v) = run(&mut d, t0, (0, 1000), 0, |t| slow_link(1, t + 50));
        assert!(matches!(v, Verdict::Lost(_)), "{v:?}");
        assert_eq!(t, 220);
    }

    #[test]
    fn without_the_kernel_witness_only_silence_counts() {
        let mut d = Detector::new(HB, SLOW_LIMIT, UNACKED);
        let t0 = Instant::now();
        let (t, v) = run(&mut d, t0, (0, 2000), 0, |_| None);
        assert_eq!(t, 1000);
        assert_eq!(v, Verdict::Lost("peer silent for 1.0 s".into()));
    }
}
