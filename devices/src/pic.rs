//! The 8259A programmable interrupt controller pair, in the classic PC wiring: the master at
//! ports 0x20-0x21, the slave at 0xa0-0xa1 with its INT output on the master's IR2.
//!
//! Modelled: the ICW1-ICW4 initialisation sequence, OCW1 (interrupt mask), OCW2 (non-specific
//! and specific EOI, rotation, set priority), OCW3 (IRR/ISR read select, poll mode, special
//! mask mode), automatic EOI (with rotation), fully nested priority with a rotating priority
//! base, special fully nested mode, and the spurious IRQ 7 / IRQ 15 vectors.
//!
//! All inputs are edge-triggered, as the PC's ELCR (ports 0x4d0-0x4d1) says: it reads 0 and
//! ignores writes. A rising edge on an input sets its IRR bit, which stays set until the
//! interrupt is acknowledged or the chip is re-initialised (the way QEMU models it). After ICW1
//! an input that is already high must go low and high again to request an interrupt, as the
//! datasheet says. The slave's INT output drives the master's IR2 through the same edge logic.

use serde::{Deserialize, Serialize};

use crate::persist::{Persist, RestoreError};

/// Master command port (ICW1, OCW2, OCW3; reads IRR, ISR or the poll word).
const MASTER_CMD: u16 = 0x20;
/// Master data port (ICW2-4, OCW1; reads IMR).
const MASTER_DATA: u16 = 0x21;
/// Slave command port.
const SLAVE_CMD: u16 = 0xa0;
/// Slave data port.
const SLAVE_DATA: u16 = 0xa1;
/// Edge/level control register for IRQ 0-7 (PIIX): reads 0, all edge-triggered.
const ELCR_MASTER: u16 = 0x4d0;
/// Edge/level control register for IRQ 8-15.
const ELCR_SLAVE: u16 = 0x4d1;
/// The master input the slave is wired to.
const CASCADE_IRQ: u8 = 2;

/// Where a chip is in its initialisation sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitStep {
    /// Initialised: data port writes are OCW1 (the mask).
    #[default]
    Ready,
    /// ICW1 written, the next data write is ICW2 (vector base).
    Icw2,
    /// The next data write is ICW3 (cascade wiring; ignored, the wiring is fixed).
    Icw3,
    /// The next data write is ICW4 (mode: AEOI, special fully nested).
    Icw4,
}

/// The complete state of one 8259A chip. It is also the chip's working representation, so a
/// saved state restores the chip exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicChipState {
    /// Current level of the eight input lines (for edge detection).
    pub lines: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// The input with the highest priority is `priority_add` (rotation moves it).
    pub priority_add: u8,
    /// Vector base from ICW2 (low three bits clear).
    pub irq_base: u8,
    /// OCW3 read register select: command port reads ISR (true) or IRR (false).
    pub read_isr: bool,
    /// OCW3 poll command issued: the next read returns the poll word.
    pub poll: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// Where the chip is in its initialisation sequence.
    pub init_step: InitStep,
    /// ICW1 announced an ICW4.
    pub init4: bool,
    /// ICW1 single mode (no ICW3).
    pub single: bool,
    /// ICW4 automatic end of interrupt.
    pub auto_eoi: bool,
    /// OCW2 rotate in automatic EOI mode.
    pub rotate_on_auto_eoi: bool,
    /// ICW4 special fully nested mode.
    pub special_fully_nested: bool,
}

/// The saved state of the PIC pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// The master (IRQ 0-7).
    pub master: PicChipState,
    /// The slave (IRQ 8-15).
    pub slave: PicChipState,
}

impl PicChipState {
    /// The priority (0 = highest) of the highest-priority bit in `mask`, 8 if none.
    fn priority(&self, mask: u8) -> u8 {
        (0..8)
            .find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The input the chip requests service for (its INT output), if any.
    fn requested_irq(&self, is_master: bool) -> Option<u8> {
        let pending = self.irr & !self.imr;
        let priority = self.priority(pending);
        if priority == 8 {
            return None;
        }
        // In special mask mode, masked in-service levels do not inhibit lower ones. In special
        // fully nested mode, the master lets the slave interrupt its own in-service request.
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && is_master {
            in_service &= !(1 << CASCADE_IRQ);
        }
        if priority < self.priority(in_service) {
            Some((priority + self.priority_add) & 7)
        } else {
            None
        }
    }

    /// Drives input `irq` (0-7) to `level`; a rising edge sets IRR.
    fn set_line(&mut self, irq: u8, level: bool) {
        let mask = 1 << irq;
        if level {
            if self.lines & mask == 0 {
                self.irr |= mask;
            }
            self.lines |= mask;
        } else {
            self.lines &= !mask;
        }
    }

    /// The acknowledge of input `irq`: IRR to ISR (or AEOI).
    fn intack(&mut self, irq: u8) {
        let mask = 1 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= mask;
        }
        self.irr &= !mask;
    }

