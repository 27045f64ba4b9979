//! The 8254 programmable interval timer (ports 0x40-0x43) and the PC's port 0x61 (speaker
//! gate, speaker data, refresh toggle, OUT2).
//!
//! # Time
//!
//! The PIT's clock runs at [`PIT_HZ`] from virtual time 0. Its ticks are counted on one
//! absolute grid: tick `k` happens at `k * 1e9 / PIT_HZ` ns, so by virtual time `now_ns`
//! exactly `now_ns * PIT_HZ / 1e9` (rounded down, u128 arithmetic) ticks have happened. A
//! counter loaded at `load_ns` has counted `ticks(now) - ticks(load)` ticks: this never drifts,
//! however long a periodic count runs, and every channel sees the same clock edges, as on the
//! chip. The one-clock delay between writing a count and the counter loading it is not
//! modelled: the counter holds the new count at the tick of the write.
//!
//! # What is modelled
//!
//! - Modes 0 (interrupt on terminal count), 2 (rate generator) and 3 (square wave) exactly,
//!   including mode 3 with odd counts, a new count in mode 2 taking effect at the end of the
//!   current period and in mode 3 at the end of the current half-period (as the 8254 does), a
//!   mode 0 count stopped by the first byte of a two-byte write, and reload value 0 = 65536
//!   (10000 in BCD).
//! - Modes 4 (software strobe), 1 and 5 (gate-triggered one-shot and strobe). Channels 0 and
//!   1 have their gate tied high, so modes 1 and 5 never trigger there.
//! - The counter latch command, the read-back command (count and status), lobyte, hibyte and
//!   lobyte/hibyte access with separate read and write flip-flops.
//! - BCD counting: counts, reloads and readouts are decimal when the BCD bit is set.
//! - Channel 2's gate from port 0x61 bit 0 (suspends modes 0/4, restarts modes 2/3, triggers
//!   modes 1/5) and its OUT on port 0x61 bit 5.
//! - Port 0x61 bit 4, the refresh toggle, flips every 15.085 us of virtual time.
//!
//! A count of 1 in modes 2 and 3 is illegal on the 8254; here OUT then stays high and the
//! channel produces no edges. Channel 1 counts but drives nothing. At power-on every channel is
//! where a PC's firmware leaves it ([`Pit::new`]): mode 3, count 65536, channels 0 and 1
//! counting.
//!
//! # Channel 0 and IRQ 0
//!
//! [`Pit::poll_irq0`] returns the rising edges of channel 0's OUT since the last poll: the
//! periodic edges, and an edge caused by a register write that raised OUT (e.g. a control word
//! selecting mode 2 while a mode 0 count was running). Edges before a reprogramming are kept
//! until the next poll.

use serde::{Deserialize, Serialize};

use crate::persist::{Persist, RestoreError};

/// The PIT input clock, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Half-period of port 0x61 bit 4 (DRAM refresh request toggle), in ns.
const REFRESH_TOGGLE_NS: u64 = 15_085;
/// Port 0x61 bits the guest can write and read back: gate 2, speaker data, parity and
/// channel check enables.
const PORT61_RW_MASK: u8 = 0x0f;

/// PIT ticks that have happened by virtual time `ns`.
fn tick_at(ns: u64) -> u64 {
    // ns * PIT_HZ < 2^64 * 2^21, fits u128; the quotient is < 2^64.
    (u128::from(ns) * u128::from(PIT_HZ) / u128::from(NS_PER_SEC)) as u64
}

/// The first virtual time (ns) by which tick `tick` has happened.
fn ns_of_tick(tick: u64) -> u64 {
    let ns = (u128::from(tick) * u128::from(NS_PER_SEC)).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

fn from_bcd16(v: u16) -> u32 {
    (0..4).fold(0u32, |acc, i| {
        let digit = u32::from((v >> (12 - 4 * i)) & 0xf);
        acc * 10 + digit
    })
}

fn to_bcd16(v: u32) -> u16 {
    let v = v % 10_000;
    ((v / 1000) << 12 | (v / 100 % 10) << 8 | (v / 10 % 10) << 4 | (v % 10)) as u16
}

/// How a channel's count is read and written (control word bits 5-4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    /// Least significant byte only.
    Lsb,
    /// Most significant byte only.
    Msb,
    /// Least significant byte, then most significant byte.
    #[default]
    Word,
}

impl Access {
    fn bits(self) -> u8 {
        match self {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::Word => 3,
        }
    }
}

/// How a channel's counting element evolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Run {
    /// Not counting (no count yet, waiting for a gate trigger, stopped by a two-byte write in
    /// mode 0, or gate low in modes 2/3). The counting element holds `ce`; OUT is `out_idle`.
    Idle {
        /// The value the counting element holds (binary, 0..=65536).
        ce: u32,
    },
    /// Counting: at tick `t` the counter has advanced `t - start + phase` ticks into its count.
    Counting {
        /// The tick the current count was loaded.
        start: u64,
        /// Ticks already counted at `start` (non-zero only when a mode 3 count starts in its
        /// low half).
        phase: u32,
    },
    /// Mode 0 or 4 counting suspended by a low gate, `elapsed` ticks into the count.
    Suspended {
        /// Ticks counted before the gate went low.
        elapsed: u64,
    },
}

/// A new count (in modes 2 and 3) waiting for the end of the current (half-)period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reload {
    /// The tick at which the count register is loaded.
    pub tick: u64,
    /// The phase the new count starts with (see [`Run::Counting`]).
    pub phase: u32,
}

