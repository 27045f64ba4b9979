//! Virtio devices on the virtio-mmio transport (version 2, "modern": VIRTIO_F_VERSION_1).
//!
//! - [`mmio`]: the transport ([`VirtioMmio`]), generic over a [`VirtioDevice`]: the register
//!   file, feature negotiation, the device status state machine, the split virtqueues
//!   (`virtio_queue::Queue`) and the interrupt status.
//! - [`block`]: virtio-blk ([`VirtioBlk`]) over a [`crate::disk::Disk`].
//! - [`net`]: virtio-net ([`VirtioNet`]): frames the guest transmits are collected for the VMM
//!   to take; frames the VMM pushes are written into the guest's receive buffers.
//!
//! [`MmioBlock`] and [`MmioNet`] are the devices on their transport, what the VMM puts in a
//! slot.
//!
//! Requests are processed synchronously, inside the guest's `QueueNotify` write, so the devices
//! add no non-determinism of their own: the only inputs they read besides guest memory are the
//! disk, through the backend, and the received frames, which the VMM hands to
//! [`MmioNet::receive`] at a moment it chooses (for fault tolerance, an input logged at an
//! exit). Guest memory is written only through vm-memory, so the dirty
//! bitmap of the VMM's `GuestMemoryMmap` records every page a device writes.

pub mod block;
pub mod mmio;
pub mod net;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use crate::persist::Persist;
use crate::GuestMemoryMmap;

pub use block::{VirtioBlk, VirtioBlkState};
pub use mmio::{MmioBlock, MmioBlockState, MmioNet, MmioNetState, VirtioMmio, VirtioMmioState};
pub use net::{VirtioNet, VirtioNetState};

/// Errors of the virtio transport and queue handling.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The available ring could not be read or is inconsistent.
    #[error("virtqueue {queue}: bad available ring: {source}")]
    AvailRing {
        /// Queue index.
        queue: usize,
        /// What virtio-queue found.
        source: virtio_queue::Error,
    },
    /// The used ring could not be written.
    #[error("virtqueue {queue}: cannot write the used ring: {source}")]
    UsedRing {
        /// Queue index.
        queue: usize,
        /// What virtio-queue found.
        source: virtio_queue::Error,
    },
    /// A ready queue whose rings are not inside guest memory.
    #[error("virtqueue {queue}: its rings are not inside guest memory")]
    RingsOutsideMemory {
        /// Queue index.
        queue: usize,
    },
}

/// The device side of a virtio device, behind the transport. Its [`Persist`] state is the
/// device's own (the transport saves the queues and registers).
pub trait VirtioDevice: Persist {
    /// The virtio device ID (1 = net, 2 = block).
    fn device_id(&self) -> u32;
    /// The maximum size of each of the device's queues (a power of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn device_features(&self) -> u64;
    /// The driver accepted `features` (a subset of `device_features`).
    fn ack_features(&mut self, features: u64);
    /// Reads the device configuration space at `offset`; bytes beyond it read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Processes the available buffers of queue `index`; returns how many it put in the used
    /// ring. An error is a broken ring: the transport then asks the driver for a reset.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, VirtioError>;
    /// Device reset (status 0 written).
    fn reset(&mut self);
}

/// A serializable copy of `virtio_queue::QueueState`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The maximum size in elements offered by the device.
    pub max_size: u16,
    /// Tail position of the available ring.
    pub next_avail: u16,
    /// Head position of the used ring.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// The queue size in elements the driver selected.
    pub size: u16,
    /// The queue is ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

#[cfg(test)]
mod tests;
