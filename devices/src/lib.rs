//! Device models of the ftvmm platform (docs/PLATFORM.md): the 8259A PIC pair, the 8254 PIT,
//! the MC146818 CMOS RTC, the 16550A UART and virtio-blk over virtio-mmio.
//!
//! Every model here is a deterministic state machine. None of them knows about fault
//! tolerance, none reads a clock, starts a thread, draws a random number or touches the host,
//! except the virtio-blk disk through the [`disk::Disk`] the VMM hands it. Time comes in as an
//! explicit `now_ns` argument (virtual nanoseconds, monotonic), so the same sequence of calls
//! always gives the same results.
//!
//! No guest action makes a model panic: bad ports, offsets, register values and virtio
//! descriptors give a defined result (an ignored access, an error status, a "needs reset"
//! device state) and a `tracing::warn!`.
//!
//! Every device saves its complete state into a serde-serializable `*State` struct and is put
//! back in it through one trait, [`Persist`], for snapshots and live state transfer.
//!
//! | module | device | guest interface |
//! | --- | --- | --- |
//! | [`pic`] | 8259A master/slave pair | ports 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1 |
//! | [`pit`] | 8254 timer + port 0x61 | ports 0x40-0x43, 0x61; IRQ 0 |
//! | [`rtc`] | MC146818 RTC + NVRAM | ports 0x70-0x71; IRQ 8 |
//! | [`serial`] | 16550A UART (COM1) | ports 0x3f8-0x3ff; IRQ 4 |
//! | [`virtio`] | virtio-blk on virtio-mmio v2 | 0xd0000000, 4 KiB; IRQ 5 |
//!
//! Beside the models: [`disk`], the storage virtio-blk reads and writes; [`persist`], the
//! saved-state trait; [`bus`], the address-range table the VMM routes port and MMIO accesses
//! with.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod bus;
pub mod disk;
pub mod persist;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod serial;
pub mod virtio;

pub use persist::{Persist, RestoreError};

/// Guest RAM as the VMM maps it: an mmap-backed `GuestMemoryMmap` whose dirty bitmap records
/// every page the VMM (and so every device model) writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

#[cfg(test)]
mod tests {
    /// The VMM may move its devices to another thread.
    #[test]
    fn devices_are_send() {
        fn send<T: Send>() {}
        send::<crate::pic::Pic>();
        send::<crate::pit::Pit>();
        send::<crate::rtc::Rtc>();
        send::<crate::serial::Uart>();
        send::<crate::virtio::MmioBlock>();
    }
}