/// The complete state of one 8254 channel, also its working representation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelState {
    /// Mode bits as programmed (0-7; 6 and 7 are modes 2 and 3), for the status byte.
    pub mode_bits: u8,
    /// Read/write access.
    pub access: Access,
    /// BCD counting.
    pub bcd: bool,
    /// The count the counting element works with (1..=65536, or 1..=10000 in BCD).
    pub count: u32,
    /// The count register: the last count written.
    pub cr: u32,
    /// A count has been written since the last control word.
    pub armed: bool,
    /// How the counting element evolves.
    pub run: Run,
    /// OUT while [`Run::Idle`].
    pub out_idle: bool,
    /// The GATE input.
    pub gate: bool,
    /// A new count waiting for the end of the current period (modes 2 and 3).
    pub reload: Option<Reload>,
    /// The status byte's NULL COUNT bit: a count was written and not yet loaded.
    pub null_count: bool,
    /// Two-byte write flip-flop: the next write is the most significant byte.
    pub write_msb_next: bool,
    /// The least significant byte of a two-byte write in progress.
    pub write_lsb: u8,
    /// Two-byte read flip-flop for unlatched reads.
    pub read_msb_next: bool,
    /// A latched count not yet (completely) read.
    pub latch: Option<u16>,
    /// Two-byte read flip-flop for the latched count.
    pub latch_msb_next: bool,
    /// A latched status byte not yet read.
    pub status_latch: Option<u8>,
}

impl PitChannelState {
    /// A channel as a PC's firmware leaves it: mode 3, binary, lobyte/hibyte, count 65536
    /// loaded (no NULL COUNT), counting from tick 0 when its gate is high.
    fn power_on(gate: bool) -> Self {
        PitChannelState {
            mode_bits: 3,
            access: Access::Word,
            bcd: false,
            count: 0x10000,
            cr: 0x10000,
            armed: true,
            run: if gate {
                Run::Counting { start: 0, phase: 0 }
            } else {
                Run::Idle { ce: 0x10000 }
            },
            out_idle: true,
            gate,
            reload: None,
            null_count: false,
            write_msb_next: false,
            write_lsb: 0,
            read_msb_next: false,
            latch: None,
            latch_msb_next: false,
            status_latch: None,
        }
    }

    /// The effective mode, 0-5.
    fn mode(&self) -> u8 {
        let m = self.mode_bits & 7;
        if m >= 6 {
            m - 4
        } else {
            m
        }
    }