    /// ICW1: everything but the input lines returns to its initial value.
    fn init_reset(&mut self) {
        *self = PicChipState {
            lines: self.lines,
            ..PicChipState::default()
        };
    }

    fn write_command(&mut self, val: u8, name: &str) {
        if val & 0x10 != 0 {
            // ICW1.
            self.init_reset();
            self.init_step = InitStep::Icw2;
            self.init4 = val & 0x01 != 0;
            self.single = val & 0x02 != 0;
            if val & 0x08 != 0 {
                tracing::warn!(
                    "{name} PIC: ICW1 asks for level-triggered inputs ({val:#04x}); \
                     this platform's inputs are all edge-triggered"
                );
            }
        } else if val & 0x08 != 0 {
            // OCW3.
            if val & 0x04 != 0 {
                self.poll = true;
            }
            if val & 0x02 != 0 {
                self.read_isr = val & 0x01 != 0;
            }
            if val & 0x40 != 0 {
                self.special_mask = val & 0x20 != 0;
            }
        } else {
            // OCW2.
            let cmd = val >> 5;
            let level = val & 7;
            match cmd {
                // Clear / set rotate in automatic EOI mode.
                0 | 4 => self.rotate_on_auto_eoi = cmd == 4,
                // Non-specific EOI, optionally rotating.
                1 | 5 => {
                    let priority = self.priority(self.isr);
                    if priority != 8 {
                        let irq = (priority + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if cmd == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                // Specific EOI.
                3 => self.isr &= !(1 << level),
                // Set priority: `level` becomes the lowest.
                6 => self.priority_add = (level + 1) & 7,
                // Rotate on specific EOI.
                7 => {
                    self.isr &= !(1 << level);
                    self.priority_add = (level + 1) & 7;
                }
                // 2: no operation.
                _ => {}
            }
        }
    }

    fn write_data(&mut self, val: u8) {
        match self.init_step {
            InitStep::Ready => self.imr = val,
            InitStep::Icw2 => {
                self.irq_base = val & 0xf8;
                self.init_step = match (self.single, self.init4) {
                    (false, _) => InitStep::Icw3,
                    (true, true) => InitStep::Icw4,
                    (true, false) => InitStep::Ready,
                };
            }
            InitStep::Icw3 => {
                self.init_step = if self.init4 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw4 => {
                self.special_fully_nested = val & 0x10 != 0;
                self.auto_eoi = val & 0x02 != 0;
                self.init_step = InitStep::Ready;
            }
        }
    }

    /// A read in poll mode: acknowledges the highest request, bit 7 = a request was pending.
    fn poll_read(&mut self, is_master: bool) -> u8 {
        match self.requested_irq(is_master) {
            Some(irq) => {
                self.intack(irq);
                0x80 | irq
            }
            None => 0,
        }
    }

    fn read(&mut self, command_port: bool, is_master: bool) -> u8 {
        if self.poll {
            self.poll = false;
            return self.poll_read(is_master);
        }
        if !command_port {
            self.imr
        } else if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// The 8259A master/slave pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pic {
    master: PicChipState,
    slave: PicChipState,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A pair as a PC's firmware leaves it (docs/PLATFORM.md): initialised (ICW1-ICW4: edge
    /// triggered, cascaded, 8086 mode, normal EOI) with the master's vectors at 0x08 and the
    /// slave's at 0x70, every input masked but the cascade (IRQ 2), nothing pending or in
    /// service. Guests usually initialise it again before enabling interrupts; one that does
    /// not gets nothing until it unmasks an input.
    pub fn new() -> Self {
        let mut pic = Pic {
            master: PicChipState::default(),
            slave: PicChipState::default(),
        };
        for (cmd, data, base, wiring, mask) in [
            (
                MASTER_CMD,
                MASTER_DATA,
                0x08,
                1 << CASCADE_IRQ,
                !(1u8 << CASCADE_IRQ),
            ),
            (SLAVE_CMD, SLAVE_DATA, 0x70, CASCADE_IRQ, 0xff),
        ] {
            pic.pio_write(cmd, 0x11);
            pic.pio_write(data, base);
            pic.pio_write(data, wiring);
            pic.pio_write(data, 0x01);
            pic.pio_write(data, mask);
        }
        pic
    }

    /// Whether IRQ line `irq` (0..=15) is masked, on its chip or (8..=15) at the cascade: a
    /// request on it cannot reach the CPU until the guest unmasks it.
    pub fn masked(&self, irq: u8) -> bool {
        match irq {
            0..=7 => self.master.imr & (1 << irq) != 0,
            8..=15 => {
                self.slave.imr & (1 << (irq - 8)) != 0 || self.master.imr & (1 << CASCADE_IRQ) != 0
            }
            _ => true,
        }
    }

    /// Propagates the slave's INT output to the master's IR2.
    fn cascade(&mut self) {
        let slave_int = self.slave.requested_irq(false).is_some();
        self.master.set_line(CASCADE_IRQ, slave_int);
    }

    /// Drive IRQ line `irq` (0..=15) to `level`. All lines edge-triggered (ELCR = 0): a rising
    /// edge sets IRR. IRQ 2 is the cascade input, driven by the slave only: driving it from
    /// outside is ignored, as are lines above 15.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            CASCADE_IRQ => {
                tracing::warn!("PIC: IRQ 2 is the cascade input; set_irq(2) ignored");
            }
            0..=7 => self.master.set_line(irq, level),
            8..=15 => self.slave.set_line(irq - 8, level),
            _ => tracing::warn!("PIC: no IRQ line {irq}; set_irq ignored"),
        }
        self.cascade();
    }

    /// Whether IRQ 0's edge waits in the master's IRR (not yet acknowledged).
    pub fn irq0_requested(&self) -> bool {
        self.master.irr & 1 != 0
    }

    /// The vector of IRQ 0 (the master's base, as the guest programmed it).
    pub fn irq0_vector(&self) -> u8 {
        self.master.irq_base
    }

    /// True when the master's INTR output is asserted (an unmasked request with priority above
    /// in-service).
    pub fn intr(&self) -> bool {
        self.master.requested_irq(true).is_some()
    }

    /// The INTA cycle: returns the vector to inject and moves the request from IRR to ISR (or
    /// ends it at once in AEOI mode). `None` if `!intr()`.
    ///
    /// When the master's request is the cascade (IRQ 2) but the slave no longer requests
    /// anything, the vector is the slave's spurious IRQ 15 (slave base + 7), with IRQ 2 in
    /// service on the master, as the hardware does. (The master's own spurious IRQ 7 cannot
    /// happen through this interface: the VMM asks at the moment it injects.)
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.master.requested_irq(true)?;
        let vector = if irq == CASCADE_IRQ {
            match self.slave.requested_irq(false) {
                Some(irq2) => {
                    self.slave.intack(irq2);
                    self.slave.irq_base.wrapping_add(irq2)
                }
                None => self.slave.irq_base.wrapping_add(7),
            }
        } else {
            self.master.irq_base.wrapping_add(irq)
        };
        self.master.intack(irq);
        self.cascade();
        Some(vector)
    }

    /// A read from port 0x20, 0x21, 0xa0 or 0xa1 (IRR, ISR, IMR or the poll word) or the ELCR
    /// at 0x4d0-0x4d1 (always 0). Other ports read 0xff.
    pub fn pio_read(&mut self, port: u16) -> u8 {
        let value = match port {
            MASTER_CMD | MASTER_DATA => self.master.read(port == MASTER_CMD, true),
            SLAVE_CMD | SLAVE_DATA => self.slave.read(port == SLAVE_CMD, false),
            ELCR_MASTER | ELCR_SLAVE => 0,
            _ => {
                tracing::warn!("PIC: read from port {port:#x}, which is not a PIC port");
                0xff
            }
        };
        self.cascade();
        value
    }

    /// A write to port 0x20, 0x21, 0xa0 or 0xa1 (ICWs and OCWs). ELCR writes and other ports
    /// are ignored.
    pub fn pio_write(&mut self, port: u16, val: u8) {
        match port {
            MASTER_CMD => self.master.write_command(val, "master"),
            MASTER_DATA => self.master.write_data(val),
            SLAVE_CMD => self.slave.write_command(val, "slave"),
            SLAVE_DATA => self.slave.write_data(val),
            ELCR_MASTER | ELCR_SLAVE => {}
            _ => tracing::warn!("PIC: write {val:#04x} to port {port:#x}, which is not a PIC port"),
        }
        self.cascade();
    }
}

impl Persist for Pic {
    type State = PicState;

