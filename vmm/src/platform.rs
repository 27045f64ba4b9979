//! The platform: every device on its port or address (docs/PLATFORM.md), interrupt routing
//! into the 8259A pair, and the virtual clock.
//!
//! Which port or address goes to which device is one table per bus ([`devices::bus::Bus`]):
//! `PORTS` for I/O ports, the filled virtio slots for MMIO; reads and writes look it up alike.
//!
//! The platform is the only caller of the device models. It asks the boundary for the clock
//! whenever a device needs the time, so devices stay deterministic state machines and every
//! time read is an input the boundary controls.

use crate::memory::GuestMemoryMmap;
use devices::bus::Bus;
use devices::pic::{Pic, PicState};
use devices::pit::{Pit, PitState};
use devices::rtc::{Rtc, RtcState};
use devices::serial::{Uart, UartState};
use devices::virtio::{MmioBlock, MmioBlockState, MmioNet, MmioNetState};
use devices::{Persist, RestoreError};
use ft_core::{Boundary, BoundaryError, Input, OutputKind, WaitRequest};
use serde::{Deserialize, Serialize};

/// COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u8 = 4;
/// The exit port: a byte written here stops the VM with that status.
pub const EXIT_PORT: u16 = 0x501;
/// The keyboard controller's command port (0xfe = reset).
pub const KBD_CMD_PORT: u16 = 0x64;
/// The first virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The virtio-blk interrupt line.
pub const VIRTIO_BLK_IRQ: u8 = 5;
/// The virtio-net interrupt line (its slot is the second, at `VIRTIO_MMIO_BASE + 0x1000`).
pub const VIRTIO_NET_IRQ: u8 = 6;
/// The PIT's interrupt line.
pub const PIT_IRQ: u8 = 0;
/// The RTC's interrupt line.
pub const RTC_IRQ: u8 = 8;

/// A device on the port bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Port {
    Pic,
    Pit,
    Rtc,
    Uart,
    /// The keyboard controller's command port: reads 0; 0xfe resets.
    Kbd,
    /// [`EXIT_PORT`]: write-only (reads as an empty port).
    Exit,
}

/// Every I/O port range and its device (docs/PLATFORM.md), for reads and writes alike. The
/// PIC, PIT and RTC decode the port number itself; the UART gets the offset in its range.
const PORTS: [(u16, u16, Port); 9] = [
    (0x20, 2, Port::Pic),
    (0xa0, 2, Port::Pic),
    (0x4d0, 2, Port::Pic), // ELCR
    (0x40, 4, Port::Pit),
    (0x61, 1, Port::Pit),
    (0x70, 2, Port::Rtc),
    (COM1_BASE, 8, Port::Uart),
    (KBD_CMD_PORT, 1, Port::Kbd),
    (EXIT_PORT, 1, Port::Exit),
];

/// A device on the MMIO bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mmio {
    /// The virtio-blk slot, the first.
    Blk,
    /// The virtio-net slot, the second.
    Net,
}

/// A bus of `ranges`; the platform's own tables have no overlaps (the tests say so).
fn bus<T: Copy + std::fmt::Debug>(ranges: impl IntoIterator<Item = (u64, u64, T)>) -> Bus<T> {
    let mut bus = Bus::default();
    for (base, len, device) in ranges {
        if let Err(e) = bus.insert(base, len, device) {
            tracing::error!("{device:?} left off the bus: {e}");
        }
    }
    bus
}

/// What the vCPU loop does after an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Resume the guest.
    Continue,
    /// Stop the VM: the guest asked to exit with this status.
    Exit(u8),
    /// Stop the VM: the guest asked for a reset.
    Reset,
}

/// The saved state of the whole platform.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlatformState {
    pic: PicState,
    pit: PitState,
    rtc: RtcState,
    uart: UartState,
    blk: Option<MmioBlockState>,
    net: Option<MmioNetState>,
    now_ns: u64,
}

