//! COM1: a 16550A UART built on `vm_superio::Serial`.
//!
//! vm-superio keeps the registers (divisor latch, IER, LCR, MCR, LSR, MSR, scratch), the
//! 64-byte receive FIFO, loopback and the transmit path. This wrapper adds what a PC UART has
//! and vm-superio does not model the way drivers expect:
//!
//! - The interrupt identification register is computed here, by priority, from the enabled
//!   sources: received data available (IER bit 0, while the receive FIFO holds data) before
//!   transmitter holding register empty (IER bit 1). vm-superio ORs the two (0xc6 would look
//!   like a line status interrupt) and forgets a pending receive interrupt when IIR or one
//!   byte of several is read.
//! - The THRE interrupt follows the 16550 (and QEMU): it becomes pending when a byte is
//!   written to THR (the transmitter is infinitely fast, so THR is empty again at once) and
//!   when IER's THRE enable goes from 0 to 1; reading IIR while it is the identified source
//!   clears it; disabling it in IER clears it. This is what Linux's 8250 driver relies on,
//!   including its start-up test that THRE is re-asserted after IER is rewritten.
//! - The interrupt output is a level (IIR bit 0 clear), as on the chip; [`Uart::take_irq`]
//!   reports its rising edges, for the VMM to pulse IRQ 4 on the edge-triggered PIC. MCR OUT2
//!   does not gate it (as in QEMU and vm-superio).
//!
//! Not modelled: line status and modem status interrupts (no line errors or modem line
//! changes ever happen), the receive FIFO trigger level and character timeout (data raises
//! the receive interrupt as soon as one byte is there), FIFO control (the FIFO is always on and
//! IIR bits 7-6 always read 11, as vm-superio does).

use std::convert::Infallible;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::persist::{Persist, RestoreError};

const DATA: u8 = 0;
const IER: u8 = 1;
const IIR: u8 = 2;
const LCR: u8 = 3;

const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_FIFO: u8 = 0xc0;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;
/// The receive FIFO size of vm-superio (and the most a saved state may hold).
const FIFO_SIZE: usize = 64;

/// vm-superio's interrupt callback. The interrupt output is computed by [`Uart`] from the
/// registers instead, so this does nothing.
#[derive(Debug, Default, Clone, Copy)]
struct NoTrigger;

impl Trigger for NoTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// The saved state of the UART: vm-superio's `SerialState` fields plus this wrapper's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// vm-superio's interrupt identification bookkeeping (not what the guest reads; kept so
    /// the vm-superio state round-trips).
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// The receive FIFO, oldest byte first.
    pub in_buffer: Vec<u8>,
    /// A THRE interrupt is pending.
    pub thr_interrupt_pending: bool,
    /// The interrupt output's level after the last access.
    pub irq_line: bool,
    /// The interrupt output rose since the last `take_irq`.
    pub irq_edge: bool,
    /// Transmitted bytes not yet taken by `take_output`.
    pub output: Vec<u8>,
}

/// The COM1 16550A UART.
#[derive(Debug)]
pub struct Uart {
    serial: Serial<NoTrigger, NoEvents, Vec<u8>>,
    thr_interrupt_pending: bool,
    irq_line: bool,
    irq_edge: bool,
}

impl Default for Uart {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart {
    /// A UART at power-on: 9600 baud 8N1, no interrupts enabled, OUT2 set, FIFOs empty.
    pub fn new() -> Self {
        Uart {
            serial: Serial::new(NoTrigger, Vec::new()),
            thr_interrupt_pending: false,
            irq_line: false,
            irq_edge: false,
        }
    }

    fn dlab(&mut self) -> bool {
        self.serial.read(LCR) & LCR_DLAB != 0
    }

    /// Whether the guest has enabled the received-data interrupt (IER bit 0): its driver is
    /// ready for input.
    pub fn rx_interrupt_enabled(&self) -> bool {
        self.ier() & IER_RDA != 0
    }

    fn ier(&self) -> u8 {
        // No register read without side effects gives IER when DLAB is set; the state has it.
        self.serial.state().interrupt_enable
    }

    fn rx_pending(&self) -> bool {
        self.serial.fifo_capacity() < FIFO_SIZE
    }