    /// The counter's modulus: 65536 in binary, 10000 in BCD.
    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x10000
        }
    }

    /// The count a written 16-bit value stands for.
    fn decode_count(&self, v: u16) -> u32 {
        let n = if self.bcd {
            from_bcd16(v)
        } else {
            u32::from(v)
        };
        if n == 0 {
            self.modulus() as u32
        } else {
            n
        }
    }

    /// The 16-bit readout of a counting element value.
    fn encode_ce(&self, ce: u32) -> u16 {
        if self.bcd {
            to_bcd16(ce)
        } else {
            (ce & 0xffff) as u16
        }
    }

    /// Half-period lengths for mode 3: (high, low).
    fn halves(n: u32) -> (u32, u32) {
        (n.div_ceil(2), n / 2)
    }

    /// Ticks into the count at tick `t` (counting only).
    fn elapsed(start: u64, phase: u32, t: u64) -> u64 {
        t.saturating_sub(start) + u64::from(phase)
    }

    /// OUT after `x` ticks of counting.
    fn out_at(&self, x: u64) -> bool {
        let n = u64::from(self.count);
        match self.mode() {
            0 | 1 => x >= n,
            2 => n < 2 || x % n != n - 1,
            3 => n < 2 || x % n < u64::from(Self::halves(self.count).0),
            _ => x != n,
        }
    }

    /// The counting element after `x` ticks of counting (0..=65536).
    fn ce_at(&self, x: u64) -> u32 {
        let n = u64::from(self.count);
        let m = self.modulus();
        match self.mode() {
            2 => (n - x % n) as u32,
            3 => {
                let (hi, _) = Self::halves(self.count);
                let hi = u64::from(hi);
                let p = x % n;
                let v = if n % 2 == 0 {
                    n - 2 * (p % hi)
                } else if p < hi {
                    // High half of an odd count: N, N-1, N-3, ...
                    if p == 0 {
                        n
                    } else {
                        n + 1 - 2 * p
                    }
                } else {
                    // Low half: N, N-3, N-5, ...
                    let q = p - hi;
                    if q == 0 {
                        n
                    } else {
                        n - 1 - 2 * q
                    }
                };
                v as u32
            }
            // Modes 0, 1, 4, 5 count down and wrap around.
            _ => ((n % m + m - x % m) % m) as u32,
        }
    }

    /// OUT at tick `t`.
    fn out(&self, t: u64) -> bool {
        match self.run {
            Run::Idle { .. } => self.out_idle,
            Run::Counting { start, phase } => self.out_at(Self::elapsed(start, phase, t)),
            Run::Suspended { elapsed } => self.out_at(elapsed),
        }
    }

    /// The counting element at tick `t`.
    fn ce(&self, t: u64) -> u32 {
        match self.run {
            Run::Idle { ce } => ce,
            Run::Counting { start, phase } => self.ce_at(Self::elapsed(start, phase, t)),
            Run::Suspended { elapsed } => self.ce_at(elapsed),
        }
    }

    /// Applies a waiting reload if its tick has come by `t`.
    fn settle(&mut self, t: u64) {
        if let Some(r) = self.reload {
            if r.tick <= t {
                self.reload = None;
                self.count = self.cr;
                self.null_count = false;
                self.run = Run::Counting {
                    start: r.tick,
                    phase: r.phase,
                };
            }
        }
    }

    /// Rising OUT edges at ticks in (a, b] with the current configuration (no reload).
    fn edges_plain(&self, a: u64, b: u64) -> u64 {
        let Run::Counting { start, phase } = self.run else {
            return 0;
        };
        let a = a.max(start);
        if b <= a {
            return 0;
        }
        let xa = Self::elapsed(start, phase, a);
        let xb = Self::elapsed(start, phase, b);
        let n = u64::from(self.count);
        let at = |x: u64| u64::from(xa < x && x <= xb);
        match self.mode() {
            0 | 1 => at(n),
            2 | 3 if n < 2 => 0,
            2 | 3 => xb / n - xa / n,
            _ => at(n + 1),
        }
    }

    /// Rising OUT edges at ticks in (a, b], applying a reload that falls in the interval.
    fn advance(&mut self, a: u64, b: u64) -> u64 {
        let mut edges = 0;
        let mut a = a;
        if let Some(r) = self.reload {
            if r.tick <= b {
                if r.tick > a {
                    edges += self.edges_plain(a, r.tick);
                    a = r.tick;
                }
                self.settle(r.tick);
            }
        }
        edges + self.edges_plain(a, b)
    }

    /// The tick of the first rising OUT edge after tick `t`, if any.
    fn next_edge_after(&self, t: u64) -> Option<u64> {
        let mut ch = *self;
        ch.settle(t);
        let plain = ch.next_edge_plain(t);
        match ch.reload {
            Some(r) if plain.is_none_or(|e| e > r.tick) => {
                ch.settle(r.tick);
                ch.next_edge_plain(r.tick)
            }
            _ => plain,
        }
    }

    fn next_edge_plain(&self, t: u64) -> Option<u64> {
        let Run::Counting { start, phase } = self.run else {
            return None;
        };
        let t = t.max(start);
        let x = Self::elapsed(start, phase, t);
        let n = u64::from(self.count);
        // The edge at `target` ticks into the count, if it is still ahead.
        let ahead = |target: u64| (x < target).then(|| start + (target - u64::from(phase)));
        match self.mode() {
            0 | 1 => ahead(n),
            2 | 3 if n < 2 => None,
            2 | 3 => ahead((x / n + 1) * n),
            _ => ahead(n + 1),
        }
    }

    /// A count written to the channel at tick `t`.
    fn write_count(&mut self, value: u16, t: u64) {
        let n = self.decode_count(value);
        self.cr = n;
        self.null_count = true;
        match self.mode() {
            0 | 4 => {
                self.count = n;
                self.armed = true;
                self.null_count = false;
                self.run = if self.gate {
                    Run::Counting { start: t, phase: 0 }
                } else {
                    Run::Suspended { elapsed: 0 }
                };
            }
            1 | 5 => {
                // Loaded at the next gate trigger.
                self.armed = true;
            }
            _ => {
                if let Run::Counting { start, phase } = self.run {
                    // Modes 2 and 3: the new count waits for the end of the current period
                    // (mode 2) or half-period (mode 3).
                    let x = Self::elapsed(start, phase, t);
                    let len = u64::from(self.count);
                    let p = x % len;
                    let (hi, _) = Self::halves(self.count);
                    let hi = u64::from(hi);
                    self.reload = Some(if self.mode() == 3 && p < hi {
                        Reload {
                            tick: t + (hi - p),
                            phase: Self::halves(n).0,
                        }
                    } else {
                        Reload {
                            tick: t + (len - p),
                            phase: 0,
                        }
                    });
                } else {
                    self.armed = true;
                    if self.gate {
                        self.count = n;
                        self.null_count = false;
                        self.run = Run::Counting { start: t, phase: 0 };
                    }
                }
            }
        }
    }

    /// A control word (not a latch or read-back command) at tick `t`.
    fn write_control(&mut self, val: u8, t: u64) {
        let ce = self.ce(t);
        self.mode_bits = (val >> 1) & 7;
        self.access = match (val >> 4) & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::Word,
        };
        self.bcd = val & 1 != 0;
        self.run = Run::Idle { ce };
        self.out_idle = self.mode() != 0;
        self.armed = false;
        self.reload = None;
        self.null_count = true;
        self.write_msb_next = false;
        self.read_msb_next = false;
        self.latch = None;
        self.latch_msb_next = false;
        self.status_latch = None;
    }

    /// A data-port write at tick `t`.
    fn write_data(&mut self, val: u8, t: u64) {
        match self.access {
            Access::Lsb => self.write_count(u16::from(val), t),
            Access::Msb => self.write_count(u16::from(val) << 8, t),
            Access::Word => {
                if self.write_msb_next {
                    self.write_msb_next = false;
                    let value = u16::from(self.write_lsb) | u16::from(val) << 8;
                    self.write_count(value, t);
                } else {
                    self.write_msb_next = true;
                    self.write_lsb = val;
                    if self.mode() == 0 {
                        // Mode 0: the first byte of a two-byte count stops counting, OUT low.
                        let ce = self.ce(t);
                        self.run = Run::Idle { ce };
                        self.out_idle = false;
                        self.reload = None;
                    }
                }
            }
        }
    }

    /// The counter latch command at tick `t` (ignored if a latched count is still unread).
    fn latch_count(&mut self, t: u64) {
        if self.latch.is_none() {
            self.latch = Some(self.encode_ce(self.ce(t)));
            self.latch_msb_next = false;
        }
    }

    /// The read-back status latch at tick `t` (ignored if a latched status is still unread).
    fn latch_status(&mut self, t: u64) {
        if self.status_latch.is_none() {
            let status = u8::from(self.out(t)) << 7
                | u8::from(self.null_count) << 6
                | self.access.bits() << 4
                | (self.mode_bits & 7) << 1
                | u8::from(self.bcd);
            self.status_latch = Some(status);
        }
    }

    /// A data-port read at tick `t`.
    fn read_data(&mut self, t: u64) -> u8 {
        if let Some(status) = self.status_latch.take() {
            return status;
        }
        if let Some(latched) = self.latch {
            let [lo, hi] = latched.to_le_bytes();
            return match self.access {
                Access::Lsb => {
                    self.latch = None;
                    lo
                }
                Access::Msb => {
                    self.latch = None;
                    hi
                }
                Access::Word => {
                    if self.latch_msb_next {
                        self.latch = None;
                        self.latch_msb_next = false;
                        hi
                    } else {
                        self.latch_msb_next = true;
                        lo
                    }
                }
            };
        }
        let [lo, hi] = self.encode_ce(self.ce(t)).to_le_bytes();
        match self.access {
            Access::Lsb => lo,
            Access::Msb => hi,
            Access::Word => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    /// The GATE input changes to `level` at tick `t`.
    fn set_gate(&mut self, level: bool, t: u64) {
        if level == self.gate {
            return;
        }
        self.gate = level;
        match (self.mode(), level) {
            (0 | 4, true) => {
                if let Run::Suspended { elapsed } = self.run {
                    self.run = Run::Counting {
                        start: t.saturating_sub(elapsed),
                        phase: 0,
                    };
                }
            }
            (0 | 4, false) => {
                if let Run::Counting { start, phase } = self.run {
                    self.run = Run::Suspended {
                        elapsed: Self::elapsed(start, phase, t),
                    };
                }
            }
            (2 | 3, false) => {
                // OUT goes high and counting stops; the next rising gate reloads.
                let ce = self.ce(t);
                self.run = Run::Idle { ce };
                self.out_idle = true;
                self.reload = None;
            }
            // Modes 1, 2, 3, 5: a rising gate (re)loads the count and starts counting.
            (_, true) => {
                if self.armed {
                    self.count = self.cr;
                    self.reload = None;
                    self.null_count = false;
                    self.run = Run::Counting { start: t, phase: 0 };
                }
            }
            // Modes 1 and 5 ignore a falling gate once triggered.
            (_, false) => {}
        }
    }
}

/// The saved state of the PIT and port 0x61.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Channels 0, 1 and 2.
    pub channels: [PitChannelState; 3],
    /// The writable bits (0-3) of port 0x61.
    pub port61: u8,
    /// Channel 0 edges are counted up to this tick.
    pub irq0_tick: u64,
    /// Channel 0 edges counted but not yet returned by `poll_irq0`.
    pub irq0_pending: u64,
}

