//! The MC146818 CMOS real-time clock with its 128 bytes of NVRAM, at ports 0x70 (index, bit 7
//! = NMI mask) and 0x71 (data).
//!
//! # Time
//!
//! The clock shows `epoch_secs` (Unix time, chosen by the VMM) at virtual time 0 and counts
//! virtual time from there: nothing here reads the host clock. Internally it keeps the time as
//! seconds on the proleptic Gregorian calendar (no time zone, no leap seconds), and the
//! registers are computed from it on every read, in the format register B selects (BCD or
//! binary, 24 or 12 hour). The date math is done here, and tested against known dates.
//!
//! The divider chain ticks at 32.768 kHz on a grid anchored to the clock's second boundaries:
//! the update (the seconds increment) happens on those boundaries, periodic interrupts on
//! multiples of their period on the same grid, so nothing drifts.
//!
//! # Registers
//!
//! - 0x00-0x09: seconds, seconds alarm, minutes, minutes alarm, hours, hours alarm, day of
//!   week (1 = Sunday), day of month, month, year; 0x32: century. Writing a time register
//!   while the clock runs moves the clock (the other registers keep counting from the new
//!   value); with register B's SET bit the clock stops, the guest writes all of them, and
//!   clearing SET restarts it from what was written. The day of week is recomputed from the
//!   date while the clock runs.
//! - 0x0a (A): UIP (bit 7) is set during the 244 us before each second boundary while the
//!   clock runs; DV (bits 6-4) = 11x holds the divider in reset, and releasing it puts the
//!   next update 500 ms later; RS (bits 3-0) selects the periodic interrupt rate.
//! - 0x0b (B): SET, PIE, AIE, UIE, SQWE, DM, 24/12, DSE (daylight saving is not applied).
//!   Setting SET clears UIE, as the datasheet says.
//! - 0x0c (C): IRQF, PF, AF, UF; flags are set whether or not their interrupt is enabled, and
//!   reading C clears them all.
//! - 0x0d (D): VRT = 1 (the battery is fine).
//! - 0x0e-0x7f: NVRAM, initially zero (except the century, which is part of the clock).
//!
//! # IRQ 8
//!
//! The interrupt output is IRQF = (PF and PIE) or (AF and AIE) or (UF and UIE): it stays high
//! until the guest reads register C, as on the chip. [`Rtc::poll_irq8`] reports its rising
//! edges, so a guest that never reads C gets one interrupt, like on a PC.

use serde::{Deserialize, Serialize};

use crate::persist::{Persist, RestoreError};

const NS_PER_SEC: i128 = 1_000_000_000;
/// The divider chain's frequency.
const DIVIDER_HZ: i128 = 32_768;
/// UIP is set this long before each update.
const UIP_NS: i128 = 244_000;
/// Releasing the divider reset puts the first update this far away.
const DIVIDER_RELEASE_NS: i128 = 500_000_000;

const REG_SEC: usize = 0x00;
const REG_SEC_ALARM: usize = 0x01;
const REG_MIN: usize = 0x02;
const REG_MIN_ALARM: usize = 0x03;
const REG_HOUR: usize = 0x04;
const REG_HOUR_ALARM: usize = 0x05;
const REG_DOW: usize = 0x06;
const REG_DOM: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;
/// The registers that hold the time and date.
const TIME_REGS: [usize; 8] = [
    REG_SEC,
    REG_MIN,
    REG_HOUR,
    REG_DOW,
    REG_DOM,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;

/// Days from 1970-01-01 to `year`-`month`-`day` (proleptic Gregorian; `month` 1..=12).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (`year`, `month` 1..=12, `day` 1..=31) `days` after 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The broken-down time of `secs` seconds after 1970-01-01T00:00:00.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    /// Full year.
    pub year: i64,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// 0 = Sunday .. 6 = Saturday.
    pub weekday: u32,
}

impl DateTime {
    /// Breaks `secs` down.
    pub fn from_secs(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let tod = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: tod / 3600,
            minute: tod / 60 % 60,
            second: tod % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }
}

/// The saved state of the RTC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// The index register (port 0x70 bits 6-0).
    pub index: u8,
    /// Port 0x70 bit 7: NMI disabled.
    pub nmi_disabled: bool,
    /// The 128 register/NVRAM bytes. The time registers are meaningful here only while the
    /// clock is stopped (SET or divider reset); otherwise the time is `base_secs`.
    pub cmos: Vec<u8>,
    /// The clock's time (seconds since 1970) at `base_ns`, while it runs.
    pub base_secs: i64,
    /// A second boundary of the divider chain, in virtual ns (may be negative).
    pub base_ns: i128,
    /// Register C's PF, AF and UF flags, accounted up to `flags_ns`.
    pub flags: u8,
    /// Virtual time up to which `flags` accounts for events.
    pub flags_ns: u64,
    /// IRQF rose since the last `poll_irq8`.
    pub irq_edge: bool,
}