/// All the devices of the VM and the virtual clock.
pub struct Platform {
    pic: Pic,
    pit: Pit,
    rtc: Rtc,
    uart: Uart,
    blk: Option<MmioBlock>,
    net: Option<MmioNet>,
    /// Which port goes to which device.
    pio: Bus<Port>,
    /// Which address outside RAM goes to which device (the virtio slots that are filled).
    mmio: Bus<Mmio>,
    /// Guest RAM, where received frames are written.
    mem: GuestMemoryMmap,
    /// Virtual time, nanoseconds since boot. Moves only by inputs from the boundary.
    now_ns: u64,
    /// Timer ticks that fell due while an earlier one waited are delivered one by one, each
    /// after the guest took the previous one, instead of coalescing (`--timer-reinject`).
    reinject: bool,
    /// Measurement only (not state): the timer interrupts' delays.
    pub ticks: TickStats,
}

/// How late timer interrupts reached the guest: virtual time from the PIT edge that raised
/// IRQ 0 to the injection of its vector. Measurement only: not saved, not part of the VM.
#[derive(Clone, Debug, Default)]
pub struct TickStats {
    /// Virtual time of the edge delivered to the PIC and not yet injected.
    due_ns: Option<u64>,
    /// Delays in microseconds, one per injected timer interrupt.
    pub delays_us: Vec<u32>,
    /// Edges dropped (coalesced) because too many were owed.
    pub dropped: u64,
}

impl TickStats {
    /// The `q` quantile (0..=1) of the delays, in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let mut v = self.delays_us.clone();
        if v.is_empty() {
            return 0;
        }
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        u64::from(v[i.min(v.len() - 1)])
    }
}

/// The most timer ticks owed to a guest in reinject mode (2 s at Linux's HZ=100); more are
/// dropped, so that a guest stopped for long (a paused VM) is not flooded.
pub const MAX_OWED_TICKS: u64 = 200;

impl Platform {
    /// A platform with the RTC showing `rtc_epoch` at boot, an optional virtio-blk disk and an
    /// optional virtio-net NIC.
    pub fn new(
        rtc_epoch: i64,
        blk: Option<MmioBlock>,
        net: Option<MmioNet>,
        mem: GuestMemoryMmap,
    ) -> Self {
        let pio = bus(PORTS.map(|(p, n, d)| (u64::from(p), u64::from(n), d)));
        let mut slots = Vec::new();
        if blk.is_some() {
            slots.push((VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, Mmio::Blk));
        }
        if net.is_some() {
            let base = VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE;
            slots.push((base, VIRTIO_MMIO_SIZE, Mmio::Net));
        }
        let mmio = bus(slots);
        Platform {
            pic: Pic::new(),
            pit: Pit::new(),
            rtc: Rtc::new(rtc_epoch),
            uart: Uart::new(),
            blk,
            net,
            pio,
            mmio,
            mem,
            now_ns: 0,
            reinject: false,
            ticks: TickStats::default(),
        }
    }

    /// Delivers timer ticks one by one, each after the guest took the previous one
    /// (KVM's in-kernel PIT does the same in its reinject mode), instead of coalescing them.
    pub fn set_reinject(&mut self, on: bool) {
        self.reinject = on;
    }

    /// The NIC's MAC, if there is a NIC.
    pub fn net_mac(&self) -> Option<[u8; 6]> {
        self.net.as_ref().map(MmioNet::mac)
    }

