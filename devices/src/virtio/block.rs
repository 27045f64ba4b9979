//! virtio-blk: the device side (virtio 1.2 section 5.2).
//!
//! Offered features: VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX (254
//! segments: a 256-entry queue minus header and status), VIRTIO_RING_F_INDIRECT_DESC, and
//! VIRTIO_BLK_F_RO for a read-only disk. Requests: VIRTIO_BLK_T_IN, T_OUT, T_FLUSH and
//! T_GET_ID (serial "ftvmm-disk"); anything else gets VIRTIO_BLK_S_UNSUPP.
//!
//! A request is a descriptor chain: device-readable bytes (the 16-byte header, then for T_OUT
//! the data), then device-writable bytes (for T_IN and T_GET_ID the data, then the status
//! byte, which is the last writable byte). The split into descriptors does not matter
//! (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1).
//!
//! What a broken request gets:
//! - a chain that cannot be walked (a loop, a next index beyond the queue, a descriptor that
//!   cannot be read), a readable descriptor after a writable one, or no writable byte for the
//!   status: a warning, and the chain is returned in the used ring with length 0 (nothing was
//!   written to it);
//! - a short header, data in the wrong direction, a data length that is not a multiple of 512,
//!   a range beyond the disk, a buffer outside guest memory, a write to a read-only disk, a
//!   disk I/O error: a warning and status VIRTIO_BLK_S_IOERR.

use std::io;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::{VirtioDevice, VirtioError};
use crate::disk::Disk;
use crate::persist::{Persist, RestoreError};
use crate::GuestMemoryMmap;

