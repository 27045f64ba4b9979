//! virtio-net: the device side (virtio 1.2 section 5.1).
//!
//! Offered features: VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC and VIRTIO_RING_F_INDIRECT_DESC;
//! nothing else: no checksum or segmentation offloads, no mergeable receive buffers, no
//! control queue, no link status. So every frame carries the 12-byte `struct
//! virtio_net_hdr_v1` in front of it, the driver posts receive buffers big enough for a whole
//! frame, and a frame is at most [`MAX_FRAME_LEN`] bytes. The configuration space is the 6-byte
//! MAC (read-only).
//!
//! Queues (256 entries each): 0 = receiveq, 1 = transmitq.
//!
//! **Transmit.** A transmitq notification walks every available chain: device-readable bytes
//! only, the header (ignored: with no offload negotiated there is nothing in it to act on),
//! then the frame. Each frame of [`MIN_FRAME_LEN`]..=[`MAX_FRAME_LEN`] bytes is kept, oldest
//! first, until the VMM takes it ([`MmioNet::take_tx`], after every access that may notify);
//! the chain is returned in the used ring with length 0. A chain that cannot be walked (a
//! loop, a next index beyond the queue, a descriptor that cannot be read), that has a
//! device-writable descriptor, a buffer outside guest memory or a frame length outside those
//! bounds gets a warning, is returned with length 0, and its frame is dropped. An available
//! ring that cannot be read or a used ring that cannot be written puts the device in
//! DEVICE_NEEDS_RESET (the transport's rule).
//!
//! **Receive.** The VMM pushes a frame with [`MmioNet::receive`] when it chooses, never on a
//! notification (a receiveq notification only says buffers were posted; the VMM looks with
//! [`MmioNet::rx_ready`]). The frame goes into the next available chain, which must be
//! device-writable only: a zeroed header with `num_buffers` = 1, then the frame; the used
//! length is 12 + the frame's length, and the used-buffer interrupt is raised (unless the
//! driver set VRING_AVAIL_F_NO_INTERRUPT). What cannot be delivered is dropped, as a NIC drops
//! what it has no room for:
//! - no buffer posted, or the driver not ready: `Ok(false)`, nothing changes;
//! - a frame outside [`MIN_FRAME_LEN`]..=[`MAX_FRAME_LEN`]: `Ok(false)` with a warning;
//! - a buffer too small for the header and the frame: `Ok(false)` with a warning, and **the
//!   buffer is left in the available ring** for a later, smaller frame (Linux posts buffers of
//!   one size, so only an oversized frame meets this);
//! - a broken chain (it cannot be walked, has a device-readable descriptor or a buffer outside
//!   guest memory): `Ok(false)` with a warning, and the chain is returned with length 0 (Linux
//!   counts a length error and posts a new buffer), so it does not block the queue;
//! - a broken ring: `Err`, and the device needs a reset.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::mmio::MmioNet;
use super::{VirtioDevice, VirtioError};
use crate::persist::{Persist, RestoreError};
use crate::GuestMemoryMmap;

/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const NET_HDR_LEN: usize = 12;
/// The shortest frame: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// The longest frame: an Ethernet header and a 65535-byte IP packet, plus a VLAN tag's
/// worth of slack.
pub const MAX_FRAME_LEN: usize = 65550;
/// `num_buffers` is the header's last field (bytes 10..12).
const NUM_BUFFERS_OFFSET: usize = 10;

/// Why a chain was dropped.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The chain could not be walked to its end.
    #[error(
        "descriptor chain {head} is broken (a loop, a next index beyond the queue, \
         or a descriptor that cannot be read)"
    )]
    BrokenChain {
        /// Head descriptor index.
        head: u16,
    },
    /// A descriptor goes the wrong way: device-writable in a transmit chain, device-readable
    /// in a receive chain.
    #[error("descriptor chain {head} has a device-{which} descriptor")]
    WrongDirection {
        /// Head descriptor index.
        head: u16,
        /// "writable" (transmit) or "readable" (receive).
        which: &'static str,
    },
    /// A buffer is not inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BadBuffer {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A transmitted frame (after the header) outside 14..=65550 bytes.
    #[error(
        "descriptor chain {head} holds {len} bytes: not a 12-byte header and a frame of \
         14 to 65550 bytes"
    )]
    FrameLength {
        /// Head descriptor index.
        head: u16,
        /// Bytes in the chain, header included.
        len: u64,
    },
    /// Guest memory could not be accessed.
    #[error("guest memory access at {addr:#x} failed: {source}")]
    Memory {
        /// Guest physical address.
        addr: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
}

/// A run of guest memory in a descriptor chain.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// The saved state of the virtio-net device proper (the queues are the transport's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The MAC address in the configuration space.
    pub mac: [u8; 6],
    /// Frames the guest transmitted that the VMM has not taken yet, oldest first, without
    /// the header.
    pub tx: Vec<Vec<u8>>,
}

