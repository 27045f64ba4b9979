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
//! channel produces no edges. Channel 1 counts but drives nothing. Nothing counts at power-on:
//! every channel waits, OUT high, until the guest programs it.
//!
//! # Channel 0 and IRQ 0
//!
//! [`Pit::poll_irq0`] returns the rising edges of channel 0's OUT since the last poll: the
//! periodic edges, and an edge caused by a register write that raised OUT (e.g. a control word
//! selecting mode 2 while a mode 0 count was running). Edges before a reprogramming are kept
//! until the next poll.

use serde::{Deserialize, Serialize};

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
    fn power_on(gate: bool) -> Self {
        PitChannelState {
            mode_bits: 3,
            access: Access::Word,
            bcd: false,
            count: 0x10000,
            cr: 0x10000,
            armed: false,
            run: Run::Idle { ce: 0 },
            out_idle: true,
            gate,
            reload: None,
            null_count: true,
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
    /// A PIT at power-on: nothing counts until the guest programs a channel; channel 2's gate
    /// (port 0x61 bit 0) is low.
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

    /// The virtual time (ns) of channel 0's next rising OUT edge after `now_ns`, if it will
    /// have one (used to advance time when the guest halts). Edges at or before `now_ns` are
    /// what [`Pit::poll_irq0`] returns.
    pub fn next_irq0_ns(&self, now_ns: u64) -> Option<u64> {
        let t = tick_at(now_ns).max(self.irq0_tick);
        self.channels[0].next_edge_after(t).map(ns_of_tick)
    }

    /// The complete state.
    pub fn state(&self) -> PitState {
        PitState {
            channels: self.channels,
            port61: self.port61,
            irq0_tick: self.irq0_tick,
            irq0_pending: self.irq0_pending,
        }
    }

    /// A PIT in exactly the saved state `s`.
    pub fn from_state(s: &PitState) -> Self {
        Pit {
            channels: s.channels,
            port61: s.port61 & PORT61_RW_MASK,
            irq0_tick: s.irq0_tick,
            irq0_pending: s.irq0_pending,
        }
    }
}
