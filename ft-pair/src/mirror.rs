//! Mirrored disks: a pair that shares no storage ([`DiskMode::Mirrored`]). Each side keeps its
//! own copy of the guest's disk as part of its state. The primary's copy is a [`TrackedDisk`]
//! (writes go to the image at once, and the blocks they touch are marked while a backup
//! attaches); the disk travels with the VM at the attach, in the same pre-copy rounds as RAM
//! ([`Mirror`]: every block in the first round, then the blocks written since, the rest in the
//! final pause); the backup applies the replayed writes to its copy (ft-core's replay disk).
//!
//! [`DiskMode::Mirrored`]: ft_core::disk::DiskMode::Mirrored

use devices::disk::{Disk, ImageFile};
pub use ft_core::disk::BLOCK;
use ft_core::disk::{block_digest as digest, BlockDigest, BlockDigests, BlockSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Blocks in one transfer message (1 MiB before compression).
pub(crate) const BLOCKS_PER_MESSAGE: usize = 16;

/// The blocks written since tracking started: one bit a block, set after the write is in the
/// image, so that a block read for the transfer while it is being written is sent again.
#[derive(Debug)]
pub struct DirtyBlocks {
    set: BlockSet,
    tracking: AtomicBool,
}

impl DirtyBlocks {
    /// Tracking for a disk of `size` bytes, off.
    pub fn new(size: u64) -> DirtyBlocks {
        DirtyBlocks {
            set: BlockSet::new(size),
            tracking: AtomicBool::new(false),
        }
    }

    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.set.blocks()
    }

    /// Marks the blocks of `[offset, offset + len)`, if tracking.
    fn mark(&self, offset: u64, len: u64) {
        if self.tracking.load(Ordering::Acquire) {
            self.set.mark(offset, len);
        }
    }

    /// Starts tracking with nothing marked.
    pub fn start(&self) {
        self.set.clear();
        self.tracking.store(true, Ordering::Release);
    }

    /// The blocks marked since the last harvest, unmarked.
    pub fn take(&self) -> Vec<u64> {
        self.set.take()
    }

    /// Stops tracking.
    pub fn stop(&self) {
        self.tracking.store(false, Ordering::Release);
    }
}

/// The primary's copy of a mirrored disk: the image, with the blocks its writes touch marked
/// (for an attach while one runs, and always for the copy's block digests).
pub struct TrackedDisk {
    image: ImageFile,
    dirty: Arc<DirtyBlocks>,
    digests: Arc<BlockDigests>,
}

impl TrackedDisk {
    /// `image`, tracked in `dirty` and `digests`.
    pub fn new(image: ImageFile, dirty: Arc<DirtyBlocks>, digests: Arc<BlockDigests>) -> Self {
        TrackedDisk {
            image,
            dirty,
            digests,
        }
    }
}

impl Disk for TrackedDisk {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.image.write_at(buf, offset)?;
        self.dirty.mark(offset, buf.len() as u64);
        self.digests.mark(offset, buf.len() as u64);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.image.flush()
    }
}

/// The digest of every block of `image`, in order.
pub(crate) fn digests(image: &mut ImageFile) -> io::Result<Vec<BlockDigest>> {
    let size = image.size();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut out = Vec::with_capacity(size.div_ceil(BLOCK) as usize);
    let mut offset = 0;
    while offset < size {
        let len = BLOCK.min(size - offset) as usize;
        image.read_at(&mut buf[..len], offset)?;
        out.push(digest(&buf[..len]));
        offset += BLOCK;
    }
    Ok(out)
}

/// What the attach needs of the primary's mirrored disk: a handle to read blocks from while
/// the guest runs, and the blocks written meanwhile.
pub(crate) struct Mirror {
    pub(crate) image: ImageFile,
    pub(crate) dirty: Arc<DirtyBlocks>,
    /// The copy's block digests, kept current by the guest's writes (`ctl verify-disk`).
    pub(crate) digests: Arc<BlockDigests>,
    /// The copy's sidecar (current or stale, the generation a backup takes over at attach).
    pub(crate) meta: Arc<crate::sidecar::CopyMeta>,
}

impl Mirror {
    /// Reads `blocks` and compresses each (the last block of a disk whose size is not a
    /// multiple of [`BLOCK`] is short), leaving out each block whose digest is the one `theirs`
    /// has for it (the backup's copy holds it already; `theirs` empty: every block).
    pub(crate) fn read_changed(
        &mut self,
        blocks: &[u64],
        theirs: &[[u8; 16]],
    ) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let size = self.image.size();
        let mut out = Vec::with_capacity(blocks.len());
        let mut buf = vec![0u8; BLOCK as usize];
        for &b in blocks {
            let offset = b * BLOCK;
            let len = BLOCK.min(size.saturating_sub(offset)) as usize;
            if len == 0 {
                continue;
            }
            self.image.read_at(&mut buf[..len], offset)?;
            if theirs.get(b as usize) == Some(&digest(&buf[..len])) {
                continue;
            }
            out.push((b, lz4_flex::compress_prepend_size(&buf[..len])));
        }
        Ok(out)
    }
}