    /// The interrupt identification the guest reads (without the FIFO bits).
    fn iir(&self) -> u8 {
        let ier = self.ier();
        if ier & IER_RDA != 0 && self.rx_pending() {
            IIR_RDA
        } else if ier & IER_THRE != 0 && self.thr_interrupt_pending {
            IIR_THRE
        } else {
            IIR_NONE
        }
    }

    /// Recomputes the interrupt output, noting a rising edge.
    fn update_irq(&mut self) {
        let level = self.iir() != IIR_NONE;
        if level && !self.irq_line {
            self.irq_edge = true;
        }
        self.irq_line = level;
    }

    /// A read of register `offset` (0..=7) from 0x3f8.
    pub fn pio_read(&mut self, offset: u8) -> u8 {
        if offset > 7 {
            tracing::warn!("UART: read at offset {offset}, beyond the 8 registers");
            return 0xff;
        }
        let value = if offset == IIR {
            let iir = self.iir();
            if iir == IIR_THRE {
                self.thr_interrupt_pending = false;
            }
            iir | IIR_FIFO
        } else {
            self.serial.read(offset)
        };
        self.update_irq();
        value
    }

    /// A write of `val` to register `offset` (0..=7) from 0x3f8.
    pub fn pio_write(&mut self, offset: u8, val: u8) {
        if offset > 7 {
            tracing::warn!("UART: write {val:#04x} at offset {offset}, beyond the 8 registers");
            return;
        }
        let dlab = self.dlab();
        let old_ier = self.ier();
        // Infallible: the trigger cannot fail and writing to a Vec cannot fail.
        if let Err(e) = self.serial.write(offset, val) {
            tracing::warn!("UART: write {val:#04x} at offset {offset} failed: {e:?}");
        }
        match offset {
            DATA if !dlab => self.thr_interrupt_pending = true,
            IER if !dlab => {
                let new_ier = self.ier();
                if (old_ier ^ new_ier) & IER_THRE != 0 {
                    self.thr_interrupt_pending = new_ier & IER_THRE != 0;
                }
            }
            _ => {}
        }
        self.update_irq();
    }

    /// Bytes the guest transmitted since the last call (the VMM routes them to the world).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(self.serial.writer_mut())
    }

    /// How many more received bytes the RX FIFO can take now (0 in loopback mode, where the
    /// receiver listens to the transmitter only).
    pub fn rx_room(&self) -> usize {
        if self.serial.state().modem_control & MCR_LOOP != 0 {
            0
        } else {
            self.serial.fifo_capacity()
        }
    }

    /// Queue received bytes; returns how many were accepted (never more than `rx_room()`).
    pub fn enqueue_rx(&mut self, bytes: &[u8]) -> usize {
        let room = self.rx_room();
        if bytes.is_empty() || room == 0 {
            return 0;
        }
        let n = bytes.len().min(room);
        let accepted = match self.serial.enqueue_raw_bytes(&bytes[..n]) {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("UART: receiving {n} bytes failed: {e:?}");
                0
            }
        };
        self.update_irq();
        accepted
    }

    /// True if the UART raised its interrupt since the last call (VMM pulses IRQ4).
    pub fn take_irq(&mut self) -> bool {
        std::mem::take(&mut self.irq_edge)
    }

    /// Whether the interrupt output is asserted now (a level; informational).
    pub fn irq_line(&self) -> bool {
        self.irq_line
    }
}

impl Persist for Uart {
    type State = UartState;