/// The 8254 PIT with port 0x61.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pit {
    channels: [PitChannelState; 3],
    port61: u8,
    irq0_tick: u64,
    irq0_pending: u64,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT as a PC's firmware leaves it (docs/PLATFORM.md): every channel in mode 3 with
    /// count 65536 loaded, no NULL COUNT; channels 0 and 1 (gate tied high) count from virtual
    /// time 0, so channel 0's OUT toggles at 18.2 Hz; channel 2's gate (port 0x61 bit 0) is low,
    /// so it waits, OUT high.
    pub fn new() -> Self {
        Pit {
            channels: [
                PitChannelState::power_on(true),
                PitChannelState::power_on(true),
                PitChannelState::power_on(false),
            ],
            port61: 0,
            irq0_tick: 0,
            irq0_pending: 0,
        }
    }

    /// Brings every channel to tick `t`: counts channel 0's edges up to `t` and applies the
    /// reloads that fell due.
    fn catch_up(&mut self, t: u64) {
        if t > self.irq0_tick {
            let edges = self.channels[0].advance(self.irq0_tick, t);
            self.irq0_pending = self.irq0_pending.saturating_add(edges);
            self.irq0_tick = t;
        }
        for ch in &mut self.channels {
            ch.settle(t);
        }
    }

    /// Runs a register access at tick `t`, counting an edge if it raises channel 0's OUT.
    fn with_out0_edge<R>(&mut self, t: u64, f: impl FnOnce(&mut Self) -> R) -> R {
        self.catch_up(t);
        let before = self.channels[0].out(t);
        let r = f(self);
        if !before && self.channels[0].out(t) {
            self.irq0_pending = self.irq0_pending.saturating_add(1);
        }
        r
    }

    /// A read from port 0x40-0x43 or 0x61 at virtual time `now_ns`.
    pub fn pio_read(&mut self, port: u16, now_ns: u64) -> u8 {
        let t = tick_at(now_ns);
        self.catch_up(t);
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].read_data(t),
            // The control word register is write-only.
            0x43 => 0,
            0x61 => {
                let refresh = (now_ns / REFRESH_TOGGLE_NS) & 1 == 1;
                let out2 = self.channels[2].out(t);
                self.port61 | u8::from(refresh) << 4 | u8::from(out2) << 5
            }
            _ => {
                tracing::warn!("PIT: read from port {port:#x}, which is not a PIT port");
                0xff
            }
        }
    }

    /// A write to port 0x40-0x43 or 0x61 at virtual time `now_ns`.
    pub fn pio_write(&mut self, port: u16, val: u8, now_ns: u64) {
        let t = tick_at(now_ns);
        self.with_out0_edge(t, |pit| match port {
            0x40..=0x42 => pit.channels[usize::from(port - 0x40)].write_data(val, t),
            0x43 => pit.write_command(val, t),
            0x61 => {
                pit.port61 = val & PORT61_RW_MASK;
                pit.channels[2].set_gate(val & 1 != 0, t);
            }
            _ => tracing::warn!("PIT: write {val:#04x} to port {port:#x}, which is not a PIT port"),
        });
    }

    fn write_command(&mut self, val: u8, t: u64) {
        let select = val >> 6;
        if select == 3 {
            // Read-back: bit 5 low latches counts, bit 4 low latches status, bits 1-3 select.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if val & (2 << i) == 0 {
                    continue;
                }
                if val & 0x20 == 0 {
                    ch.latch_count(t);
                }
                if val & 0x10 == 0 {
                    ch.latch_status(t);
                }
            }
            return;
        }
        let ch = &mut self.channels[usize::from(select)];
        if (val >> 4) & 3 == 0 {
            ch.latch_count(t);
        } else {
            ch.write_control(val, t);
        }
    }

    /// Number of rising edges of channel 0's OUT (IRQ0) in (last poll, now_ns]. The VMM pulses
    /// IRQ0 if > 0 (edges coalesce, like a real PIC).
    pub fn poll_irq0(&mut self, now_ns: u64) -> u64 {
        self.catch_up(tick_at(now_ns));
        std::mem::take(&mut self.irq0_pending)
    }

    /// Reinject mode (the policy of KVM's in-kernel PIT, `KVM_REINJECT_CONTROL`): counts channel 0's edges up to `now_ns` and
    /// keeps them owed, for [`Pit::take_owed_irq0`] one at a time, each after the guest took
    /// the previous one. At most `max_owed` stay owed: the edges beyond are dropped
    /// (coalesced), and their number returned.
    pub fn count_irq0(&mut self, now_ns: u64, max_owed: u64) -> u64 {
        self.catch_up(tick_at(now_ns));
        let dropped = self.irq0_pending.saturating_sub(max_owed);
        self.irq0_pending -= dropped;
        dropped
    }

    /// One owed channel 0 edge, if there is one (0 or 1).
    pub fn take_owed_irq0(&mut self) -> u64 {
        if self.irq0_pending > 0 {
            self.irq0_pending -= 1;
            1
        } else {
            0
        }
    }

    /// Channel 0 edges counted and not yet delivered.
    pub fn owed_irq0(&self) -> u64 {
        self.irq0_pending
    }

    /// The virtual time (ns) of channel 0's next rising OUT edge after `now_ns`, if it will
    /// have one (used to advance time when the guest halts). Edges at or before `now_ns` are
    /// what [`Pit::poll_irq0`] returns.
    pub fn next_irq0_ns(&self, now_ns: u64) -> Option<u64> {
        let t = tick_at(now_ns).max(self.irq0_tick);
        self.channels[0].next_edge_after(t).map(ns_of_tick)
    }
}