/// What is wrong with disk blocks a primary sent.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A block number past the end of this side's copy.
    #[error("disk block {block} is outside this side's copy ({size} bytes)")]
    Outside {
        /// The block.
        block: u64,
        /// This side's copy's size.
        size: u64,
    },
    /// A block whose claimed or actual size is not the block's.
    #[error("disk block {block}: {got:?} bytes, the block has {want}")]
    Size {
        /// The block.
        block: u64,
        /// The size claimed (before decompressing) or found (after); None if unreadable.
        got: Option<usize>,
        /// The block's size.
        want: usize,
    },
    /// The block does not decompress.
    #[error("disk block {block} does not decompress: {why}")]
    Corrupt {
        /// The block.
        block: u64,
        /// LZ4's error.
        why: String,
    },
    /// Writing this side's copy failed.
    #[error("writing disk block {block}: {source}")]
    Write {
        /// The block.
        block: u64,
        /// The system's error.
        source: io::Error,
    },
}

/// Writes blocks received for a mirrored disk into this side's copy, checking each against the
/// image's size before anything is allocated for it.
pub(crate) fn write_blocks(
    image: &mut ImageFile,
    blocks: &[(u64, Vec<u8>)],
) -> Result<(), BlockError> {
    let size = image.size();
    for (b, packed) in blocks {
        let block = *b;
        let offset = block
            .checked_mul(BLOCK)
            .filter(|o| *o < size)
            .ok_or(BlockError::Outside { block, size })?;
        let want = BLOCK.min(size - offset) as usize;
        let claimed = packed
            .get(..4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize);
        if claimed != Some(want) {
            return Err(BlockError::Size {
                block,
                got: claimed,
                want,
            });
        }
        let data =
            lz4_flex::decompress_size_prepended(packed).map_err(|e| BlockError::Corrupt {
                block,
                why: e.to_string(),
            })?;
        if data.len() != want {
            return Err(BlockError::Size {
                block,
                got: Some(data.len()),
                want,
            });
        }
        image
            .write_at(&data, offset)
            .map_err(|source| BlockError::Write { block, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_their_blocks_only_while_tracking() {
        let d = DirtyBlocks::new(10 * BLOCK + 100);
        assert_eq!(d.blocks(), 11);
        d.mark(0, 512);
        assert!(d.take().is_empty(), "not tracking yet");
        d.start();
        d.mark(BLOCK - 512, 1024); // blocks 0 and 1
        d.mark(10 * BLOCK, 100); // the short last block
        assert_eq!(d.take(), [0, 1, 10]);
        assert!(d.take().is_empty(), "a harvest unmarks");
        d.stop();
        d.mark(0, 512);
        assert!(d.take().is_empty());
    }

    #[test]
    fn blocks_travel_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("ftvmm-mirror-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        let size = 2 * BLOCK + 4096;
        std::fs::write(&a, (0..size).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
        std::fs::write(&b, vec![0u8; size as usize]).unwrap();
        let mut from = Mirror {
            image: ImageFile::open(&a).unwrap(),
            dirty: Arc::new(DirtyBlocks::new(size)),
            digests: Arc::new(BlockDigests::new(size)),
            meta: Arc::new(crate::sidecar::CopyMeta::open(&a, "test")),
        };
        let mut to = ImageFile::open(&b).unwrap();
        // The backup's copy is zeros: every block differs.
        let theirs = digests(&mut to).unwrap();
        assert_eq!(theirs.len(), 3);
        let blocks = from.read_changed(&[0, 1, 2], &theirs).unwrap();
        assert_eq!(blocks.len(), 3);
        write_blocks(&mut to, &blocks).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // Now equal: nothing to send, until a block changes.
        let theirs = digests(&mut to).unwrap();
        assert!(from.read_changed(&[0, 1, 2], &theirs).unwrap().is_empty());
        from.image.write_at(&[7u8; 512], BLOCK).unwrap();
        let changed = from.read_changed(&[0, 1, 2], &theirs).unwrap();
        assert_eq!(changed.iter().map(|(b, _)| *b).collect::<Vec<_>>(), [1]);
        // A block past the end, or one whose size is not the block's, is refused.
        assert!(matches!(
            write_blocks(&mut to, &[(3, blocks[0].1.clone())]),
            Err(BlockError::Outside { block: 3, .. })
        ));
        assert!(matches!(
            write_blocks(&mut to, &[(2, blocks[0].1.clone())]),
            Err(BlockError::Size { block: 2, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