    /// The complete state.
    fn state(&self) -> UartState {
        let s = self.serial.state();
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            thr_interrupt_pending: self.thr_interrupt_pending,
            irq_line: self.irq_line,
            irq_edge: self.irq_edge,
            output: self.serial.writer().clone(),
        }
    }

    /// Puts the UART in exactly the saved state `s` (a receive FIFO longer than 64 bytes is cut).
    fn restore(&mut self, s: &UartState) -> Result<(), RestoreError> {
        let mut in_buffer = s.in_buffer.clone();
        if in_buffer.len() > FIFO_SIZE {
            tracing::warn!(
                "UART state holds {} received bytes, more than the FIFO's {FIFO_SIZE}",
                in_buffer.len()
            );
            in_buffer.truncate(FIFO_SIZE);
        }
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer,
        };
        let serial = match Serial::from_state(&state, NoTrigger, NoEvents, s.output.clone()) {
            Ok(serial) => serial,
            Err(e) => {
                // Unreachable: the FIFO was cut to size and the trigger cannot fail.
                tracing::warn!("UART state rejected by vm-superio ({e:?}); using power-on state");
                Serial::new(NoTrigger, s.output.clone())
            }
        };
        *self = Uart {
            serial,
            thr_interrupt_pending: s.thr_interrupt_pending,
            irq_line: s.irq_line,
            irq_edge: s.irq_edge,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RBR: u8 = 0;
    const MCR_OFFSET: u8 = 4;
    const LSR: u8 = 5;
    const MSR: u8 = 6;
    const SCR: u8 = 7;

    #[test]
    fn transmit_and_thre_interrupt() {
        let mut uart = Uart::new();
        assert_eq!(uart.pio_read(IIR), 0xc1, "no interrupt, FIFO bits");
        assert_eq!(uart.pio_read(LSR) & 0x60, 0x60, "THRE and TEMT");
        uart.pio_write(DATA, b'h');
        uart.pio_write(DATA, b'i');
        assert_eq!(uart.take_output(), b"hi");
        assert!(uart.take_output().is_empty());
        assert!(!uart.take_irq(), "THRE interrupt not enabled");
        // Enabling THRE interrupts raises one at once: THR is empty.
        uart.pio_write(IER, IER_THRE);
        assert!(uart.take_irq());
        assert!(!uart.take_irq());
        assert_eq!(uart.pio_read(IIR), 0xc2);
        assert_eq!(uart.pio_read(IIR), 0xc1, "reading IIR acknowledged THRE");
        uart.pio_write(DATA, b'!');
        assert!(uart.take_irq(), "THR empty again");
        assert_eq!(uart.pio_read(IIR), 0xc2);
    }

    #[test]
    fn linux_thre_retest_passes() {
        // serial8250_do_startup's UART_BUG_THRE test.
        let mut uart = Uart::new();
        uart.pio_write(IER, IER_THRE);
        let iir1 = uart.pio_read(IIR);
        uart.pio_write(IER, 0);
        uart.pio_write(IER, IER_THRE);
        let iir = uart.pio_read(IIR);
        uart.pio_write(IER, 0);
        assert_eq!(iir1 & IIR_NONE, 0);
        assert_eq!(iir & IIR_NONE, 0, "THRE re-asserted: no UART_BUG_THRE");
    }

    #[test]
    fn receive_and_rda_interrupt() {
        let mut uart = Uart::new();
        assert_eq!(uart.enqueue_rx(b"abc"), 3);
        assert!(!uart.take_irq(), "not enabled");
        assert_eq!(uart.pio_read(LSR) & 0x01, 0x01, "data ready");
        uart.pio_write(IER, IER_RDA);
        assert!(uart.take_irq(), "enabling with data pending interrupts");
        assert_eq!(uart.pio_read(IIR), 0xc4);
        assert_eq!(uart.pio_read(IIR), 0xc4, "RDA stays while data is there");
        assert_eq!(uart.pio_read(RBR), b'a');
        assert_eq!(uart.pio_read(IIR), 0xc4);
        assert!(!uart.take_irq(), "the line never dropped");
        assert_eq!(uart.pio_read(RBR), b'b');
        assert_eq!(uart.pio_read(RBR), b'c');
        assert_eq!(uart.pio_read(IIR), 0xc1);
        assert_eq!(uart.pio_read(LSR) & 0x01, 0);
        assert_eq!(uart.pio_read(RBR), 0, "empty FIFO reads 0");
        assert_eq!(uart.enqueue_rx(b"d"), 1);
        assert!(uart.take_irq(), "new data, new edge");
    }

    #[test]
    fn rda_has_priority_over_thre() {
        let mut uart = Uart::new();
        uart.pio_write(IER, IER_RDA | IER_THRE);
        uart.enqueue_rx(b"x");
        assert_eq!(uart.pio_read(IIR), 0xc4);
        assert_eq!(uart.pio_read(RBR), b'x');
        assert_eq!(uart.pio_read(IIR), 0xc2, "THRE was still pending");
        assert_eq!(uart.pio_read(IIR), 0xc1);
    }

    #[test]
    fn disabling_in_ier_drops_the_line() {
        let mut uart = Uart::new();
        uart.pio_write(IER, IER_THRE);
        assert!(uart.irq_line());
        uart.pio_write(IER, 0);
        assert!(!uart.irq_line());
        assert_eq!(uart.pio_read(IIR), 0xc1);
        uart.enqueue_rx(b"z");
        uart.take_irq();
        uart.pio_write(IER, IER_RDA);
        assert!(uart.take_irq());
    }

    #[test]
    fn fifo_fills_and_drains() {
        let mut uart = Uart::new();
        assert_eq!(uart.rx_room(), 64);
        let data: Vec<u8> = (0..100).collect();
        assert_eq!(uart.enqueue_rx(&data), 64);
        assert_eq!(uart.rx_room(), 0);
        assert_eq!(uart.enqueue_rx(b"more"), 0);
        assert_eq!(uart.enqueue_rx(b""), 0);
        for expected in 0..64u8 {
            assert_eq!(uart.pio_read(LSR) & 1, 1);
            assert_eq!(uart.pio_read(RBR), expected);
        }
        assert_eq!(uart.pio_read(LSR) & 1, 0);
        assert_eq!(uart.rx_room(), 64);
    }

    #[test]
    fn divisor_latch_and_scratch() {
        let mut uart = Uart::new();
        uart.pio_write(LCR, 0x80);
        uart.pio_write(0, 0x01);
        uart.pio_write(1, 0x00);
        assert_eq!(uart.pio_read(0), 0x01);
        assert_eq!(uart.pio_read(1), 0x00);
        assert!(uart.take_output().is_empty(), "DLL write is not a transmit");
        assert!(!uart.take_irq());
        uart.pio_write(LCR, 0x03);
        assert_eq!(uart.pio_read(LCR), 0x03);
        uart.pio_write(IER, 0x0f);
        assert_eq!(uart.pio_read(IER), 0x0f);
        uart.pio_write(IER, 0xff);
        assert_eq!(uart.pio_read(IER), 0x0f, "only the 16550 bits");
        uart.pio_write(SCR, 0x5a);
        assert_eq!(uart.pio_read(SCR), 0x5a);
        uart.pio_write(LCR, 0x83);
        assert_eq!(uart.pio_read(0), 0x01, "divisor kept");
        assert_eq!(uart.pio_read(IIR), 0xc2, "IIR readable with DLAB set");
    }

    #[test]
    fn loopback() {
        let mut uart = Uart::new();
        uart.pio_write(MCR_OFFSET, 0x10 | 0x0a); // loop, RTS, OUT2 (Linux's probe)
        assert_eq!(uart.pio_read(MSR) & 0xf0, 0x90);
        assert_eq!(uart.rx_room(), 0);
        assert_eq!(uart.enqueue_rx(b"ignored"), 0);
        uart.pio_write(DATA, 0x42);
        assert!(uart.take_output().is_empty());
        assert_eq!(uart.pio_read(LSR) & 1, 1);
        assert_eq!(uart.pio_read(RBR), 0x42);
        uart.pio_write(MCR_OFFSET, 0x0b);
        assert_eq!(uart.rx_room(), 64);
    }

    #[test]
    fn garbage_never_panics() {
        let mut uart = Uart::new();
        for offset in 0..=255u8 {
            for val in [0u8, 0x80, 0xff, 0x13] {
                uart.pio_write(offset, val);
                uart.pio_read(offset);
                uart.enqueue_rx(&[val; 70]);
            }
        }
    }

    #[test]
    fn restored_uart_behaves_identically() {
        let mut a = Uart::new();
        a.pio_write(LCR, 0x83);
        a.pio_write(0, 0x03);
        a.pio_write(LCR, 0x03);
        a.pio_write(IER, IER_RDA | IER_THRE);
        a.enqueue_rx(b"hello");
        a.pio_write(DATA, b'o');
        a.pio_read(RBR);
        let saved = a.state();
        let mut b = Uart::new();
        b.restore(&saved).unwrap();
        assert_eq!(b.state(), saved);
        for uart in [&mut a, &mut b] {
            assert_eq!(uart.take_output(), b"o");
            assert!(uart.take_irq());
            assert_eq!(uart.pio_read(IIR), 0xc4);
            assert_eq!(uart.pio_read(RBR), b'e');
            uart.enqueue_rx(b"!");
        }
        for offset in 0..8 {
            assert_eq!(a.pio_read(offset), b.pio_read(offset));
        }
        assert_eq!(a.state(), b.state());
    }
}