/// The MC146818 RTC with NVRAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rtc {
    index: u8,
    nmi_disabled: bool,
    cmos: [u8; 128],
    base_secs: i64,
    base_ns: i128,
    flags: u8,
    flags_ns: u64,
    irq_edge: bool,
}

fn to_bcd(v: u32) -> u8 {
    let v = v % 100;
    (((v / 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

/// An alarm register value that matches anything.
fn dont_care(v: u8) -> bool {
    v & 0xc0 == 0xc0
}

impl Rtc {
    /// `epoch_secs`: wall-clock seconds (Unix time) at virtual time 0. It's an input the VMM
    /// chooses. Register A starts at 0x26 (divider running, 1024 Hz rate selected, periodic
    /// interrupt off), B at 0x02 (BCD, 24 hour, no interrupts).
    pub fn new(epoch_secs: i64) -> Self {
        let mut cmos = [0u8; 128];
        cmos[REG_A] = 0x26;
        cmos[REG_B] = B_24H;
        Rtc {
            index: 0,
            nmi_disabled: false,
            cmos,
            base_secs: epoch_secs,
            base_ns: 0,
            flags: 0,
            flags_ns: 0,
            irq_edge: false,
        }
    }

    /// Whether the guest has disabled NMIs (port 0x70 bit 7).
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    fn reg_b(&self) -> u8 {
        self.cmos[REG_B]
    }

    /// The divider chain is held in reset (DV = 11x).
    fn divider_reset(&self) -> bool {
        (self.cmos[REG_A] >> 4) & 0x6 == 0x6
    }

    /// The clock is not counting: SET, or divider in reset.
    fn halted(&self) -> bool {
        self.reg_b() & B_SET != 0 || self.divider_reset()
    }

    /// Whole seconds from `base_ns` to `ns`.
    fn seconds_since_base(&self, ns: u64) -> i64 {
        let d = (i128::from(ns) - self.base_ns).div_euclid(NS_PER_SEC);
        i64::try_from(d).unwrap_or(i64::MAX)
    }

    /// The running clock's time at `ns`.
    fn running_secs(&self, ns: u64) -> i64 {
        self.base_secs.saturating_add(self.seconds_since_base(ns))
    }

    fn encode(&self, v: u32) -> u8 {
        if self.reg_b() & B_DM_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.reg_b() & B_DM_BINARY != 0 {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.reg_b() & B_24H != 0 {
            self.encode(hour)
        } else {
            let h12 = if hour.is_multiple_of(12) {
                12
            } else {
                hour % 12
            };
            self.encode(h12) | if hour >= 12 { 0x80 } else { 0 }
        }
    }

    fn decode_hour(&self, v: u8) -> u32 {
        if self.reg_b() & B_24H != 0 {
            self.decode(v)
        } else {
            self.decode(v & 0x7f) % 12 + if v & 0x80 != 0 { 12 } else { 0 }
        }
    }

    /// The time registers showing `secs`, as (register, value) pairs.
    fn time_regs(&self, secs: i64) -> [(usize, u8); 8] {
        let t = DateTime::from_secs(secs);
        [
            (REG_SEC, self.encode(t.second)),
            (REG_MIN, self.encode(t.minute)),
            (REG_HOUR, self.encode_hour(t.hour)),
            (REG_DOW, self.encode(t.weekday + 1)),
            (REG_DOM, self.encode(t.day)),
            (REG_MONTH, self.encode(t.month)),
            (REG_YEAR, self.encode(t.year.rem_euclid(100) as u32)),
            (
                REG_CENTURY,
                self.encode(t.year.div_euclid(100).rem_euclid(100) as u32),
            ),
        ]
    }

    /// The seconds since 1970 that time registers `regs` (indexed like the CMOS) stand for.
    /// Out-of-range values are normalised (like `mktime`), never rejected.
    fn secs_from_regs(&self, regs: &[u8; 128]) -> i64 {
        let second = i64::from(self.decode(regs[REG_SEC]));
        let minute = i64::from(self.decode(regs[REG_MIN]));
        let hour = i64::from(self.decode_hour(regs[REG_HOUR]));
        let day = i64::from(self.decode(regs[REG_DOM]));
        let month = self.decode(regs[REG_MONTH]);
        let year = i64::from(self.decode(regs[REG_YEAR]))
            + 100 * i64::from(self.decode(regs[REG_CENTURY]));
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || second > 59 || minute > 59 {
            tracing::warn!(
                "RTC: time registers hold an invalid date/time \
                 ({year}-{month}-{day} {hour}:{minute}:{second}); normalising it"
            );
        }
        let month = month.clamp(1, 12);
        let days = days_from_civil(year, month, 1) + day - 1;
        days * 86_400 + hour * 3600 + minute * 60 + second
    }

    /// Divider ticks from `base_ns` to `ns` (rounded down).
    fn divider_ticks(&self, ns: i128) -> i128 {
        ((ns - self.base_ns) * DIVIDER_HZ).div_euclid(NS_PER_SEC)
    }

    /// The periodic interrupt period in divider ticks, if one is selected and the divider runs.
    fn periodic_ticks(&self) -> Option<i128> {
        if self.divider_reset() {
            return None;
        }
        match self.cmos[REG_A] & 0x0f {
            0 => None,
            1 => Some(128),
            2 => Some(256),
            rs => Some(1 << (rs - 1)),
        }
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let t = DateTime::from_secs(secs);
        let check = |alarm: usize, actual: u8| {
            let a = self.cmos[alarm];
            dont_care(a) || a == actual
        };
        check(REG_SEC_ALARM, self.encode(t.second))
            && check(REG_MIN_ALARM, self.encode(t.minute))
            && check(REG_HOUR_ALARM, self.encode_hour(t.hour))
    }

    /// The first second at or after `from` that matches the alarm, within about a day.
    fn next_alarm_secs(&self, from: i64) -> Option<i64> {
        let hour_dc = dont_care(self.cmos[REG_HOUR_ALARM]);
        let min_dc = dont_care(self.cmos[REG_MIN_ALARM]);
        let mut s = from;
        // Enough steps for any alarm that can match: at most 24 hour skips, 60 minute skips
        // and 60 second steps, twice over.
        for _ in 0..400 {
            let t = DateTime::from_secs(s);
            s = if !hour_dc && self.cmos[REG_HOUR_ALARM] != self.encode_hour(t.hour) {
                s.checked_sub(s.rem_euclid(3600))?.checked_add(3600)?
            } else if !min_dc && self.cmos[REG_MIN_ALARM] != self.encode(t.minute) {
                s.checked_sub(s.rem_euclid(60))?.checked_add(60)?
            } else if self.alarm_matches(s) {
                return Some(s);
            } else {
                s.checked_add(1)?
            };
        }
        None
    }

    /// The first update (second boundary) after `ns` at which the alarm matches, in ns.
    fn next_alarm_ns(&self, ns: u64) -> Option<i128> {
        let k = i64::try_from((i128::from(ns) - self.base_ns).div_euclid(NS_PER_SEC) + 1).ok()?;
        let s = self.next_alarm_secs(self.base_secs.checked_add(k)?)?;
        Some(self.base_ns + (i128::from(s) - i128::from(self.base_secs)) * NS_PER_SEC)
    }

    /// Flags for the events in (a, b] under the current configuration.
    fn events_between(&self, a: u64, b: u64) -> u8 {
        let mut flags = 0;
        let (a_ns, b_ns) = (i128::from(a), i128::from(b));
        if let Some(p) = self.periodic_ticks() {
            if self.divider_ticks(b_ns).div_euclid(p) > self.divider_ticks(a_ns).div_euclid(p) {
                flags |= C_PF;
            }
        }
        if !self.halted() {
            if self.seconds_since_base(b) > self.seconds_since_base(a) {
                flags |= C_UF;
            }
            if self.next_alarm_ns(a).is_some_and(|t| t <= b_ns) {
                flags |= C_AF;
            }
        }
        flags
    }

    /// IRQF: a flag whose interrupt is enabled is set.
    fn irqf(&self) -> bool {
        self.flags & self.reg_b() & (C_PF | C_AF | C_UF) != 0
    }

    /// Runs `f`, noting a rising edge of IRQF.
    fn watch_irq<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let before = self.irqf();
        let r = f(self);
        if !before && self.irqf() {
            self.irq_edge = true;
        }
        r
    }

    /// Accounts the events up to `now_ns` into register C.
    fn catch_up(&mut self, now_ns: u64) {
        if now_ns <= self.flags_ns {
            return;
        }
        self.watch_irq(|rtc| {
            rtc.flags |= rtc.events_between(rtc.flags_ns, now_ns);
            rtc.flags_ns = now_ns;
        });
    }

    /// Changes registers A and B, starting or stopping the clock and the divider as needed.
    fn reconfigure(&mut self, new_a: u8, mut new_b: u8, now_ns: u64) {
        if new_b & B_SET != 0 {
            new_b &= !B_UIE;
        }
        let was_halted = self.halted();
        let divider_was_running = !self.divider_reset();
        let running_secs = self.running_secs(now_ns);
        self.watch_irq(|rtc| {
            rtc.cmos[REG_A] = new_a & !A_UIP;
            rtc.cmos[REG_B] = new_b;
        });
        if !was_halted && self.halted() {
            // The clock stops: the registers hold its time, in the format now selected.
            for (reg, v) in self.time_regs(running_secs) {
                self.cmos[reg] = v;
            }
        }
        if !divider_was_running && !self.divider_reset() {
            self.base_ns = i128::from(now_ns) - DIVIDER_RELEASE_NS;
        }
        if was_halted && !self.halted() {
            // The clock restarts from what the registers hold, on the divider's phase.
            let secs = self.secs_from_regs(&self.cmos);
            self.base_secs = secs.saturating_sub(self.seconds_since_base(now_ns));
        }
    }

    /// Writes time register `reg`.
    fn write_time_reg(&mut self, reg: usize, val: u8, now_ns: u64) {
        if self.halted() {
            self.cmos[reg] = val;
            return;
        }
        // Running: move the clock so that the register shows `val`.
        let current = self.running_secs(now_ns);
        let mut regs = [0u8; 128];
        for (r, v) in self.time_regs(current) {
            regs[r] = v;
        }
        regs[reg] = val;
        let wanted = self.secs_from_regs(&regs);
        self.base_secs = self
            .base_secs
            .saturating_add(wanted.saturating_sub(current));
    }

    fn read_reg(&mut self, reg: usize, now_ns: u64) -> u8 {
        match reg {
            REG_A => {
                let phase = (i128::from(now_ns) - self.base_ns).rem_euclid(NS_PER_SEC);
                let uip = !self.halted() && phase >= NS_PER_SEC - UIP_NS;
                self.cmos[REG_A] & !A_UIP | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                let v = self.flags | if self.irqf() { C_IRQF } else { 0 };
                self.flags = 0;
                v
            }
            REG_D => D_VRT,
            r if TIME_REGS.contains(&r) && !self.halted() => {
                let secs = self.running_secs(now_ns);
                self.time_regs(secs)
                    .into_iter()
                    .find(|&(tr, _)| tr == r)
                    .map_or(0, |(_, v)| v)
            }
            r => self.cmos[r],
        }
    }

    fn write_reg(&mut self, reg: usize, val: u8, now_ns: u64) {
        match reg {
            REG_A => self.reconfigure(val, self.reg_b(), now_ns),
            REG_B => self.reconfigure(self.cmos[REG_A], val, now_ns),
            REG_C | REG_D => {
                tracing::warn!("RTC: write {val:#04x} to read-only register {reg:#x} ignored");
            }
            r if TIME_REGS.contains(&r) => self.write_time_reg(r, val, now_ns),
            r => self.cmos[r] = val,
        }
    }

    /// A read from port 0x70 (write-only: reads 0xff) or 0x71 (the indexed register) at
    /// virtual time `now_ns`.
    pub fn pio_read(&mut self, port: u16, now_ns: u64) -> u8 {
        self.catch_up(now_ns);
        match port {
            0x70 => 0xff,
            0x71 => self.read_reg(usize::from(self.index), now_ns),
            _ => {
                tracing::warn!("RTC: read from port {port:#x}, which is not an RTC port");
                0xff
            }
        }
    }

    /// A write to port 0x70 (index and NMI mask) or 0x71 (the indexed register) at virtual
    /// time `now_ns`.
    pub fn pio_write(&mut self, port: u16, val: u8, now_ns: u64) {
        self.catch_up(now_ns);
        match port {
            0x70 => {
                self.index = val & 0x7f;
                self.nmi_disabled = val & 0x80 != 0;
            }
            0x71 => self.write_reg(usize::from(self.index), val, now_ns),
            _ => {
                tracing::warn!("RTC: write {val:#04x} to port {port:#x}, which is not an RTC port")
            }
        }
    }

    /// True if IRQF rose (a periodic, alarm or update-ended interrupt enabled in register B
    /// fired) since the last poll. The VMM pulses IRQ 8.
    pub fn poll_irq8(&mut self, now_ns: u64) -> bool {
        self.catch_up(now_ns);
        std::mem::take(&mut self.irq_edge)
    }

    /// The virtual time (ns) of IRQF's next rising edge after `now_ns`, if it will have one.
    /// None while IRQF is high (the guest must read register C first). Call
    /// [`Rtc::poll_irq8`] for `now_ns` first: events up to `now_ns` are its business.
    pub fn next_irq8_ns(&self, now_ns: u64) -> Option<u64> {
        let mut rtc = self.clone();
        rtc.catch_up(now_ns);
        if rtc.irqf() {
            return None;
        }
        let from = rtc.flags_ns;
        let b = rtc.reg_b();
        let mut next: Option<i128> = None;
        let mut consider = |t: Option<i128>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if b & B_PIE != 0 {
            consider(rtc.periodic_ticks().map(|p| {
                let tick = (rtc.divider_ticks(i128::from(from)).div_euclid(p) + 1) * p;
                rtc.base_ns + (tick * NS_PER_SEC + DIVIDER_HZ - 1).div_euclid(DIVIDER_HZ)
            }));
        }
        if !rtc.halted() {
            if b & B_UIE != 0 {
                let k = i128::from(rtc.seconds_since_base(from)) + 1;
                consider(Some(rtc.base_ns + k * NS_PER_SEC));
            }
            if b & B_AIE != 0 {
                consider(rtc.next_alarm_ns(from));
            }
        }
        next.map(|t| u64::try_from(t).unwrap_or(u64::MAX))
    }
}

impl Persist for Rtc {
    type State = RtcState;

    /// The complete state.
    fn state(&self) -> RtcState {
        RtcState {
            index: self.index,
            nmi_disabled: self.nmi_disabled,
            cmos: self.cmos.to_vec(),
            base_secs: self.base_secs,
            base_ns: self.base_ns,
            flags: self.flags,
            flags_ns: self.flags_ns,
            irq_edge: self.irq_edge,
        }
    }

    /// Puts the RTC in exactly the saved state `s` (a `cmos` of the wrong length is cut or padded
    /// with zeros).
    fn restore(&mut self, s: &RtcState) -> Result<(), RestoreError> {
        let mut cmos = [0u8; 128];
        if s.cmos.len() != cmos.len() {
            tracing::warn!("RTC state has {} CMOS bytes, not 128", s.cmos.len());
        }
        for (dst, src) in cmos.iter_mut().zip(&s.cmos) {
            *dst = *src;
        }
        *self = Rtc {
            index: s.index & 0x7f,
            nmi_disabled: s.nmi_disabled,
            cmos,
            base_secs: s.base_secs,
            // Keeps the time arithmetic far from i128 limits; our own states are in range.
            base_ns: s.base_ns.clamp(i128::from(i64::MIN), i128::from(u64::MAX)),
            flags: s.flags & (C_PF | C_AF | C_UF),
            flags_ns: s.flags_ns,
            irq_edge: s.irq_edge,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    /// 2026-11-23T10:00:00Z, a Monday.
    const EPOCH: i64 = 1_795_428_000;

    fn read(rtc: &mut Rtc, reg: u8, now: u64) -> u8 {
        rtc.pio_write(0x70, reg, now);
        rtc.pio_read(0x71, now)
    }

    fn write(rtc: &mut Rtc, reg: u8, val: u8, now: u64) {
        rtc.pio_write(0x70, reg, now);
        rtc.pio_write(0x71, val, now);
    }

    /// (year, month, day, hour, minute, second) from the registers, BCD 24h assumed.
    fn clock(rtc: &mut Rtc, now: u64) -> [u8; 7] {
        [0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00].map(|r| read(rtc, r, now))
    }

    #[test]
    fn date_math_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 2, 29) * 86_400, 951_782_400);
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
        assert_eq!(
            days_from_civil(1900, 3, 1) - days_from_civil(1900, 2, 28),
            1
        );
        assert_eq!(
            days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 28),
            1
        );
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        let t = DateTime::from_secs(1_795_428_000);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2026, 11, 23, 10, 0, 0)
        );
        assert_eq!(t.weekday, 1, "Monday");
        let t = DateTime::from_secs(951_782_400);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2000, 2, 29, 2));
        let t = DateTime::from_secs(-1);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (1969, 12, 31, 23, 59, 59)
        );
        assert_eq!(t.weekday, 3, "Wednesday");
        for days in (-800_000i64..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn reads_time_in_bcd_24h() {
        let mut rtc = Rtc::new(EPOCH);
        assert_eq!(
            clock(&mut rtc, 0),
            [0x20, 0x26, 0x11, 0x23, 0x10, 0x00, 0x00]
        );
        assert_eq!(read(&mut rtc, 0x06, 0), 0x02, "Monday, Sunday = 1");
        let now = 3661 * SEC + SEC / 2;
        assert_eq!(
            clock(&mut rtc, now),
            [0x20, 0x26, 0x11, 0x23, 0x11, 0x01, 0x01]
        );
        assert_eq!(read(&mut rtc, 0x0a, 0), 0x26);
        assert_eq!(read(&mut rtc, 0x0b, 0), 0x02);
        assert_eq!(read(&mut rtc, 0x0d, 0), 0x80);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut rtc = Rtc::new(EPOCH);
        write(&mut rtc, 0x0b, 0x04, 0); // binary, 12 hour
        assert_eq!(read(&mut rtc, 0x04, 0), 10);
        assert_eq!(read(&mut rtc, 0x07, 0), 23);
        assert_eq!(read(&mut rtc, 0x09, 0), 26);
        assert_eq!(read(&mut rtc, 0x32, 0), 20);
        assert_eq!(read(&mut rtc, 0x04, 3 * 3600 * SEC), 0x81, "1 PM");
        assert_eq!(
            read(&mut rtc, 0x04, 14 * 3600 * SEC),
            12,
            "midnight is 12 AM"
        );
        write(&mut rtc, 0x0b, 0x00, 14 * 3600 * SEC); // BCD, 12 hour
        assert_eq!(read(&mut rtc, 0x04, 2 * 3600 * SEC), 0x92, "noon is 12 PM");
        write(&mut rtc, 0x0b, 0x06, 14 * 3600 * SEC); // binary, 24 hour
        assert_eq!(read(&mut rtc, 0x04, 14 * 3600 * SEC), 0);
    }

    #[test]
    fn century_rolls_over() {
        // 2099-12-31T23:59:59Z.
        let mut rtc = Rtc::new(4_102_444_799);
        assert_eq!(
            clock(&mut rtc, 0),
            [0x20, 0x99, 0x12, 0x31, 0x23, 0x59, 0x59]
        );
        assert_eq!(
            clock(&mut rtc, SEC),
            [0x21, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00]
        );
    }

    #[test]
    fn uip_before_each_second() {
        let mut rtc = Rtc::new(EPOCH);
        assert_eq!(read(&mut rtc, 0x0a, 999_755_999) & 0x80, 0);
        assert_eq!(read(&mut rtc, 0x0a, 999_756_000) & 0x80, 0x80);
        assert_eq!(read(&mut rtc, 0x0a, SEC - 1) & 0x80, 0x80);
        assert_eq!(read(&mut rtc, 0x0a, SEC) & 0x80, 0);
        write(&mut rtc, 0x0b, 0x82, SEC);
        assert_eq!(
            read(&mut rtc, 0x0a, 2 * SEC - 1) & 0x80,
            0,
            "SET clears UIP"
        );
    }

    #[test]
    fn linux_style_set_time() {
        let mut rtc = Rtc::new(EPOCH);
        let t0 = 10 * SEC + 300_000_000;
        // mc146818_set_time: SET, divider reset, write, restore B, restore A.
        let b = read(&mut rtc, 0x0b, t0);
        write(&mut rtc, 0x0b, b | 0x80, t0);
        let a = read(&mut rtc, 0x0a, t0);
        write(&mut rtc, 0x0a, a | 0x70, t0);
        assert_eq!(read(&mut rtc, 0x00, t0), 0x10, "frozen at 10:00:10");
        for (reg, val) in [
            (0x09, 0x30),
            (0x08, 0x01),
            (0x07, 0x02),
            (0x04, 0x03),
            (0x02, 0x04),
        ] {
            write(&mut rtc, reg, val, t0);
        }
        write(&mut rtc, 0x00, 0x05, t0);
        assert_eq!(
            read(&mut rtc, 0x00, t0 + 5 * SEC),
            0x05,
            "stopped while SET"
        );
        let t1 = t0 + 5 * SEC;
        write(&mut rtc, 0x0b, b, t1);
        write(&mut rtc, 0x0a, a, t1);
        // The first update comes 500 ms after the divider restarts.
        assert_eq!(read(&mut rtc, 0x00, t1 + 499_999_999), 0x05);
        assert_eq!(read(&mut rtc, 0x00, t1 + 500_000_000), 0x06);
        assert_eq!(
            clock(&mut rtc, t1 + 60 * SEC),
            [0x20, 0x30, 0x01, 0x02, 0x03, 0x05, 0x05]
        );
        assert_eq!(read(&mut rtc, 0x06, t1), 0x04, "2030-01-02 is a Wednesday");
    }

    #[test]
    fn set_without_divider_reset_keeps_phase() {
        let mut rtc = Rtc::new(EPOCH);
        let t0 = 10 * SEC + 300_000_000;
        write(&mut rtc, 0x0b, 0x82, t0);
        write(&mut rtc, 0x00, 0x30, t0);
        write(&mut rtc, 0x0b, 0x02, t0 + 100_000_000);
        assert_eq!(read(&mut rtc, 0x00, 11 * SEC - 1), 0x30);
        assert_eq!(
            read(&mut rtc, 0x00, 11 * SEC),
            0x31,
            "updates stay on the divider grid"
        );
    }

    #[test]
    fn writing_a_time_register_while_running_moves_the_clock() {
        let mut rtc = Rtc::new(EPOCH);
        write(&mut rtc, 0x02, 0x30, 5 * SEC);
        assert_eq!(
            clock(&mut rtc, 7 * SEC),
            [0x20, 0x26, 0x11, 0x23, 0x10, 0x30, 0x07]
        );
        write(&mut rtc, 0x09, 0x27, 7 * SEC);
        assert_eq!(read(&mut rtc, 0x09, 8 * SEC), 0x27);
        assert_eq!(
            read(&mut rtc, 0x06, 8 * SEC),
            0x03,
            "2027-11-23 is a Tuesday"
        );
    }

    #[test]
    fn periodic_interrupt_1024hz() {
        let mut rtc = Rtc::new(EPOCH);
        write(&mut rtc, 0x0b, 0x42, 0); // PIE
        assert!(!rtc.poll_irq8(0));
        let first = rtc.next_irq8_ns(0).unwrap();
        assert_eq!(first, 976_563, "32 divider ticks, rounded up");
        assert!(!rtc.poll_irq8(first - 1));
        assert!(rtc.poll_irq8(first));
        assert_eq!(
            rtc.next_irq8_ns(first),
            None,
            "IRQF stays high until C is read"
        );
        assert!(!rtc.poll_irq8(first + 10_000_000));
        assert_eq!(read(&mut rtc, 0x0c, first + 10_000_000), 0xc0);
        assert_eq!(
            read(&mut rtc, 0x0c, first + 10_000_000),
            0x00,
            "cleared by the read"
        );
        // A driver that reads C in every interrupt gets exactly 1024 a second.
        let mut now = first + 10_000_000;
        let mut count = 1; // the first one
        while let Some(next) = rtc.next_irq8_ns(now) {
            if next > SEC {
                break;
            }
            now = next;
            assert!(rtc.poll_irq8(now));
            count += 1;
            read(&mut rtc, 0x0c, now);
        }
        // The first edge, then those after the late C read (at 10.98 ms): periods 12..=1024.
        assert_eq!(count, 1 + (1024 - 11));
    }

    #[test]
    fn periodic_rates() {
        for (rs, hz) in [(3u8, 8192u64), (6, 1024), (1, 256), (2, 128), (15, 2)] {
            let mut rtc = Rtc::new(EPOCH);
            write(&mut rtc, 0x0a, 0x20 | rs, 0);
            write(&mut rtc, 0x0b, 0x42, 0);
            let mut now = 0;
            let mut n = 0;
            while let Some(next) = rtc.next_irq8_ns(now) {
                if next > SEC {
                    break;
                }
                now = next;
                assert!(rtc.poll_irq8(now));
                read(&mut rtc, 0x0c, now);
                n += 1;
            }
            assert_eq!(n, hz, "RS {rs}");
        }
    }

    #[test]
    fn update_ended_interrupt() {
        let mut rtc = Rtc::new(EPOCH);
        write(&mut rtc, 0x0a, 0x20, 0); // no periodic flag
        write(&mut rtc, 0x0b, 0x12, SEC / 3); // UIE
        assert_eq!(rtc.next_irq8_ns(SEC / 3), Some(SEC));
        assert!(rtc.poll_irq8(SEC));
        assert_eq!(read(&mut rtc, 0x0c, SEC), 0x90);
        assert_eq!(rtc.next_irq8_ns(SEC), Some(2 * SEC));
        // SET stops updates and clears UIE.
        write(&mut rtc, 0x0b, 0x92, SEC + 1);
        assert_eq!(read(&mut rtc, 0x0b, SEC + 1), 0x82);
        assert_eq!(rtc.next_irq8_ns(SEC + 1), None);
        assert!(!rtc.poll_irq8(5 * SEC));
        assert_eq!(read(&mut rtc, 0x0c, 5 * SEC), 0);
    }

    #[test]
    fn flags_without_enable_and_late_enable() {
        let mut rtc = Rtc::new(EPOCH);
        assert_eq!(
            read(&mut rtc, 0x0c, SEC / 2),
            0x40,
            "PF at the power-on 1024 Hz rate"
        );
        write(&mut rtc, 0x0a, 0x20, SEC / 2); // no periodic flag
        assert!(!rtc.poll_irq8(2 * SEC));
        assert_eq!(read(&mut rtc, 0x0c, 2 * SEC), 0x10, "UF without IRQF");
        assert!(!rtc.poll_irq8(3 * SEC));
        write(&mut rtc, 0x0b, 0x12, 3 * SEC); // UIE with UF already set: IRQF now
        assert!(rtc.poll_irq8(3 * SEC));
        assert_eq!(read(&mut rtc, 0x0c, 3 * SEC), 0x90);
    }

    #[test]
    fn alarm_interrupt() {
        let mut rtc = Rtc::new(EPOCH);
        write(&mut rtc, 0x0a, 0x20, 0); // no periodic flag
        write(&mut rtc, 0x01, 0x05, 0);
        write(&mut rtc, 0x03, 0x00, 0);
        write(&mut rtc, 0x05, 0x10, 0);
        write(&mut rtc, 0x0b, 0x22, 0); // AIE
        assert_eq!(rtc.next_irq8_ns(0), Some(5 * SEC));
        assert!(!rtc.poll_irq8(5 * SEC - 1));
        assert!(rtc.poll_irq8(5 * SEC));
        assert_eq!(read(&mut rtc, 0x0c, 5 * SEC), 0xb0, "IRQF, AF and UF");
        // Next match: tomorrow.
        assert_eq!(rtc.next_irq8_ns(5 * SEC), Some((86_400 + 5) * SEC));
        // Don't-care hours and minutes: every minute at :30.
        write(&mut rtc, 0x01, 0x30, 6 * SEC);
        write(&mut rtc, 0x03, 0xc0, 6 * SEC);
        write(&mut rtc, 0x05, 0xff, 6 * SEC);
        assert_eq!(rtc.next_irq8_ns(6 * SEC), Some(30 * SEC));
        assert!(rtc.poll_irq8(30 * SEC));
        read(&mut rtc, 0x0c, 30 * SEC);
        assert_eq!(rtc.next_irq8_ns(30 * SEC), Some(90 * SEC));
        // All don't care: every second.
        write(&mut rtc, 0x01, 0xc0, 31 * SEC);
        assert_eq!(rtc.next_irq8_ns(31 * SEC), Some(32 * SEC));
        // An alarm that can never match.
        write(&mut rtc, 0x01, 0x75, 31 * SEC);
        assert_eq!(rtc.next_irq8_ns(31 * SEC), None);
    }

    #[test]
    fn alarm_in_12_hour_mode() {
        let mut rtc = Rtc::new(EPOCH);
        write(&mut rtc, 0x0b, 0x20, 0); // BCD, 12 hour, AIE
        write(&mut rtc, 0x01, 0x00, 0);
        write(&mut rtc, 0x03, 0x00, 0);
        write(&mut rtc, 0x05, 0x81, 0); // 1 PM
        assert_eq!(rtc.next_irq8_ns(0), Some(3 * 3600 * SEC));
    }

    #[test]
    fn nvram_index_and_nmi() {
        let mut rtc = Rtc::new(EPOCH);
        write(&mut rtc, 0x40, 0xa5, 0);
        assert_eq!(read(&mut rtc, 0x40, 0), 0xa5);
        rtc.pio_write(0x70, 0x8f, 0);
        assert!(rtc.nmi_disabled());
        rtc.pio_write(0x71, 0x12, 0);
        assert_eq!(read(&mut rtc, 0x0f, 0), 0x12);
        assert!(!rtc.nmi_disabled());
        assert_eq!(rtc.pio_read(0x70, 0), 0xff);
        write(&mut rtc, 0x0d, 0x00, 0);
        assert_eq!(read(&mut rtc, 0x0d, 0), 0x80, "read-only");
    }

    #[test]
    fn garbage_never_panics() {
        let mut rtc = Rtc::new(EPOCH);
        let mut now = 0u64;
        let mut x = 0x9e37_79b9u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            now += u64::from(x >> 12) * 1000;
            let port = if x & 2 == 0 { 0x70 } else { 0x71 };
            if x & 1 == 0 {
                rtc.pio_write(port, (x >> 8) as u8, now);
            } else {
                rtc.pio_read(port, now);
            }
            rtc.poll_irq8(now);
            rtc.next_irq8_ns(now);
        }
        for epoch in [i64::MIN, i64::MAX, 0] {
            let mut rtc = Rtc::new(epoch);
            for now in [0, u64::MAX / 2, u64::MAX] {
                for reg in 0..0x0e {
                    read(&mut rtc, reg, now);
                }
                write(&mut rtc, 0x0b, 0x72, now);
                write(&mut rtc, 0x00, 0xff, now);
                rtc.poll_irq8(now);
                rtc.next_irq8_ns(now);
            }
        }
    }

    #[test]
    fn extreme_clocks_do_not_overflow() {
        for epoch in [i64::MAX, i64::MAX - 5, i64::MIN, i64::MIN + 5] {
            let mut rtc = Rtc::new(epoch);
            for alarm in [0x00u8, 0x13, 0x23, 0xc0] {
                write(&mut rtc, 0x05, alarm, 0);
                write(&mut rtc, 0x03, 0x59, 0);
                write(&mut rtc, 0x0b, 0x22, 0);
                for now in [1, 10 * SEC, u64::MAX / 3, u64::MAX] {
                    rtc.poll_irq8(now);
                    rtc.next_irq8_ns(now);
                    read(&mut rtc, 0x0c, now);
                    write(&mut rtc, 0x02, 0x59, now);
                }
            }
        }
        let mut state = Rtc::new(0).state();
        state.base_ns = i128::MIN;
        let mut rtc = Rtc::new(0);
        rtc.restore(&state).unwrap();
        write(&mut rtc, 0x0b, 0x72, u64::MAX);
        rtc.next_irq8_ns(u64::MAX);
    }

    #[test]
    fn restored_rtc_behaves_identically() {
        let mut a = Rtc::new(EPOCH);
        write(&mut a, 0x0a, 0x2a, 0);
        write(&mut a, 0x0b, 0x72, SEC / 2);
        write(&mut a, 0x01, 0xc0, SEC / 2);
        write(&mut a, 0x50, 0x77, SEC / 2);
        a.poll_irq8(SEC);
        let saved = a.state();
        let mut b = Rtc::new(0);
        b.restore(&saved).unwrap();
        assert_eq!(a, b);
        let mut now = SEC;
        for i in 0..200u64 {
            now += 7_654_321;
            for rtc in [&mut a, &mut b] {
                rtc.pio_write(0x70, (i % 14) as u8, now);
            }
            assert_eq!(a.pio_read(0x71, now), b.pio_read(0x71, now));
            assert_eq!(a.poll_irq8(now), b.poll_irq8(now));
            assert_eq!(a.next_irq8_ns(now), b.next_irq8_ns(now));
        }
        assert_eq!(a.state(), b.state());
    }
}
