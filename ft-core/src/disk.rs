//! The disk as the determinism boundary sees it: the guest's virtio-blk device reads and
//! writes a [`devices::disk::Disk`] (the trait lives beside the device), and the boundary
//! decides which one.
//!
//! Disk contents are an input (a backup replaying a shared disk must not read it: the primary
//! may already have written past the point the backup is at, DESIGN.md section 7) and disk
//! writes are outputs (under fault tolerance they reach the image only once the backup holds
//! the log up to them). So the VMM never hands the image to the device itself: it asks the
//! boundary ([`crate::Boundary::disk`]), which wraps it as its role needs.

use devices::disk::Disk;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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

/// The unit a mirrored disk travels and is compared in (the last block of a disk whose size is
/// not a multiple is short).
pub const BLOCK: u64 = 64 * 1024;

/// A block's digest: the first 16 bytes of SHA-256 of its bytes.
pub type BlockDigest = [u8; 16];

/// The digest of one block's bytes.
pub fn block_digest(data: &[u8]) -> BlockDigest {
    use sha2::Digest;
    let full = sha2::Sha256::digest(data);
    let mut d = [0u8; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// One digest of a whole copy: the digest of its blocks' digests, in order.
pub fn copy_digest(blocks: &[BlockDigest]) -> BlockDigest {
    block_digest(blocks.as_flattened())
}

/// The blocks whose digests differ between two copies of the same size, in order.
pub fn differing(ours: &[BlockDigest], theirs: &[BlockDigest]) -> Vec<u64> {
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u64)
        .collect()
}

/// A set of a disk's blocks, one bit each, that writers mark without taking a lock.
#[derive(Debug)]
pub struct BlockSet {
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl BlockSet {
    /// An empty set for a disk of `size` bytes.
    pub fn new(size: u64) -> BlockSet {
        let blocks = size.div_ceil(BLOCK);
        BlockSet {
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
        }
    }

    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Adds the blocks of `[offset, offset + len)` (past the end: left out).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || self.blocks == 0 {
            return;
        }
        let first = offset / BLOCK;
        let last = (offset.saturating_add(len - 1) / BLOCK).min(self.blocks - 1);
        for b in first..=last {
            self.words[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::AcqRel);
        }
    }

    /// Adds every block.
    pub fn mark_all(&self) {
        self.mark(0, self.blocks * BLOCK);
    }

    /// Removes every block.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    /// The blocks in the set, in order, removed from it.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }
}

/// The digest of every block of a copy, kept current cheaply: a write marks its blocks stale
/// (after it is in the image), and [`BlockDigests::refresh`] hashes only the stale ones. A
/// block marked while it is being hashed stays stale for the next refresh, so a refresh with
/// the writer stopped leaves every digest exact.
#[derive(Debug)]
pub struct BlockDigests {
    stale: BlockSet,
    digests: Mutex<Vec<BlockDigest>>,
}

impl BlockDigests {
    /// A copy of `size` bytes whose digests are all still to be computed.
    pub fn new(size: u64) -> BlockDigests {
        let stale = BlockSet::new(size);
        stale.mark_all();
        let blocks = stale.blocks() as usize;
        BlockDigests {
            stale,
            digests: Mutex::new(vec![[0; 16]; blocks]),
        }
    }

    /// Takes digests computed elsewhere (the whole copy read at an attach): each block is
    /// current unless marked since. `digests` must be one a block.
    pub fn seed(&self, digests: &[BlockDigest]) {
        let mut d = self.digests.lock().unwrap_or_else(|e| e.into_inner());
        if digests.len() == d.len() {
            d.copy_from_slice(digests);
            self.stale.clear();
        }
    }

    /// Blocks of the copy.
    pub fn blocks(&self) -> u64 {
        self.stale.blocks()
    }

    /// The blocks of `[offset, offset + len)` were written.
    pub fn mark(&self, offset: u64, len: u64) {
        self.stale.mark(offset, len);
    }

    /// Hashes the blocks written since the last refresh, reading them from `image`; returns how
    /// many it hashed.
    pub fn refresh(&self, image: &mut dyn Disk) -> io::Result<u64> {
        let size = image.size();
        let stale = self.stale.take();
        let mut buf = vec![0u8; BLOCK as usize];
        let mut fresh = Vec::with_capacity(stale.len());
        for (i, &b) in stale.iter().enumerate() {
            let offset = b * BLOCK;
            let len = BLOCK.min(size.saturating_sub(offset)) as usize;
            if let Err(e) = image.read_at(&mut buf[..len], offset) {
                // Not hashed: still stale.
                for &b in &stale[i..] {
                    self.stale.mark(b * BLOCK, 1);
                }
                return Err(e);
            }
            fresh.push((b, block_digest(&buf[..len])));
        }
        let mut d = self.digests.lock().unwrap_or_else(|e| e.into_inner());
        for (b, digest) in &fresh {
            if let Some(slot) = d.get_mut(*b as usize) {
                *slot = *digest;
            }
        }
        Ok(fresh.len() as u64)
    }

    /// The digests as of the last refresh.
    pub fn current(&self) -> Vec<BlockDigest> {
        self.digests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The digests of a copy as it was at one point of its history, taken while it keeps being
/// written after that point: a reader hashes the blocks one by one ([`PointDigest::hash`]),
/// and the writer, before it writes a block nobody hashed yet, hashes what the block held
/// ([`PointDigest::before_write`]). Every block is read from the copy itself, so whatever
/// changed it (a write this side missed, a byte altered on the storage) shows.
#[derive(Debug)]
pub struct PointDigest {
    state: Mutex<PointState>,
}

#[derive(Debug)]
struct PointState {
    digests: Vec<Option<BlockDigest>>,
    left: usize,
}

impl PointDigest {
    /// A copy of `size` bytes as it is now.
    pub fn new(size: u64) -> PointDigest {
        let blocks = size.div_ceil(BLOCK) as usize;
        PointDigest {
            state: Mutex::new(PointState {
                digests: vec![None; blocks],
                left: blocks,
            }),
        }
    }

    fn hash_locked(state: &mut PointState, image: &mut dyn Disk, b: usize) -> io::Result<()> {
        if state.digests.get(b).is_none_or(|d| d.is_some()) {
            return Ok(());
        }
        let size = image.size();
        let offset = b as u64 * BLOCK;
        let len = BLOCK.min(size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        image.read_at(&mut buf, offset)?;
        state.digests[b] = Some(block_digest(&buf));
        state.left -= 1;
        Ok(())
    }

    /// Hashes block `b` from `image` unless it was hashed already.
    pub fn hash(&self, image: &mut dyn Disk, b: usize) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::hash_locked(&mut state, image, b)
    }

    /// `[offset, offset + len)` is about to be written through `image`: its blocks not hashed
    /// yet are hashed first, as they were at the point.
    pub fn before_write(&self, image: &mut dyn Disk, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.left == 0 {
            return Ok(());
        }
        let first = offset / BLOCK;
        let last = offset.saturating_add(len - 1) / BLOCK;
        for b in first..=last {
            Self::hash_locked(&mut state, image, b as usize)?;
        }
        Ok(())
    }

    /// Blocks of the copy.
    pub fn blocks(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .digests
            .len()
    }

    /// Every block's digest once all are hashed.
    pub fn finished(&self) -> Option<Vec<BlockDigest>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.left > 0 {
            return None;
        }
        Some(
            state
                .digests
                .iter()
                .map(|d| d.unwrap_or_default())
                .collect(),
        )
    }
}

/// The outcome of one comparison of the two copies of a mirrored disk at one log position
/// (`ftvmm ctl verify-disk`; docs/OPERATIONS.md), as either side reports it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DiskCheck {
    /// The verification's number (the primary's count).
    pub id: u64,
    /// The log position compared at: the sequence number of the `DiskVerify` record.
    pub position: u64,
    /// Synchronous exits since boot before that position (the backup's replay; a primary
    /// counts only those since it started recording, so it leaves this out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exits: Option<u64>,
    /// `match`, `mismatch`, or (the primary, until the backup answers) `pending`.
    pub result: String,
    /// Blocks of the copy.
    pub blocks: u64,
    /// Blocks whose digests differ.
    pub differing: u64,
    /// The first of them (at most [`FIRST_DIFFERING`]).
    pub first_differing: Vec<u64>,
    /// This side's copy's digest at the position (hex).
    pub digest: String,
    /// Blocks this side hashed for it (those written since its last digest of them).
    pub hashed_blocks: u64,
    /// How long this side took, ms (the primary: from the request to the record written).
    pub ms: f64,
    /// How long the primary's guest was paused for it, ms (the primary only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    /// How long the backup took at the position, ms, as it said (the primary only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_ms: Option<f64>,
}

/// How many differing blocks a [`DiskCheck`] names.
pub const FIRST_DIFFERING: usize = 16;

impl DiskCheck {
    /// Whether the copies were equal.
    pub fn matched(&self) -> bool {
        self.result == "match"
    }
}

/// Hex of a digest.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
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

    /// A disk of bytes in memory.
    struct Mem(Vec<u8>);

    impl Disk for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            self.0[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn digests_follow_writes_and_name_the_blocks_that_differ() {
        let size = 3 * BLOCK + 100;
        let mut a = Mem(vec![1; size as usize]);
        let (da, db) = (BlockDigests::new(size), BlockDigests::new(size));
        assert_eq!(da.blocks(), 4);
        assert_eq!(
            da.refresh(&mut a).unwrap(),
            4,
            "everything hashed the first time"
        );
        assert_eq!(da.refresh(&mut a).unwrap(), 0, "then nothing until a write");
        db.seed(&da.current());
        let mut b = Mem(a.0.clone());
        b.write_at(&[9], 2 * BLOCK + 5).unwrap();
        db.mark(2 * BLOCK + 5, 1);
        a.write_at(&[7; 200], BLOCK - 100).unwrap();
        da.mark(BLOCK - 100, 200);
        assert_eq!(da.refresh(&mut a).unwrap(), 2);
        assert_eq!(db.refresh(&mut b).unwrap(), 1);
        assert_eq!(differing(&da.current(), &db.current()), [0, 1, 2]);
        assert_ne!(copy_digest(&da.current()), copy_digest(&db.current()));
        // The short last block, and a range past the end, are marked within the disk.
        let set = BlockSet::new(size);
        set.mark(3 * BLOCK + 50, 10 * BLOCK);
        set.mark(BLOCK, 0);
        assert_eq!(set.take(), [3]);
        assert!(set.take().is_empty());
    }

    #[test]
    fn a_point_digest_is_the_copy_at_its_point_whatever_is_written_after() {
        let size = 3 * BLOCK + 7;
        let mut disk = Mem((0..size).map(|i| (i % 249) as u8).collect());
        let at_point: Vec<BlockDigest> = disk.0.chunks(BLOCK as usize).map(block_digest).collect();
        let p = PointDigest::new(size);
        assert_eq!(p.blocks(), 4);
        p.hash(&mut disk, 0).unwrap();
        // A write after the point to blocks 0 (hashed) and 1 (not yet): 1 is hashed first.
        p.before_write(&mut disk, BLOCK - 2, 4).unwrap();
        disk.write_at(&[0xee; 4], BLOCK - 2).unwrap();
        assert!(p.finished().is_none());
        for b in 0..5 {
            p.hash(&mut disk, b).unwrap(); // 4: past the end, nothing
        }
        assert_eq!(p.finished().unwrap(), at_point);
    }
}