impl Persist for Pit {
    type State = PitState;

    /// The complete state.
    fn state(&self) -> PitState {
        PitState {
            channels: self.channels,
            port61: self.port61,
            irq0_tick: self.irq0_tick,
            irq0_pending: self.irq0_pending,
        }
    }

    /// Puts the PIT in exactly the saved state `s` (counts outside 1..=65536, which no guest can
    /// program, are taken as 65536).
    fn restore(&mut self, s: &PitState) -> Result<(), RestoreError> {
        let mut channels = s.channels;
        for ch in &mut channels {
            for n in [&mut ch.count, &mut ch.cr] {
                if !(1..=0x10000).contains(n) {
                    tracing::warn!("PIT state holds count {n}; using 65536");
                    *n = 0x10000;
                }
            }
        }
        *self = Pit {
            channels,
            port61: s.port61 & PORT61_RW_MASK,
            irq0_tick: s.irq0_tick,
            irq0_pending: s.irq0_pending,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first virtual time at which `tick` has happened.
    fn at(tick: u64) -> u64 {
        ns_of_tick(tick)
    }

    fn program(pit: &mut Pit, channel: u16, control: u8, count: u16, now: u64) {
        pit.pio_write(0x43, control, now);
        let [lo, hi] = count.to_le_bytes();
        pit.pio_write(0x40 + channel, lo, now);
        pit.pio_write(0x40 + channel, hi, now);
    }

    /// Latches and reads channel `channel`'s count (lohi access).
    fn latched(pit: &mut Pit, channel: u16, now: u64) -> u16 {
        pit.pio_write(0x43, (channel as u8) << 6, now);
        let lo = pit.pio_read(0x40 + channel, now);
        let hi = pit.pio_read(0x40 + channel, now);
        u16::from_le_bytes([lo, hi])
    }

    /// Channel `channel`'s OUT via the read-back status byte.
    fn out(pit: &mut Pit, channel: u16, now: u64) -> bool {
        pit.pio_write(0x43, 0xe0 | 2 << channel, now);
        pit.pio_read(0x40 + channel, now) & 0x80 != 0
    }

    #[test]
    fn tick_conversion_round_trips() {
        for tick in [0u64, 1, 2, 1193, 1_193_181, 1_193_182, 10_000_000_000] {
            let ns = at(tick);
            assert_eq!(tick_at(ns), tick);
            if ns > 0 {
                assert!(tick_at(ns - 1) < tick);
            }
        }
        assert_eq!(tick_at(1_000_000_000), PIT_HZ);
        assert_eq!(tick_at(u64::MAX), 22_010_322_987_356_910);
        assert_eq!(ns_of_tick(u64::MAX), u64::MAX);
    }

    #[test]
    fn power_on_is_the_firmware_state() {
        let mut pit = Pit::new();
        // Read-back of the status of all three channels: OUT high at tick 0, NULL COUNT clear,
        // lobyte/hibyte, mode 3, binary (0xb6), as SeaBIOS leaves channel 0 and QEMU's reset
        // leaves all three.
        pit.pio_write(0x43, 0xee, 0);
        for ch in 0..3 {
            assert_eq!(pit.pio_read(0x40 + ch, 0), 0xb6, "channel {ch}");
        }
        // Linux's i8254 entropy read (kaslr_get_random_long): latch, read, until no NULL COUNT.
        pit.pio_write(0x43, 0xe2, at(7));
        assert_eq!(pit.pio_read(0x40, at(7)) & 0x40, 0);
        // Channel 0 counts 65536 from tick 0 in mode 3 (down by two per tick): 18.2 Hz on IRQ 0.
        assert_eq!(latched(&mut pit, 0, at(1)), 0xfffe);
        assert_eq!(pit.next_irq0_ns(0), Some(at(65536)));
        assert_eq!(pit.poll_irq0(at(10 * 65536)), 10);
        // Channel 2 waits for its gate: it does not count, OUT2 high.
        assert_eq!(pit.pio_read(0x61, 0) & 0x20, 0x20, "idle OUT2 is high");
        assert_eq!(latched(&mut pit, 2, at(100)), 0);
        // Raising gate 2 starts it.
        pit.pio_write(0x61, 1, at(100));
        assert_eq!(latched(&mut pit, 2, at(101)), 0xfffe);
    }

    #[test]
    fn reinject_mode_owes_every_edge_up_to_a_cap() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 1193, 0);
        // Five edges in 5 ms: all owed, handed out one at a time.
        assert_eq!(pit.count_irq0(5_000_000, 100), 0);
        assert_eq!(pit.owed_irq0(), 5);
        let taken: u64 = (0..7).map(|_| pit.take_owed_irq0()).sum();
        assert_eq!(taken, 5);
        assert_eq!(pit.owed_irq0(), 0);
        // A long stop: edges beyond the cap are dropped and counted.
        assert_eq!(pit.count_irq0(1_005_000_000, 100), 900);
        assert_eq!(pit.owed_irq0(), 100);
    }