/// The unit of disk addressing.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The disk's serial, returned by VIRTIO_BLK_T_GET_ID.
pub const DISK_ID: &[u8] = b"ftvmm-disk";
/// The request header: type (u32), reserved (u32), sector (u64).
const HEADER_LEN: u64 = 16;
/// Disk data moves through a buffer of at most this size.
const BOUNCE_LEN: u64 = 64 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The chain could not be walked to its end.
    #[error(
        "descriptor chain {head} is broken (a loop, a next index beyond the queue, \
         or a descriptor that cannot be read)"
    )]
    BrokenChain {
        /// Head descriptor index.
        head: u16,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("descriptor chain {head}: a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable {
        /// Head descriptor index.
        head: u16,
    },
    /// The chain has no device-writable byte to put the status in.
    #[error("descriptor chain {head} has no device-writable byte for the status")]
    NoStatus {
        /// Head descriptor index.
        head: u16,
    },
    /// Fewer than 16 device-readable bytes.
    #[error("request header is {len} bytes, not 16")]
    ShortHeader {
        /// Readable bytes found.
        len: u64,
    },
    /// Data in the wrong direction (e.g. device-writable data in a write request).
    #[error("request type {kind} carries {len} data bytes in the wrong direction")]
    WrongDirection {
        /// Request type.
        kind: u32,
        /// Misplaced bytes.
        len: u64,
    },
    /// A buffer is not inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BadBuffer {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A data length that is not a whole number of sectors.
    #[error("data length {len} is not a multiple of 512")]
    UnalignedLength {
        /// Data length in bytes.
        len: u64,
    },
    /// A range beyond the end of the disk.
    #[error("{len} bytes at sector {sector} go beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length in bytes.
        len: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// The guest sent a write request (`VIRTIO_BLK_T_OUT`) to a device created read-only
    /// (it offers `VIRTIO_BLK_F_RO`, so a correct driver never does); status IOERR.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The [`Disk`] returned an error (host file I/O); status IOERR.
    #[error("disk I/O failed: {0}")]
    Io(#[from] io::Error),
    /// Guest memory could not be accessed.
    #[error("guest memory access at {addr:#x} failed: {source}")]
    Memory {
        /// Guest physical address.
        addr: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

/// A run of guest memory in a descriptor chain.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Splits `segs` after `n` bytes.
fn split_segments(segs: &[Segment], n: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = n;
    for &s in segs {
        if left >= s.len {
            head.push(s);
            left -= s.len;
        } else if left > 0 {
            head.push(Segment {
                addr: s.addr,
                len: left,
            });
            tail.push(Segment {
                addr: GuestAddress(s.addr.0.wrapping_add(left)),
                len: s.len - left,
            });
            left = 0;
        } else {
            tail.push(s);
        }
    }
    (head, tail)
}

/// Checks that every segment lies in guest memory.
fn check_segments(
    segs: &[Segment],
    mem: &GuestMemoryMmap,
    access: Permissions,
) -> Result<(), BlockError> {
    for s in segs {
        let len = usize::try_from(s.len).unwrap_or(usize::MAX);
        if s.len > 0 && !mem.check_range(s.addr, len, access) {
            return Err(BlockError::BadBuffer {
                addr: s.addr.0,
                len: s.len,
            });
        }
    }
    Ok(())
}

fn memory_error(addr: GuestAddress) -> impl FnOnce(vm_memory::GuestMemoryError) -> BlockError {
    move |source| BlockError::Memory {
        addr: addr.0,
        source,
    }
}

/// The saved state of the virtio-blk device proper (the queue is the transport's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    /// The features the driver accepted.
    pub acked_features: u64,
    /// Disk size in sectors when saved (checked on restore).
    pub capacity: u64,
    /// Read-only when saved (checked on restore).
    pub read_only: bool,
}

/// The virtio-blk device.
pub struct VirtioBlk {
    disk: Box<dyn Disk>,
    read_only: bool,
    /// Disk size in sectors, read once from the backend.
    capacity: u64,
    acked_features: u64,
    queue_sizes: [u16; 1],
}

impl std::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("read_only", &self.read_only)
            .field("capacity", &self.capacity)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

impl VirtioBlk {
    /// A virtio-blk device over `disk`; its size is read now, in whole sectors.
    pub fn new(disk: Box<dyn Disk>, read_only: bool) -> Self {
        let capacity = disk.size() / SECTOR_SIZE;
        VirtioBlk {
            disk,
            read_only,
            capacity,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE],
        }
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The configuration space (struct virtio_blk_config, up to `num_queues`).
    fn config_bytes(&self) -> [u8; 36] {
        let mut c = [0u8; 36];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8..12): not offered. seg_max:
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        // geometry (16..20), blk_size (20..24), topology (24..32), writeback (32),
        // num_queues (34..36): not offered.
        c
    }

    /// Walks a chain into its readable and writable segments.
    fn walk_chain(
        head: u16,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(Vec<Segment>, Vec<Segment>), BlockError> {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        // The iterator stops after `queue size` descriptors, at an index beyond the queue and
        // at a descriptor it cannot read; then the last descriptor still says "next".
        let mut complete = false;
        for desc in chain {
            complete = !desc.has_next();
            let seg = Segment {
                addr: desc.addr(),
                len: u64::from(desc.len()),
            };
            if desc.is_write_only() {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                return Err(BlockError::ReadableAfterWritable { head });
            }
        }
        if !complete {
            return Err(BlockError::BrokenChain { head });
        }
        Ok((readable, writable))
    }

    /// Handles one chain; returns the used length (bytes written into the chain).
    fn process_chain(
        &mut self,
        head: u16,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let (readable, writable) = match Self::walk_chain(head, chain) {
            Ok(segs) => segs,
            Err(e) => {
                tracing::warn!("virtio-blk: {e}; request skipped");
                return 0;
            }
        };
        let writable_len = total_len(&writable);
        if writable_len == 0 {
            tracing::warn!(
                "virtio-blk: {}; request skipped",
                BlockError::NoStatus { head }
            );
            return 0;
        }
        let (data_out, status_seg) = split_segments(&writable, writable_len - 1);
        let Some(status_seg) = status_seg.first().copied() else {
            return 0;
        };
        let mut written = 0u64;
        let status = match self.execute(&readable, &data_out, mem, &mut written) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(BlockError::Unsupported(kind)) => {
                tracing::warn!("virtio-blk: unsupported request type {kind}");
                VIRTIO_BLK_S_UNSUPP
            }
            Err(e) => {
                tracing::warn!("virtio-blk: request (chain {head}) failed: {e}");
                VIRTIO_BLK_S_IOERR
            }
        };
        if let Err(e) = mem.write_obj(status as u8, status_seg.addr) {
            tracing::warn!(
                "virtio-blk: cannot write the status byte at {:#x}: {e}",
                status_seg.addr.0
            );
        } else {
            written += 1;
        }
        u32::try_from(written).unwrap_or(u32::MAX)
    }

    /// Runs the request in `readable` (header + data out) and `data_in` (data to the driver,
    /// status excluded), counting the bytes written to the driver in `written`.
    fn execute(
        &mut self,
        readable: &[Segment],
        data_in: &[Segment],
        mem: &GuestMemoryMmap,
        written: &mut u64,
    ) -> Result<(), BlockError> {
        let (header_segs, data_out) = split_segments(readable, HEADER_LEN);
        let header_len = total_len(&header_segs);
        if header_len < HEADER_LEN {
            return Err(BlockError::ShortHeader { len: header_len });
        }
        check_segments(&header_segs, mem, Permissions::Read)?;
        let mut header = [0u8; HEADER_LEN as usize];
        let mut pos = 0;
        for s in &header_segs {
            let end = pos + s.len as usize;
            mem.read_slice(&mut header[pos..end], s.addr)
                .map_err(memory_error(s.addr))?;
            pos = end;
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        match kind {
            VIRTIO_BLK_T_IN => {
                Self::expect_empty(kind, data_out.as_slice())?;
                let len = total_len(data_in);
                let offset = self.check_range(sector, len)?;
                check_segments(data_in, mem, Permissions::Write)?;
                self.read_to_guest(data_in, offset, mem, written)
            }
            VIRTIO_BLK_T_OUT => {
                Self::expect_empty(kind, data_in)?;
                if self.read_only {
                    return Err(BlockError::ReadOnly);
                }
                let len = total_len(&data_out);
                let offset = self.check_range(sector, len)?;
                check_segments(&data_out, mem, Permissions::Read)?;
                self.write_from_guest(&data_out, offset, mem)
            }
            VIRTIO_BLK_T_FLUSH => Ok(self.disk.flush()?),
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..DISK_ID.len()].copy_from_slice(DISK_ID);
                check_segments(data_in, mem, Permissions::Write)?;
                let mut pos = 0usize;
                for s in data_in {
                    if pos >= id.len() {
                        break;
                    }
                    let n = (id.len() - pos).min(usize::try_from(s.len).unwrap_or(usize::MAX));
                    mem.write_slice(&id[pos..pos + n], s.addr)
                        .map_err(memory_error(s.addr))?;
                    pos += n;
                    *written += n as u64;
                }
                Ok(())
            }
            other => Err(BlockError::Unsupported(other)),
        }
    }

    fn expect_empty(kind: u32, segs: &[Segment]) -> Result<(), BlockError> {
        match total_len(segs) {
            0 => Ok(()),
            len => Err(BlockError::WrongDirection { kind, len }),
        }
    }

    /// Checks a transfer of `len` bytes at `sector`; returns its byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, BlockError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedLength { len });
        }
        let range = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|offset| Some((offset, offset.checked_add(len)?)));
        match range {
            Some((offset, end)) if end <= self.capacity * SECTOR_SIZE => Ok(offset),
            _ => Err(BlockError::OutOfRange {
                sector,
                len,
                capacity: self.capacity,
            }),
        }
    }

    fn read_to_guest(
        &mut self,
        segs: &[Segment],
        mut offset: u64,
        mem: &GuestMemoryMmap,
        written: &mut u64,
    ) -> Result<(), BlockError> {
        let mut buf = vec![0u8; total_len(segs).min(BOUNCE_LEN) as usize];
        for s in segs {
            let mut done = 0u64;
            while done < s.len {
                let n = (s.len - done).min(BOUNCE_LEN) as usize;
                let addr = GuestAddress(s.addr.0 + done);
                self.disk.read_at(&mut buf[..n], offset)?;
                mem.write_slice(&buf[..n], addr)
                    .map_err(memory_error(addr))?;
                done += n as u64;
                offset += n as u64;
                *written += n as u64;
            }
        }
        Ok(())
    }

    fn write_from_guest(
        &mut self,
        segs: &[Segment],
        mut offset: u64,
        mem: &GuestMemoryMmap,
    ) -> Result<(), BlockError> {
        let mut buf = vec![0u8; total_len(segs).min(BOUNCE_LEN) as usize];
        for s in segs {
            let mut done = 0u64;
            while done < s.len {
                let n = (s.len - done).min(BOUNCE_LEN) as usize;
                let addr = GuestAddress(s.addr.0 + done);
                mem.read_slice(&mut buf[..n], addr)
                    .map_err(memory_error(addr))?;
                self.disk.write_at(&buf[..n], offset)?;
                done += n as u64;
                offset += n as u64;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            "virtio-blk: write of {} bytes to read-only config offset {offset:#x} ignored",
            data.len()
        );
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, VirtioError> {
        let mut used = 0u32;
        loop {
            // The iterator checks that the driver offers at most a queue's worth of new
            // chains, so this loop ends (the guest is not running while it does).
            let chain = queue
                .iter(mem)
                .map_err(|source| VirtioError::AvailRing {
                    queue: index,
                    source,
                })?
                .next();
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let len = self.process_chain(head, chain, mem);
            if head >= queue.size() {
                tracing::warn!(
                    "virtio-blk: available ring names descriptor {head}, beyond the queue's {}; \
                     dropped",
                    queue.size()
                );
                continue;
            }
            queue
                .add_used(mem, head, len)
                .map_err(|source| VirtioError::UsedRing {
                    queue: index,
                    source,
                })?;
            used += 1;
        }
        Ok(used)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

impl Persist for VirtioBlk {
    type State = VirtioBlkState;

    fn state(&self) -> VirtioBlkState {
        VirtioBlkState {
            acked_features: self.acked_features,
            capacity: self.capacity,
            read_only: self.read_only,
        }
    }

    /// Takes the driver's features; a state saved with another disk size or read-only
    /// setting is taken with a warning (the disk is the one this device was built with).
    fn restore(&mut self, s: &VirtioBlkState) -> Result<(), RestoreError> {
        if s.capacity != self.capacity || s.read_only != self.read_only {
            tracing::warn!(
                "virtio-blk: restoring a state saved with a {} sector{} disk onto a {} sector{} \
                 disk",
                s.capacity,
                if s.read_only { " read-only" } else { "" },
                self.capacity,
                if self.read_only { " read-only" } else { "" },
            );
        }
        self.acked_features = s.acked_features;
        Ok(())
    }
}