/// The virtio-net device.
#[derive(Debug)]
pub struct VirtioNet {
    mac: [u8; 6],
    acked_features: u64,
    /// Transmitted frames not taken yet, oldest first.
    tx: Vec<Vec<u8>>,
    queue_sizes: [u16; 2],
}

impl VirtioNet {
    /// A virtio-net device with MAC address `mac`.
    pub fn new(mac: [u8; 6]) -> Self {
        VirtioNet {
            mac,
            acked_features: 0,
            tx: Vec::new(),
            queue_sizes: [QUEUE_SIZE; 2],
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The frames transmitted since the last call, oldest first.
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.tx)
    }

    /// Walks a chain whose descriptors must all be device-writable (`writable`) or all
    /// device-readable, into its segments, each checked to lie in guest memory.
    fn walk_chain(
        chain: DescriptorChain<&GuestMemoryMmap>,
        writable: bool,
        mem: &GuestMemoryMmap,
    ) -> Result<Vec<Segment>, NetError> {
        let head = chain.head_index();
        let mut segs = Vec::new();
        // The iterator stops after `queue size` descriptors, at an index beyond the queue and
        // at a descriptor it cannot read; then the last descriptor still says "next".
        let mut complete = false;
        for desc in chain {
            complete = !desc.has_next();
            if desc.is_write_only() != writable {
                return Err(NetError::WrongDirection {
                    head,
                    which: if writable { "readable" } else { "writable" },
                });
            }
            segs.push(Segment {
                addr: desc.addr(),
                len: u64::from(desc.len()),
            });
        }
        if !complete {
            return Err(NetError::BrokenChain { head });
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        for s in &segs {
            let len = usize::try_from(s.len).unwrap_or(usize::MAX);
            if s.len > 0 && !mem.check_range(s.addr, len, access) {
                return Err(NetError::BadBuffer {
                    addr: s.addr.0,
                    len: s.len,
                });
            }
        }
        Ok(segs)
    }

    /// Reads the frame of one transmit chain (without its header).
    fn read_tx_chain(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<Vec<u8>, NetError> {
        let head = chain.head_index();
        let segs = Self::walk_chain(chain, false, mem)?;
        let total: u64 = segs.iter().map(|s| s.len).sum();
        let frame_len = total.saturating_sub(NET_HDR_LEN as u64);
        if total < NET_HDR_LEN as u64
            || !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&(frame_len as usize))
        {
            return Err(NetError::FrameLength { head, len: total });
        }
        // At most 65562 bytes, checked above.
        let mut buf = vec![0u8; total as usize];
        let mut pos = 0usize;
        for s in &segs {
            let end = pos + s.len as usize;
            mem.read_slice(&mut buf[pos..end], s.addr)
                .map_err(|source| NetError::Memory {
                    addr: s.addr.0,
                    source,
                })?;
            pos = end;
        }
        buf.drain(..NET_HDR_LEN);
        Ok(buf)
    }

    /// Writes `bytes` across `segs`, which hold at least as many bytes.
    fn write_segments(
        segs: &[Segment],
        bytes: &[u8],
        mem: &GuestMemoryMmap,
    ) -> Result<(), NetError> {
        let mut pos = 0usize;
        for s in segs {
            if pos >= bytes.len() {
                break;
            }
            let n = (bytes.len() - pos).min(usize::try_from(s.len).unwrap_or(usize::MAX));
            mem.write_slice(&bytes[pos..pos + n], s.addr)
                .map_err(|source| NetError::Memory {
                    addr: s.addr.0,
                    source,
                })?;
            pos += n;
        }
        Ok(())
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<u32, VirtioError> {
        let mut used = 0u32;
        loop {
            // The iterator checks that the driver offers at most a queue's worth of new
            // chains, so this loop ends (the guest is not running while it does).
            let chain = queue
                .iter(mem)
                .map_err(|source| VirtioError::AvailRing {
                    queue: TX_QUEUE,
                    source,
                })?
                .next();
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            match Self::read_tx_chain(chain, mem) {
                Ok(frame) => self.tx.push(frame),
                Err(e) => tracing::warn!("virtio-net: transmit: {e}; frame dropped"),
            }
            if head >= queue.size() {
                tracing::warn!(
                    "virtio-net: transmit available ring names descriptor {head}, beyond the \
                     queue's {}; dropped",
                    queue.size()
                );
                continue;
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|source| VirtioError::UsedRing {
                    queue: TX_QUEUE,
                    source,
                })?;
            used += 1;
        }
        Ok(used)
    }

    /// Puts `frame` into the next receive buffer of `queue`; returns whether it was delivered
    /// and how many chains went to the used ring (the module doc lists the cases).
    fn receive_frame(
        &mut self,
        frame: &[u8],
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<(bool, u32), VirtioError> {
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&frame.len()) {
            tracing::warn!(
                "virtio-net: receive: a {}-byte frame is not 14 to 65550 bytes; dropped",
                frame.len()
            );
            return Ok((false, 0));
        }
        let avail_ring = |source| VirtioError::AvailRing {
            queue: RX_QUEUE,
            source,
        };
        let Some(chain) = queue.iter(mem).map_err(avail_ring)?.next() else {
            return Ok((false, 0));
        };
        let head = chain.head_index();
        let segs = match Self::walk_chain(chain, true, mem) {
            Ok(segs) => segs,
            Err(e) => {
                tracing::warn!("virtio-net: receive buffer: {e}; returned empty, frame dropped");
                return self.return_empty(queue, mem, head);
            }
        };
        let room: u64 = segs.iter().map(|s| s.len).sum();
        let need = NET_HDR_LEN + frame.len();
        if room < need as u64 {
            tracing::warn!(
                "virtio-net: receive buffer {head} has {room} bytes, a {}-byte frame needs \
                 {need}; frame dropped, buffer kept",
                frame.len()
            );
            queue.go_to_previous_position();
            return Ok((false, 0));
        }
        let mut bytes = Vec::with_capacity(need);
        bytes.extend_from_slice(&[0; NET_HDR_LEN]);
        bytes[NUM_BUFFERS_OFFSET..NET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(frame);
        if let Err(e) = Self::write_segments(&segs, &bytes, mem) {
            tracing::warn!("virtio-net: receive buffer {head}: {e}; returned empty, frame dropped");
            return self.return_empty(queue, mem, head);
        }
        if head >= queue.size() {
            return self.return_empty(queue, mem, head);
        }
        // `need` is at most 12 + 65550.
        queue
            .add_used(mem, head, need as u32)
            .map_err(|source| VirtioError::UsedRing {
                queue: RX_QUEUE,
                source,
            })?;
        Ok((true, 1))
    }

    /// Returns receive chain `head` with length 0 (the frame was not delivered).
    fn return_empty(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
    ) -> Result<(bool, u32), VirtioError> {
        if head >= queue.size() {
            tracing::warn!(
                "virtio-net: receive available ring names descriptor {head}, beyond the \
                 queue's {}; dropped",
                queue.size()
            );
            return Ok((false, 0));
        }
        queue
            .add_used(mem, head, 0)
            .map_err(|source| VirtioError::UsedRing {
                queue: RX_QUEUE,
                source,
            })?;
        Ok((false, 1))
    }
}

impl VirtioDevice for VirtioNet {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.mac.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            "virtio-net: write of {} bytes to read-only config offset {offset:#x} ignored",
            data.len()
        );
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, VirtioError> {
        match index {
            TX_QUEUE => self.process_tx(queue, mem),
            // Receive buffers were posted: they wait for the VMM's next frame.
            _ => Ok(0),
        }
    }

    /// Forgets the negotiated features. Frames transmitted before the reset and not taken
    /// yet stay: the guest sent them.
    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

impl Persist for VirtioNet {
    type State = VirtioNetState;

    fn state(&self) -> VirtioNetState {
        VirtioNetState {
            acked_features: self.acked_features,
            mac: self.mac,
            tx: self.tx.clone(),
        }
    }

    /// Restores the saved state, MAC included (the guest has read it).
    fn restore(&mut self, s: &VirtioNetState) -> Result<(), RestoreError> {
        if s.mac != self.mac {
            tracing::warn!(
                "virtio-net: restoring a state saved with MAC {} onto a device with MAC {}; \
                 the saved one is kept",
                format_mac(s.mac),
                format_mac(self.mac)
            );
        }
        self.mac = s.mac;
        self.acked_features = s.acked_features;
        self.tx = s.tx.clone();
        Ok(())
    }
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl MmioNet {
    /// A virtio-net device with MAC address `mac` on a fresh transport.
    pub fn new(mac: [u8; 6]) -> MmioNet {
        Self::with_device(VirtioNet::new(mac))
    }

    /// The frames the guest transmitted since the last call, oldest first (without the
    /// header).
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        self.device_mut().take_tx()
    }

    /// Whether a frame could be received now: the driver is DRIVER_OK, the receiveq is ready
    /// and has an available buffer.
    pub fn rx_ready(&self, mem: &GuestMemoryMmap) -> bool {
        self.queue_usable(RX_QUEUE, mem)
            && self.queue(RX_QUEUE).is_some_and(|q| {
                q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != q.next_avail())
            })
    }

    /// Delivers one frame into the next receive buffer: a zeroed virtio_net_hdr_v1 with
    /// num_buffers = 1, then the frame; adds it to the used ring and raises the interrupt.
    /// `Ok(false)`: no buffer posted or device not ready, or the buffer is too small: the
    /// frame is dropped, as a NIC drops what it has no room for (the module doc lists every
    /// case). `Err`: the ring is broken (the device goes to needs-reset).
    pub fn receive(&mut self, frame: &[u8], mem: &GuestMemoryMmap) -> Result<bool, VirtioError> {
        let delivered = self.with_queue(RX_QUEUE, mem, |dev, queue, mem| {
            dev.receive_frame(frame, queue, mem)
        })?;
        Ok(delivered.unwrap_or(false))
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.device().mac()
    }
}