    /// Virtual time now.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// The interrupt acknowledge cycle: the vector to inject, if the PIC has one. The next owed
    /// tick (reinject mode) goes in at the next time input after it, when no other interrupt
    /// waits ([`Platform::advance_time`]); in a Linux guest every interrupt handler reads the
    /// clock (its entropy `RDTSC`), so ticks catch up one per interrupt handled.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.pic.acknowledge()?;
        if vector == self.pic.irq0_vector() && !self.pic.irq0_requested() {
            if let Some(due) = self.ticks.due_ns.take() {
                let us = self.now_ns.saturating_sub(due) / 1000;
                self.ticks
                    .delays_us
                    .push(u32::try_from(us).unwrap_or(u32::MAX));
            }
        }
        Some(vector)
    }

    /// Whether timer ticks are owed to the guest (it is behind: reinjection is catching up).
    pub fn ticks_owed(&self) -> bool {
        self.reinject && self.pit.owed_irq0() > 0
    }

    /// Whether the PIC asserts INTR.
    pub fn interrupt_pending(&self) -> bool {
        self.pic.intr()
    }

    /// What the boundary needs to decide on inputs.
    pub fn wait_request(&self) -> WaitRequest {
        // A timer whose line the PIC masks wakes nobody: its edges only set IRR, which the
        // next time input catches up with. (The PIT counts from power-on, as after a PC's
        // firmware; a guest that masks IRQ 0 must not be woken 18.2 times a second.)
        let unmasked = |irq: u8, t: Option<u64>| t.filter(|_| !self.pic.masked(irq));
        let deadline = [
            unmasked(PIT_IRQ, self.pit.next_irq0_ns(self.now_ns)),
            unmasked(RTC_IRQ, self.rtc.next_irq8_ns(self.now_ns)),
        ]
        .into_iter()
        .flatten()
        .min();
        // Input waits, rather than being lost, until the guest's driver has enabled the UART's
        // receive interrupt (Linux's 8250 driver clears the FIFO while it sets the port up).
        let serial_room = if self.uart.rx_interrupt_enabled() {
            self.uart.rx_room()
        } else {
            0
        };
        let net_ready = self.net.as_ref().is_some_and(|n| n.rx_ready(&self.mem));
        WaitRequest {
            now_ns: self.now_ns,
            deadline_ns: deadline,
            serial_room,
            net_ready,
        }
    }

    /// Moves virtual time forward to `t` and raises the timer interrupts that fell due.
    pub fn advance_time(&mut self, t: u64) {
        let before = self.now_ns;
        self.now_ns = self.now_ns.max(t);
        // Measurement: the first edge after the previous time is when this tick fell due.
        let first_due = self.pit.next_irq0_ns(before);
        let edges = if self.reinject {
            self.ticks.dropped += self.pit.count_irq0(self.now_ns, MAX_OWED_TICKS);
            if self.pic.irq0_requested() || self.pic.intr() {
                // One waits in the PIC already, or another device's interrupt does: the ticks
                // stay owed until then. Releasing the next one as soon as the last was taken
                // kept IRQ 0, the highest priority, requested all the time in a guest that was
                // behind, and starved the UART's IRQ 4 (its tty output stopped mid-line).
                0
            } else {
                self.pit.take_owed_irq0()
            }
        } else {
            self.pit.poll_irq0(self.now_ns)
        };
        if edges > 0 {
            if self.ticks.due_ns.is_none() {
                self.ticks.due_ns = Some(first_due.unwrap_or(self.now_ns).min(self.now_ns));
            }
            self.pulse(PIT_IRQ);
        }
        if self.rtc.poll_irq8(self.now_ns) {
            self.pulse(RTC_IRQ);
        }
    }

    /// Applies one input from the boundary.
    pub fn apply(&mut self, input: Input) {
        match input {
            Input::Time(t) => self.advance_time(t),
            Input::SerialRx(bytes) => {
                let taken = self.uart.enqueue_rx(&bytes);
                if taken < bytes.len() {
                    // The boundary never offers more than `serial_room`.
                    tracing::warn!(
                        "UART dropped {} received bytes: more than its FIFO had room for",
                        bytes.len() - taken
                    );
                }
                self.update_irqs();
            }
            Input::NetRx(frame) => {
                if let Some(net) = self.net.as_mut() {
                    match net.receive(&frame, &self.mem) {
                        Ok(true) => {}
                        // The boundary offers frames only when a buffer is posted; the driver
                        // may have changed its mind since: dropped, as by a NIC.
                        Ok(false) => tracing::debug!("NIC dropped a received frame"),
                        Err(e) => tracing::warn!("NIC: {e}"),
                    }
                }
                self.update_irqs();
            }
        }
    }

    fn pulse(&mut self, irq: u8) {
        self.pic.set_irq(irq, true);
        self.pic.set_irq(irq, false);
    }

    /// Samples the devices' interrupt outputs into the PIC.
    fn update_irqs(&mut self) {
        if self.uart.take_irq() {
            self.pulse(COM1_IRQ);
        }
        if let Some(blk) = &self.blk {
            let level = blk.irq_level();
            self.pic.set_irq(VIRTIO_BLK_IRQ, level);
        }
        if let Some(net) = &self.net {
            let level = net.irq_level();
            self.pic.set_irq(VIRTIO_NET_IRQ, level);
        }
    }

    /// Sends what the guest transmitted to the world.
    pub fn flush_output(&mut self, boundary: &mut dyn Boundary) -> Result<(), BoundaryError> {
        let out = self.uart.take_output();
        if !out.is_empty() {
            boundary.output(OutputKind::Serial, &out)?;
        }
        if let Some(net) = self.net.as_mut() {
            for frame in net.take_tx() {
                boundary.output(OutputKind::Net, &frame)?;
            }
        }
        Ok(())
    }

    fn clock(&mut self, boundary: &mut dyn Boundary) -> Result<u64, BoundaryError> {
        let t = boundary.read_clock()?;
        self.advance_time(t);
        Ok(self.now_ns)
    }

    /// `IN` from `port`: fills `data` (1, 2 or 4 bytes).
    pub fn pio_read(
        &mut self,
        port: u16,
        data: &mut [u8],
        boundary: &mut dyn Boundary,
    ) -> Result<(), BoundaryError> {
        let value = match self.pio.get(u64::from(port)) {
            Some((Port::Pic, _)) => self.pic.pio_read(port),
            Some((Port::Pit, _)) => {
                let now = self.clock(boundary)?;
                self.pit.pio_read(port, now)
            }
            Some((Port::Rtc, _)) => {
                let now = self.clock(boundary)?;
                self.rtc.pio_read(port, now)
            }
            Some((Port::Uart, offset)) => self.uart.pio_read(offset as u8),
            Some((Port::Kbd, _)) => 0,
            Some((Port::Exit, _)) | None => 0xff,
        };
        // Multi-byte reads of byte-wide devices: the first byte is the register, the rest ones.
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
        self.update_irqs();
        Ok(())
    }

    /// `OUT` of `data` to `port`.
    pub fn pio_write(
        &mut self,
        port: u16,
        data: &[u8],
        boundary: &mut dyn Boundary,
    ) -> Result<Action, BoundaryError> {
        let Some(&value) = data.first() else {
            return Ok(Action::Continue);
        };
        match self.pio.get(u64::from(port)) {
            Some((Port::Pic, _)) => self.pic.pio_write(port, value),
            Some((Port::Pit, _)) => {
                let now = self.clock(boundary)?;
                self.pit.pio_write(port, value, now);
                // A new count may make an edge due now.
                self.advance_time(now);
            }
            Some((Port::Rtc, _)) => {
                let now = self.clock(boundary)?;
                self.rtc.pio_write(port, value, now);
                // Enabling an interrupt whose flag is already set raises IRQ 8 now, as on the
                // MC146818 (and QEMU's): the edge must reach the PIC at this write, not at the
                // next time input (the census's `firmware` guest waited for it in vain).
                self.advance_time(now);
            }
            Some((Port::Uart, offset)) => {
                self.uart.pio_write(offset as u8, value);
                self.flush_output(boundary)?;
            }
            Some((Port::Exit, _)) => return Ok(Action::Exit(value)),
            Some((Port::Kbd, _)) if value == 0xfe => return Ok(Action::Reset),
            Some((Port::Kbd, _)) | None => {}
        }
        self.update_irqs();
        Ok(Action::Continue)
    }

    /// A read from `addr` outside guest RAM.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8], mem: &GuestMemoryMmap) {
        match self.mmio.get(addr) {
            Some((Mmio::Blk, offset)) => {
                if let Some(blk) = self.blk.as_mut() {
                    blk.mmio_read(offset, data, mem);
                }
            }
            Some((Mmio::Net, offset)) => {
                if let Some(net) = self.net.as_mut() {
                    net.mmio_read(offset, data, mem);
                }
            }
            None => data.fill(0xff),
        }
        self.update_irqs();
    }

    /// A write to `addr` outside guest RAM.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8], mem: &GuestMemoryMmap) {
        match self.mmio.get(addr) {
            Some((Mmio::Blk, offset)) => {
                if let Some(blk) = self.blk.as_mut() {
                    blk.mmio_write(offset, data, mem);
                }
            }
            Some((Mmio::Net, offset)) => {
                if let Some(net) = self.net.as_mut() {
                    net.mmio_write(offset, data, mem);
                }
            }
            None => {}
        }
        self.update_irqs();
    }
}

