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

    /// The complete state.
    pub fn state(&self) -> UartState {
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

    /// A UART in exactly the saved state `s` (a receive FIFO longer than 64 bytes is cut).
    pub fn from_state(s: &UartState) -> Self {
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
        Uart {
            serial,
            thr_interrupt_pending: s.thr_interrupt_pending,
            irq_line: s.irq_line,
            irq_edge: s.irq_edge,
        }
    }
}