    /// The complete state of the pair.
    fn state(&self) -> PicState {
        PicState {
            master: self.master,
            slave: self.slave,
        }
    }

    /// Puts the pair in exactly the saved state `s`.
    fn restore(&mut self, s: &PicState) -> Result<(), RestoreError> {
        *self = Pic {
            master: s.master,
            slave: s.slave,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's init_8259A(0): master at 0x30, slave at 0x38.
    fn linux_init(pic: &mut Pic) {
        pic.pio_write(0x21, 0xff);
        pic.pio_write(0x20, 0x11);
        pic.pio_write(0x21, 0x30);
        pic.pio_write(0x21, 0x04);
        pic.pio_write(0x21, 0x01);
        pic.pio_write(0xa0, 0x11);
        pic.pio_write(0xa1, 0x38);
        pic.pio_write(0xa1, 0x02);
        pic.pio_write(0xa1, 0x01);
        pic.pio_write(0x21, 0x00);
        pic.pio_write(0xa1, 0x00);
    }

    fn pulse(pic: &mut Pic, irq: u8) {
        pic.set_irq(irq, true);
        pic.set_irq(irq, false);
    }

    fn read_isr(pic: &mut Pic, cmd: u16) -> u8 {
        pic.pio_write(cmd, 0x0b);
        let v = pic.pio_read(cmd);
        pic.pio_write(cmd, 0x0a);
        v
    }

    #[test]
    fn power_on_is_the_firmware_state() {
        let mut pic = Pic::new();
        assert_eq!(pic.pio_read(0x21), 0xfb, "all masked but the cascade");
        assert_eq!(pic.pio_read(0xa1), 0xff);
        assert!(pic.masked(0) && pic.masked(8) && !pic.masked(2));
        // A request on a masked line waits in IRR; unmasked, it arrives on the BIOS vector.
        pulse(&mut pic, 0);
        assert!(!pic.intr());
        pic.pio_write(0x21, 0xfa);
        assert_eq!(pic.acknowledge(), Some(0x08));
        pic.pio_write(0x20, 0x20);
        pic.pio_write(0xa1, 0xfe);
        pulse(&mut pic, 8);
        assert_eq!(pic.acknowledge(), Some(0x70));
        // Linux's init_8259A reprograms it as if it were fresh.
        linux_init(&mut pic);
        pulse(&mut pic, 0);
        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn power_on_is_quiet() {
        let mut pic = Pic::new();
        assert!(!pic.intr());
        assert_eq!(pic.acknowledge(), None);
        assert_eq!(pic.pio_read(0x4d0), 0);
        assert_eq!(pic.pio_read(0x4d1), 0);
    }

    #[test]
    fn linux_probe_reads_back_mask() {
        let mut pic = Pic::new();
        pic.pio_write(0xa1, 0xff);
        pic.pio_write(0x21, 0xff);
        assert_eq!(pic.pio_read(0x21), 0xff);
        pic.pio_write(0x21, 0xfb);
        assert_eq!(pic.pio_read(0x21), 0xfb);
    }

    #[test]
    fn master_irq_and_eoi() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pulse(&mut pic, 0);
        assert!(pic.intr());
        assert_eq!(pic.pio_read(0x20), 0x01, "IRR shows the request");
        assert_eq!(pic.acknowledge(), Some(0x30));
        assert!(!pic.intr());
        assert_eq!(read_isr(&mut pic, 0x20), 0x01);
        // A second edge while in service: pending, but not delivered until EOI.
        pulse(&mut pic, 0);
        assert!(!pic.intr());
        pic.pio_write(0x20, 0x60); // specific EOI IRQ0
        assert!(pic.intr());
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.pio_write(0x20, 0x20); // non-specific EOI
        assert_eq!(read_isr(&mut pic, 0x20), 0);
        assert!(!pic.intr());
    }

    #[test]
    fn level_held_high_is_one_request() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), Some(0x35));
        pic.pio_write(0x20, 0x20);
        pic.set_irq(5, true); // still high: no new edge
        assert!(!pic.intr());
        pic.set_irq(5, false);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), Some(0x35));
    }

    #[test]
    fn priority_and_nesting() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pulse(&mut pic, 4);
        pulse(&mut pic, 1);
        assert_eq!(pic.acknowledge(), Some(0x31), "IRQ1 beats IRQ4");
        // IRQ4 has lower priority than in-service IRQ1.
        assert!(!pic.intr());
        // IRQ0 has higher priority: nests.
        pulse(&mut pic, 0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.pio_write(0x20, 0x20); // EOI ends IRQ0 (highest in service)
        assert_eq!(read_isr(&mut pic, 0x20), 0x02);
        pic.pio_write(0x20, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn masked_request_waits() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pic.pio_write(0x21, 0x08);
        pulse(&mut pic, 3);
        assert!(!pic.intr());
        pic.pio_write(0x21, 0x00);
        assert_eq!(pic.acknowledge(), Some(0x33));
    }

    #[test]
    fn slave_through_cascade() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pulse(&mut pic, 8);
        assert!(pic.intr());
        assert_eq!(pic.pio_read(0x20) & 0x04, 0x04, "master IRR2 set");
        assert_eq!(pic.acknowledge(), Some(0x38));
        assert_eq!(read_isr(&mut pic, 0x20), 0x04);
        assert_eq!(read_isr(&mut pic, 0xa0), 0x01);
        // IRQ 12 while IRQ 8 in service on the slave: lower priority, waits.
        pulse(&mut pic, 12);
        assert!(!pic.intr());
        pic.pio_write(0xa0, 0x60); // slave specific EOI 0
        pic.pio_write(0x20, 0x62); // master specific EOI 2
        assert!(pic.intr());
        assert_eq!(pic.acknowledge(), Some(0x3c));
    }

    #[test]
    fn two_slave_requests_both_delivered() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pulse(&mut pic, 14);
        pulse(&mut pic, 9);
        assert_eq!(pic.acknowledge(), Some(0x39));
        pic.pio_write(0xa0, 0x20);
        pic.pio_write(0x20, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x3e));
        pic.pio_write(0xa0, 0x20);
        pic.pio_write(0x20, 0x20);
        assert!(!pic.intr());
    }

    #[test]
    fn spurious_slave_irq15() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pulse(&mut pic, 10);
        // The guest masks IRQ10 at the slave after the master latched IR2.
        pic.pio_write(0xa1, 0x04);
        assert!(pic.intr());
        assert_eq!(pic.acknowledge(), Some(0x3f), "slave base + 7");
        assert_eq!(
            read_isr(&mut pic, 0xa0),
            0,
            "nothing in service on the slave"
        );
        assert_eq!(
            read_isr(&mut pic, 0x20),
            0x04,
            "IR2 in service on the master"
        );
    }

    #[test]
    fn auto_eoi() {
        let mut pic = Pic::new();
        pic.pio_write(0x20, 0x11);
        pic.pio_write(0x21, 0x20);
        pic.pio_write(0x21, 0x04);
        pic.pio_write(0x21, 0x03); // 8086 mode, AEOI
        pulse(&mut pic, 1);
        assert_eq!(pic.acknowledge(), Some(0x21));
        assert_eq!(read_isr(&mut pic, 0x20), 0);
        pulse(&mut pic, 3);
        assert_eq!(pic.acknowledge(), Some(0x23), "no EOI needed");
    }

    #[test]
    fn rotate_on_auto_eoi() {
        let mut pic = Pic::new();
        pic.pio_write(0x20, 0x11);
        pic.pio_write(0x21, 0x20);
        pic.pio_write(0x21, 0x04);
        pic.pio_write(0x21, 0x03);
        pic.pio_write(0x20, 0x80); // rotate in AEOI set
        pulse(&mut pic, 1);
        assert_eq!(pic.acknowledge(), Some(0x21));
        // IRQ1 is now lowest: IRQ3 beats IRQ1.
        pulse(&mut pic, 1);
        pulse(&mut pic, 3);
        assert_eq!(pic.acknowledge(), Some(0x23));
    }

    #[test]
    fn rotation_and_set_priority() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pulse(&mut pic, 3);
        assert_eq!(pic.acknowledge(), Some(0x33));
        pic.pio_write(0x20, 0xa0); // rotate on non-specific EOI: IRQ3 lowest
        pulse(&mut pic, 3);
        pulse(&mut pic, 5);
        assert_eq!(
            pic.acknowledge(),
            Some(0x35),
            "IRQ4 is now the highest, then 5"
        );
        pic.pio_write(0x20, 0xe5); // rotate on specific EOI 5: IRQ5 lowest, 6 highest
        pulse(&mut pic, 0);
        pulse(&mut pic, 6);
        assert_eq!(pic.acknowledge(), Some(0x36));
        pic.pio_write(0x20, 0x20);
        pic.pio_write(0x20, 0xc7); // set priority: IRQ7 lowest, IRQ0 highest
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.pio_write(0x20, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x33));
    }

    #[test]
    fn poll_mode() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pic.pio_write(0x20, 0x0c); // OCW3 poll
        assert_eq!(pic.pio_read(0x20), 0x00, "nothing pending");
        pulse(&mut pic, 6);
        pic.pio_write(0x20, 0x0c);
        assert_eq!(pic.pio_read(0x21), 0x86);
        assert_eq!(read_isr(&mut pic, 0x20), 0x40, "poll acknowledges");
        // Poll mode is one read only.
        assert_eq!(pic.pio_read(0x21), 0x00, "IMR again");
    }

    #[test]
    fn special_mask_mode() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pulse(&mut pic, 1);
        assert_eq!(pic.acknowledge(), Some(0x31));
        pulse(&mut pic, 5);
        assert!(!pic.intr(), "blocked by IRQ1 in service");
        pic.pio_write(0x21, 0x02); // mask IRQ1
        pic.pio_write(0x20, 0x68); // OCW3: set special mask
        assert!(pic.intr(), "masked in-service level no longer blocks");
        assert_eq!(pic.acknowledge(), Some(0x35));
        pic.pio_write(0x20, 0x48); // reset special mask
        pic.pio_write(0x20, 0x65);
        pic.pio_write(0x20, 0x61);
        assert_eq!(read_isr(&mut pic, 0x20), 0);
    }

    #[test]
    fn special_fully_nested() {
        let mut pic = Pic::new();
        pic.pio_write(0x20, 0x11);
        pic.pio_write(0x21, 0x30);
        pic.pio_write(0x21, 0x04);
        pic.pio_write(0x21, 0x11); // SFNM
        pic.pio_write(0xa0, 0x11);
        pic.pio_write(0xa1, 0x38);
        pic.pio_write(0xa1, 0x02);
        pic.pio_write(0xa1, 0x01);
        pulse(&mut pic, 12);
        assert_eq!(pic.acknowledge(), Some(0x3c));
        pulse(&mut pic, 9); // higher priority on the slave
        assert!(
            pic.intr(),
            "SFNM: the slave may interrupt its own in-service IR2"
        );
        assert_eq!(pic.acknowledge(), Some(0x39));
    }

    #[test]
    fn icw1_clears_requests_and_needs_new_edge() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pic.set_irq(4, true);
        linux_init(&mut pic);
        assert!(!pic.intr());
        pic.set_irq(4, true);
        assert!(!pic.intr(), "line already high: no edge");
        pic.set_irq(4, false);
        pic.set_irq(4, true);
        assert!(pic.intr());
    }

    #[test]
    fn hobby_os_remap_without_icw4() {
        // ICW1 without IC4: ICW4 functions are zero; single mode skips ICW3.
        let mut pic = Pic::new();
        pic.pio_write(0x20, 0x12); // single, no ICW4
        pic.pio_write(0x21, 0x40);
        pic.pio_write(0x21, 0xfe); // OCW1 now
        assert_eq!(pic.pio_read(0x21), 0xfe);
        pulse(&mut pic, 0);
        assert_eq!(pic.acknowledge(), Some(0x40));
    }

    #[test]
    fn garbage_never_panics() {
        let mut pic = Pic::new();
        for port in [0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x22, 0xffff] {
            for val in 0..=255u8 {
                pic.pio_write(port, val);
                pic.pio_read(port);
                pic.set_irq(val, val & 1 != 0);
                let _ = pic.acknowledge();
            }
        }
    }

    #[test]
    fn restored_pic_behaves_identically() {
        let mut a = Pic::new();
        linux_init(&mut a);
        pulse(&mut a, 8);
        pulse(&mut a, 3);
        a.pio_write(0x20, 0x0b);
        let saved = a.state();
        let mut b = Pic::new();
        b.restore(&saved).unwrap();
        assert_eq!(a, b);
        for pic in [&mut a, &mut b] {
            assert_eq!(pic.pio_read(0x20), 0, "ISR selected and empty");
            assert_eq!(pic.acknowledge(), Some(0x38), "IRQ 8 (on IR2) beats IRQ 3");
            assert!(!pic.intr());
            pic.pio_write(0xa0, 0x20);
            pic.pio_write(0x20, 0x20);
            assert_eq!(pic.acknowledge(), Some(0x33));
        }
        assert_eq!(a.acknowledge(), b.acknowledge());
        assert_eq!(a.state(), b.state());
    }
}