impl Persist for Platform {
    type State = PlatformState;

    /// Saves every device and the clock.
    fn state(&self) -> PlatformState {
        PlatformState {
            pic: self.pic.state(),
            pit: self.pit.state(),
            rtc: self.rtc.state(),
            uart: self.uart.state(),
            blk: self.blk.as_ref().map(MmioBlock::state),
            net: self.net.as_ref().map(MmioNet::state),
            now_ns: self.now_ns,
        }
    }

    /// Puts every device and the clock back as saved. The disk stays the one this platform
    /// was built with. The virtio devices go first: a state one of them refuses stops the
    /// restore there (an earlier virtio device may already be restored; the VM must not run).
    fn restore(&mut self, s: &PlatformState) -> Result<(), RestoreError> {
        if let (Some(blk), Some(state)) = (self.blk.as_mut(), s.blk.as_ref()) {
            blk.restore(state)?;
        }
        if let (Some(net), Some(state)) = (self.net.as_mut(), s.net.as_ref()) {
            net.restore(state)?;
        }
        self.pic.restore(&s.pic)?;
        self.pit.restore(&s.pit)?;
        self.rtc.restore(&s.rtc)?;
        self.uart.restore(&s.uart)?;
        self.now_ns = s.now_ns;
        self.ticks.due_ns = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ft_core::live::{Clock, LiveBoundary, SerialSource};

    /// A platform with the PIC set up as Linux does (vectors 0x30.., all unmasked) and the
    /// PIT's channel 0 at 100 Hz.
    fn platform(reinject: bool) -> Platform {
        let mem = crate::memory::create(1 << 20).unwrap();
        let mut p = Platform::new(0, None, None, mem);
        p.set_reinject(reinject);
        let mut b = LiveBoundary::with_clock(
            SerialSource::None,
            Box::new(std::io::sink()),
            Clock::Virtual { step_ns: 1 },
        );
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0x00),
        ] {
            p.pio_write(port, &[v], &mut b).unwrap();
        }
        for (port, v) in [(0x43u16, 0x34u8), (0x40, 0x9c), (0x40, 0x2e)] {
            p.pio_write(port, &[v], &mut b).unwrap();
        }
        p
    }

    fn timer_interrupts(p: &mut Platform) -> usize {
        let mut n = 0;
        while p.interrupt_pending() {
            assert_eq!(p.acknowledge(), Some(0x30));
            p.pio_write(
                0x20,
                &[0x20],
                &mut LiveBoundary::new(SerialSource::None, Box::new(std::io::sink())),
            )
            .unwrap();
            n += 1;
            // The handler reads the clock, as Linux's does: the next owed tick goes in.
            let now = p.now_ns();
            p.advance_time(now);
        }
        n
    }

    #[test]
    fn late_ticks_are_reinjected_one_after_the_other() {
        let mut p = platform(true);
        p.advance_time(55_000_000);
        assert_eq!(timer_interrupts(&mut p), 5);
        assert_eq!(p.ticks.delays_us.len(), 5);
    }

    /// Whatever the pattern of late and early acknowledgements, the guest gets exactly one timer
    /// interrupt per PIT edge (none dropped below the cap), never more.
    #[test]
    fn reinjection_never_delivers_more_ticks_than_edges() {
        let mut p = platform(true);
        let mut b = LiveBoundary::new(SerialSource::None, Box::new(std::io::sink()));
        let (mut now, mut seed, mut acks) = (0u64, 0x9e37_79b9_7f4a_7c15u64, 0u64);
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            now += seed % 30_000_000;
            p.advance_time(now);
            if seed % 3 != 0 && p.interrupt_pending() {
                assert_eq!(p.acknowledge(), Some(0x30));
                acks += 1;
                if seed % 5 != 0 {
                    p.pio_write(0x20, &[0x20], &mut b).unwrap();
                }
            }
            if seed % 7 == 0 {
                p.pio_write(0x20, &[0x20], &mut b).unwrap();
            }
        }
        let edges = now / 10_000_000;
        let owed = p.pit.owed_irq0() + u64::from(p.pic.irq0_requested());
        assert!(acks <= edges, "{acks} interrupts for {edges} edges");
        assert_eq!(
            acks + owed + p.ticks.dropped,
            edges,
            "{acks} + {owed} owed + {} dropped",
            p.ticks.dropped
        );
    }

    /// Owed ticks do not starve a lower-priority device: a UART interrupt raised while the
    /// guest is behind is taken before the next owed tick.
    #[test]
    fn owed_ticks_let_other_interrupts_in() {
        let mut p = platform(true);
        let mut b = LiveBoundary::new(SerialSource::None, Box::new(std::io::sink()));
        p.advance_time(55_000_000);
        assert_eq!(p.acknowledge(), Some(0x30));
        p.pio_write(0x20, &[0x20], &mut b).unwrap();
        p.pulse(COM1_IRQ);
        p.advance_time(55_000_000);
        assert_eq!(p.acknowledge(), Some(0x34), "the UART first");
        p.pio_write(0x20, &[0x20], &mut b).unwrap();
        p.advance_time(55_000_000);
        assert_eq!(p.acknowledge(), Some(0x30), "then the next owed tick");
    }

    /// The bus routes every port as the two hand-written `match`es of reads and writes did,
    /// except that the ELCR (0x4d0-0x4d1) now reaches the PIC on writes too, where it is
    /// ignored as before; and the exit port is write-only, as it was.
    #[test]
    fn every_port_goes_where_it_went_before_the_bus() {
        let mut pio = Bus::default();
        for (base, len, device) in PORTS {
            pio.insert(u64::from(base), u64::from(len), device).unwrap();
        }
        let p = platform(false);
        for port in 0..=u16::MAX {
            let before = match port {
                0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => Some(Port::Pic),
                0x40..=0x43 | 0x61 => Some(Port::Pit),
                0x70 | 0x71 => Some(Port::Rtc),
                p if (COM1_BASE..COM1_BASE + 8).contains(&p) => Some(Port::Uart),
                KBD_CMD_PORT => Some(Port::Kbd),
                EXIT_PORT => Some(Port::Exit),
                _ => None,
            };
            let now = p.pio.get(u64::from(port)).map(|(d, _)| d);
            assert_eq!(now, before, "port {port:#x}");
            assert_eq!(pio.get(u64::from(port)).map(|(d, _)| d), before);
        }
        assert_eq!(p.pio.get(0x3fd), Some((Port::Uart, 5)));
    }

    /// An empty virtio slot is not on the bus (reads all ones, writes go nowhere).
    #[test]
    fn only_filled_virtio_slots_are_on_the_bus() {
        let mem = crate::memory::create(1 << 20).unwrap();
        let p = Platform::new(0, None, Some(MmioNet::new([2, 0, 0, 0, 0, 1])), mem);
        assert_eq!(p.mmio.get(VIRTIO_MMIO_BASE), None);
        assert_eq!(
            p.mmio.get(VIRTIO_MMIO_BASE + 0x1ffc),
            Some((Mmio::Net, 0xffc))
        );
        assert_eq!(p.mmio.get(VIRTIO_MMIO_BASE + 0x2000), None);
        assert_eq!(p.mmio.get(VIRTIO_MMIO_BASE - 1), None);
    }

    #[test]
    fn without_reinject_late_ticks_coalesce() {
        let mut p = platform(false);
        p.advance_time(55_000_000);
        assert_eq!(timer_interrupts(&mut p), 1);
    }
}
