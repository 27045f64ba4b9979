//! The disk as the determinism boundary sees it: the guest's virtio-blk device reads and
//! writes a [`devices::disk::Disk`] (the trait lives beside the device), and the boundary
//! decides which one.
//!
//! Disk contents are an input (a backup replaying a shared disk must not read it: the primary
//! may already have written past the point the backup is at, DESIGN.md section 7) and disk
//! writes are outputs (under fault tolerance they reach the image only once the backup holds
//! the log up to them). So the VMM never hands the image to the device itself: it asks the
//! boundary ([`crate::Boundary::disk`]), which wraps it as its role needs.

use std::collections::BTreeMap;

/// Where a pair keeps the guest's disk (docs/OPERATIONS.md, "Disk modes").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskMode {
    /// One image both hosts reach: disk contents are an input (reads travel in the log) and
    /// disk writes are outputs (held by the output rule until the backup has the log).
    #[default]
    Shared,
    /// Each host its own copy, part of each side's state: the primary writes its copy at once,
    /// the backup applies the same writes to its copy as it replays them, each side reads its
    /// own (only a CRC32C of each read travels, so a copy that differs is found at the first
    /// read of the difference). The copy travels with the VM when a backup attaches.
    Mirrored,
}

impl std::fmt::Display for DiskMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskMode::Shared => "shared",
            DiskMode::Mirrored => "mirrored",
        })
    }
}

impl std::str::FromStr for DiskMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(DiskMode::Shared),
            "mirrored" => Ok(DiskMode::Mirrored),
            other => Err(format!("unknown disk mode {other:?}: shared or mirrored")),
        }
    }
}

/// The unit of disk addressing (virtio-blk sectors).
pub const SECTOR: u64 = devices::virtio::block::SECTOR_SIZE;

/// Writes that the guest has made but that have not reached the image yet, by sector, each
/// tagged with the id of the write that produced it. Reads see them
/// (read-your-writes) until they are released.
#[derive(Debug, Default)]
pub struct HeldWrites {
    sectors: BTreeMap<u64, (u64, Box<[u8; SECTOR as usize]>)>,
    bytes: u64,
}

impl HeldWrites {
    /// Holds `data` at byte `offset`, produced by write `seq`.
    pub fn insert(&mut self, seq: u64, offset: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(SECTOR as usize).enumerate() {
            let mut sector = Box::new([0u8; SECTOR as usize]);
            sector[..chunk.len()].copy_from_slice(chunk);
            let key = offset / SECTOR + i as u64;
            if self.sectors.insert(key, (seq, sector)).is_none() {
                self.bytes += SECTOR;
            }
        }
    }

    /// Overlays the held sectors of `[offset, offset + buf.len())` on `buf`.
    pub fn overlay(&self, buf: &mut [u8], offset: u64) {
        if self.sectors.is_empty() {
            return;
        }
        let first = offset / SECTOR;
        let last = (offset + buf.len() as u64).div_ceil(SECTOR);
        for (&sector, (_, data)) in self.sectors.range(first..last) {
            let start = (sector - first) as usize * SECTOR as usize;
            let end = (start + SECTOR as usize).min(buf.len());
            buf[start..end].copy_from_slice(&data[..end - start]);
        }
    }

    /// Forgets the sectors of write `seq`, which has reached the image
    /// (a later write to the same sector stays held).
    pub fn release(&mut self, seq: u64, offset: u64, len: usize) {
        let first = offset / SECTOR;
        let last = (offset + len as u64).div_ceil(SECTOR);
        for sector in first..last {
            if self.sectors.get(&sector).is_some_and(|(s, _)| *s == seq) {
                self.sectors.remove(&sector);
                self.bytes -= SECTOR;
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.sectors.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_writes_overlay_and_release_by_version() {
        let mut h = HeldWrites::default();
        h.insert(5, 1024, &[1u8; 1024]);
        h.insert(7, 1536, &[2u8; 512]);
        let mut buf = vec![0u8; 2048];
        h.overlay(&mut buf, 512);
        assert_eq!(&buf[..512], &[0u8; 512][..]);
        assert_eq!(&buf[512..1024], &[1u8; 512][..]);
        assert_eq!(&buf[1024..1536], &[2u8; 512][..]);
        assert_eq!(h.bytes(), 1024);
        // The older write reaches the image: its newer overwrite stays held.
        h.release(5, 1024, 1024);
        assert_eq!(h.bytes(), 512);
        let mut buf = vec![9u8; 1024];
        h.overlay(&mut buf, 1024);
        assert_eq!(&buf[..512], &[9u8; 512][..]);
        assert_eq!(&buf[512..], &[2u8; 512][..]);
        h.release(7, 1536, 512);
        assert!(h.is_empty());
    }
}