    #[test]
    fn mode2_periodic_is_exact_and_does_not_drift() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 1193, 0);
        assert_eq!(pit.poll_irq0(1_000_000_000), 1000);
        // Poll every millisecond for an hour: the total is exactly the tick count / N.
        let mut total = 1000;
        let mut now = 1_000_000_000u64;
        while now < 3_600_000_000_000 {
            now += 1_000_000;
            total += pit.poll_irq0(now);
        }
        assert_eq!(total, tick_at(now) / 1193);
        // next_irq0_ns names the exact edge times.
        let mut t = now;
        for _ in 0..5 {
            let next = pit.next_irq0_ns(t).unwrap();
            assert_eq!(tick_at(next) % 1193, 0);
            assert_eq!(pit.poll_irq0(next - 1), 0);
            assert_eq!(pit.poll_irq0(next), 1);
            t = next;
        }
    }

    #[test]
    fn mode2_readout_and_out() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 1000, at(7));
        assert_eq!(latched(&mut pit, 0, at(7)), 1000);
        assert_eq!(latched(&mut pit, 0, at(107)), 900);
        assert_eq!(latched(&mut pit, 0, at(1006)), 1, "count reaches 1");
        assert!(!out(&mut pit, 0, at(1006)), "OUT low while the count is 1");
        assert_eq!(pit.poll_irq0(at(1006)), 0);
        assert!(out(&mut pit, 0, at(1007)));
        assert_eq!(latched(&mut pit, 0, at(1007)), 1000, "reloaded");
        assert_eq!(pit.poll_irq0(at(1007)), 1);
    }

    #[test]
    fn mode2_new_count_waits_for_end_of_period() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 1000, 0);
        // A new count mid-period (no control word).
        pit.pio_write(0x40, 300u16.to_le_bytes()[0], at(500));
        pit.pio_write(0x40, 300u16.to_le_bytes()[1], at(500));
        pit.pio_write(0x43, 0xe2, at(600)); // read-back status ch0
        assert_eq!(
            pit.pio_read(0x40, at(600)) & 0x40,
            0x40,
            "null count until loaded"
        );
        assert_eq!(pit.next_irq0_ns(at(500)), Some(at(1000)));
        assert_eq!(latched(&mut pit, 0, at(999)), 1);
        assert_eq!(pit.next_irq0_ns(at(1000)), Some(at(1300)));
        assert_eq!(latched(&mut pit, 0, at(1000)), 300);
        assert_eq!(latched(&mut pit, 0, at(1100)), 200);
        pit.pio_write(0x43, 0xe2, at(1100));
        assert_eq!(pit.pio_read(0x40, at(1100)) & 0x40, 0);
        // Edges at 1000, 1300, 1600, 1900.
        assert_eq!(pit.poll_irq0(at(1999)), 4);
    }

    #[test]
    fn edges_across_a_reload_in_one_poll() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 1000, 0);
        pit.pio_write(0x40, 0x64, at(10)); // 100
        pit.pio_write(0x40, 0x00, at(10));
        assert_eq!(pit.poll_irq0(at(10)), 0);
        // Edges at 1000 (old count), then 1100, 1200, ..., 2000.
        assert_eq!(pit.poll_irq0(at(2050)), 11);
    }

    #[test]
    fn mode3_square_wave_even_and_odd() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x36, 100, 0);
        for x in 0..200u64 {
            assert_eq!(out(&mut pit, 0, at(x)), x % 100 < 50, "OUT at tick {x}");
            let expect = 100 - 2 * (x % 100 % 50) as u16;
            assert_eq!(latched(&mut pit, 0, at(x)), expect, "count at tick {x}");
        }
        assert_eq!(pit.poll_irq0(at(250)), 2);

        // Odd count 5: high 3 ticks, low 2; counts 5,4,2 | 5,2.
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x36, 5, 0);
        let outs: Vec<bool> = (0..10).map(|x| out(&mut pit, 0, at(x))).collect();
        assert_eq!(
            outs,
            [true, true, true, false, false, true, true, true, false, false]
        );
        let counts: Vec<u16> = (0..10).map(|x| latched(&mut pit, 0, at(x))).collect();
        assert_eq!(counts, [5, 4, 2, 5, 2, 5, 4, 2, 5, 2]);
        assert_eq!(pit.poll_irq0(at(10)), 2);
    }

    #[test]
    fn mode3_new_count_waits_for_end_of_half_period() {
        // Written in the high half: loads at its end, starting the low half.
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x36, 100, 0);
        pit.pio_write(0x40, 40, at(10));
        pit.pio_write(0x40, 0, at(10));
        assert!(out(&mut pit, 0, at(49)));
        assert!(!out(&mut pit, 0, at(50)));
        assert_eq!(latched(&mut pit, 0, at(50)), 40);
        assert_eq!(pit.next_irq0_ns(at(10)), Some(at(70)));
        assert!(out(&mut pit, 0, at(70)));
        assert_eq!(pit.poll_irq0(at(150)), 3, "edges at 70, 110, 150");

        // Written in the low half: loads at the end of the period.
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x36, 100, 0);
        pit.pio_write(0x40, 40, at(60));
        pit.pio_write(0x40, 0, at(60));
        assert_eq!(pit.next_irq0_ns(at(60)), Some(at(100)));
        assert_eq!(pit.next_irq0_ns(at(100)), Some(at(140)));
        assert_eq!(pit.poll_irq0(at(180)), 3, "edges at 100, 140, 180");
    }

    #[test]
    fn mode0_one_shot() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x30, 1000, 0);
        assert!(!out(&mut pit, 0, 0));
        assert_eq!(pit.next_irq0_ns(0), Some(at(1000)));
        assert_eq!(pit.poll_irq0(at(999)), 0);
        assert_eq!(pit.poll_irq0(at(1000)), 1);
        assert!(out(&mut pit, 0, at(1000)));
        assert_eq!(pit.next_irq0_ns(at(1000)), None);
        assert_eq!(pit.poll_irq0(at(100_000_000)), 0, "one shot only");
        assert_eq!(latched(&mut pit, 0, at(1001)), 0xffff, "the counter wraps");

        // The first byte of a new count stops counting and drops OUT; the second restarts.
        let b = 100_000_000;
        pit.pio_write(0x40, 0x00, at(b));
        assert!(!out(&mut pit, 0, at(b)));
        let frozen = latched(&mut pit, 0, at(b));
        assert_eq!(latched(&mut pit, 0, at(b + 500)), frozen);
        pit.pio_write(0x40, 0x01, at(b + 500)); // count 0x100
        assert_eq!(pit.next_irq0_ns(at(b + 500)), Some(at(b + 756)));
        assert_eq!(pit.poll_irq0(at(b + 1000)), 1);
    }

    #[test]
    fn control_word_raising_out_is_an_edge() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x30, 1000, 0); // OUT low
        pit.pio_write(0x43, 0x34, at(10)); // mode 2: OUT high at once
        assert_eq!(pit.poll_irq0(at(10)), 1);
        pit.pio_write(0x43, 0x34, at(20)); // already high
        assert_eq!(pit.poll_irq0(at(20)), 0);
    }

    #[test]
    fn latch_holds_until_read() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 1000, 0);
        pit.pio_write(0x43, 0x00, at(100));
        pit.pio_write(0x43, 0x00, at(200)); // ignored: previous latch unread
        assert_eq!(pit.pio_read(0x40, at(300)), (900u16 & 0xff) as u8);
        assert_eq!(pit.pio_read(0x40, at(400)), (900u16 >> 8) as u8);
        // Unlatched: each read samples the counter, with the read flip-flop.
        assert_eq!(pit.pio_read(0x40, at(500)), (500u16 & 0xff) as u8);
        assert_eq!(pit.pio_read(0x40, at(500)), (500u16 >> 8) as u8);
    }

    #[test]
    fn read_back_status_then_count() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 1000, 0);
        pit.pio_write(0x43, 0xc2, at(250)); // latch count and status of channel 0
        assert_eq!(
            pit.pio_read(0x40, at(260)),
            0x80 | 0x34,
            "OUT high, lohi, mode 2"
        );
        assert_eq!(pit.pio_read(0x40, at(260)), (750u16 & 0xff) as u8);
        assert_eq!(pit.pio_read(0x40, at(260)), (750u16 >> 8) as u8);
        // Status of all three channels.
        pit.pio_write(0x43, 0xee, at(300));
        assert_eq!(
            pit.pio_read(0x41, at(300)),
            0x80 | 0x36,
            "power-on: counting 65536 in mode 3, first half"
        );
    }

    #[test]
    fn lobyte_and_hibyte_access() {
        let mut pit = Pit::new();
        pit.pio_write(0x43, 0x14, 0); // lobyte only, mode 2
        pit.pio_write(0x40, 0x50, 0);
        assert_eq!(pit.next_irq0_ns(0), Some(at(0x50)));
        assert_eq!(pit.pio_read(0x40, at(0x10)), 0x40);
        assert_eq!(pit.pio_read(0x40, at(0x10)), 0x40, "no flip-flop");
        pit.pio_write(0x43, 0x24, at(1000)); // hibyte only
        pit.pio_write(0x40, 0x12, at(1000));
        assert_eq!(pit.next_irq0_ns(at(1000)), Some(at(1000 + 0x1200)));
        assert_eq!(pit.pio_read(0x40, at(1000 + 0x200)), 0x10);
    }

    #[test]
    fn interleaved_lohi_reads_and_writes() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 1000, 0);
        pit.pio_write(0x43, 0x00, at(100));
        assert_eq!(pit.pio_read(0x40, at(100)), (900u16 & 0xff) as u8);
        pit.pio_write(0x40, 0x34, at(100));
        assert_eq!(pit.pio_read(0x40, at(100)), (900u16 >> 8) as u8);
        pit.pio_write(0x40, 0x12, at(100)); // new count 0x1234 at end of period
        assert_eq!(pit.next_irq0_ns(at(1000)), Some(at(1000 + 0x1234)));
    }

    #[test]
    fn bcd_counting() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x35, 0x1000, 0); // mode 2, BCD, 1000
        assert_eq!(pit.next_irq0_ns(0), Some(at(1000)));
        assert_eq!(latched(&mut pit, 0, at(1)), 0x0999);
        assert_eq!(latched(&mut pit, 0, at(1000 - 12)), 0x0012);
        program(&mut pit, 0, 0x35, 0, at(5000)); // 0 = 10000
        assert_eq!(pit.next_irq0_ns(at(5000)), Some(at(15_000)));
        assert_eq!(latched(&mut pit, 0, at(5001)), 0x9999);
    }

    #[test]
    fn count_zero_is_65536() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 0, 0);
        assert_eq!(pit.next_irq0_ns(0), Some(at(65536)));
        assert_eq!(latched(&mut pit, 0, 0), 0);
        assert_eq!(latched(&mut pit, 0, at(1)), 0xffff);
        // 18.2 Hz, the BIOS rate.
        assert_eq!(pit.poll_irq0(10_000_000_000), 182);
    }

    #[test]
    fn channel2_gate_and_out2_like_linux_calibration() {
        let mut pit = Pit::new();
        // Gate high, speaker off, as pit_calibrate_tsc does.
        let v = pit.pio_read(0x61, 0);
        pit.pio_write(0x61, (v & !0x02) | 0x01, 0);
        program(&mut pit, 2, 0xb0, 11932, 0); // mode 0, ~10 ms
        assert_eq!(pit.pio_read(0x61, 0) & 0x21, 0x01, "OUT2 low, gate echoed");
        let mut now = 0;
        let mut loops = 0;
        while pit.pio_read(0x61, now) & 0x20 == 0 {
            now += 1_000;
            loops += 1;
        }
        assert_eq!(tick_at(now), 11932.max(tick_at(now)));
        assert!(tick_at(now - 1_000) < 11932);
        assert_eq!(loops, 10_001);
        // Channel 2 never touches IRQ 0.
        assert_eq!(pit.poll_irq0(now), 0);
    }

    #[test]
    fn channel2_gate_low_suspends_mode0() {
        let mut pit = Pit::new();
        program(&mut pit, 2, 0xb0, 1000, 0); // gate low: waits
        assert_eq!(latched(&mut pit, 2, at(500)), 1000);
        pit.pio_write(0x61, 0x01, at(500));
        assert_eq!(latched(&mut pit, 2, at(700)), 800);
        pit.pio_write(0x61, 0x00, at(700));
        assert_eq!(latched(&mut pit, 2, at(5000)), 800, "suspended");
        pit.pio_write(0x61, 0x01, at(5000));
        assert!(!out(&mut pit, 2, at(5799)));
        assert!(out(&mut pit, 2, at(5800)));
    }

    #[test]
    fn channel2_gate_restarts_modes_2_and_3() {
        let mut pit = Pit::new();
        pit.pio_write(0x61, 0x01, 0);
        program(&mut pit, 2, 0xb6, 100, 0); // mode 3
        assert!(!out(&mut pit, 2, at(60)));
        pit.pio_write(0x61, 0x00, at(60));
        assert!(out(&mut pit, 2, at(60)), "gate low forces OUT high");
        assert!(out(&mut pit, 2, at(90)));
        pit.pio_write(0x61, 0x01, at(90));
        assert_eq!(latched(&mut pit, 2, at(90)), 100, "reloaded by the gate");
        assert!(!out(&mut pit, 2, at(140)));
    }

    #[test]
    fn refresh_bit_toggles_with_virtual_time() {
        let mut pit = Pit::new();
        assert_eq!(pit.pio_read(0x61, 0) & 0x10, 0);
        assert_eq!(pit.pio_read(0x61, 15_084) & 0x10, 0);
        assert_eq!(pit.pio_read(0x61, 15_085) & 0x10, 0x10);
        assert_eq!(pit.pio_read(0x61, 30_170) & 0x10, 0);
        pit.pio_write(0x61, 0xff, 0);
        assert_eq!(
            pit.pio_read(0x61, 0) & 0xcf,
            0x0f,
            "bits 0-3 read back, 6-7 zero"
        );
    }

    #[test]
    fn mode4_strobe_and_modes_1_5_without_trigger() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x38, 100, 0); // mode 4 (Linux oneshot clockevent)
        assert!(out(&mut pit, 0, at(99)));
        assert!(!out(&mut pit, 0, at(100)), "strobe");
        assert!(out(&mut pit, 0, at(101)));
        assert_eq!(pit.poll_irq0(at(101)), 1);
        assert_eq!(pit.next_irq0_ns(at(101)), None);
        // Re-arming with a new count restarts at once.
        pit.pio_write(0x40, 50, at(200));
        pit.pio_write(0x40, 0, at(200));
        assert_eq!(pit.next_irq0_ns(at(200)), Some(at(251)));

        for control in [0x32u8, 0x3a] {
            let mut pit = Pit::new();
            program(&mut pit, 0, control, 100, 0);
            assert!(out(&mut pit, 0, at(50)));
            assert_eq!(pit.poll_irq0(at(1000)), 0, "gate 0 never rises");
            assert_eq!(pit.next_irq0_ns(at(1000)), None);
        }
    }

    #[test]
    fn mode1_on_channel2_is_a_gate_triggered_one_shot() {
        let mut pit = Pit::new();
        program(&mut pit, 2, 0xb2, 100, 0);
        assert!(out(&mut pit, 2, at(10)));
        pit.pio_write(0x61, 0x01, at(10));
        assert!(!out(&mut pit, 2, at(10)));
        assert!(!out(&mut pit, 2, at(109)));
        assert!(out(&mut pit, 2, at(110)));
        // Retrigger.
        pit.pio_write(0x61, 0x00, at(200));
        pit.pio_write(0x61, 0x01, at(300));
        assert!(!out(&mut pit, 2, at(350)));
    }

    #[test]
    fn illegal_count_one_is_quiet() {
        for control in [0x34u8, 0x36] {
            let mut pit = Pit::new();
            program(&mut pit, 0, control, 1, 0);
            assert_eq!(pit.poll_irq0(1_000_000), 0);
            assert_eq!(pit.next_irq0_ns(1_000_000), None);
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut pit = Pit::new();
        let mut now = 0u64;
        let mut x = 0x1234_5678u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let port = [0x40u16, 0x41, 0x42, 0x43, 0x61, 0x44][(x % 6) as usize];
            let val = (x >> 8) as u8;
            now += u64::from(x >> 20);
            if x & 1 == 0 {
                pit.pio_write(port, val, now);
            } else {
                pit.pio_read(port, now);
            }
            pit.poll_irq0(now);
            pit.next_irq0_ns(now);
        }
        for now in [u64::MAX - 1, u64::MAX, 0] {
            program(&mut pit, 0, 0x34, 2, now);
            pit.poll_irq0(now);
            pit.next_irq0_ns(now);
            pit.pio_read(0x40, now);
        }
    }

    #[test]
    fn impossible_saved_counts_are_sanitised() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0x34, 100, 0);
        let mut state = pit.state();
        state.channels[0].count = 0;
        state.channels[0].cr = 0x20000;
        let mut pit = Pit::new();
        pit.restore(&state).unwrap();
        assert_eq!(pit.poll_irq0(at(65536)), 1);
        pit.next_irq0_ns(at(65536));
        pit.pio_read(0x40, at(70000));
    }

    #[test]
    fn restored_pit_behaves_identically() {
        let mut a = Pit::new();
        program(&mut a, 0, 0x34, 1193, 0);
        a.pio_write(0x40, 0x10, at(300)); // new count waiting
        a.pio_write(0x40, 0x02, at(300));
        a.pio_write(0x61, 0x01, at(310));
        program(&mut a, 2, 0xb0, 5000, at(320));
        a.pio_write(0x43, 0x00, at(400)); // latched, unread
        assert_eq!(a.poll_irq0(at(350)), 0);
        let mut b = Pit::new();
        b.restore(&a.state()).unwrap();
        assert_eq!(a, b);
        for pit in [&mut a, &mut b] {
            assert_eq!(pit.pio_read(0x40, at(2000)), (793u16 & 0xff) as u8);
        }
        for now in (0..50).map(|i| at(2000 + i * 997)) {
            assert_eq!(a.poll_irq0(now), b.poll_irq0(now));
            assert_eq!(a.next_irq0_ns(now), b.next_irq0_ns(now));
            assert_eq!(a.pio_read(0x40, now), b.pio_read(0x40, now));
            assert_eq!(a.pio_read(0x61, now), b.pio_read(0x61, now));
        }
        assert_eq!(a.state(), b.state());
    }
}
