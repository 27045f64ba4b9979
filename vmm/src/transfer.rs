//! What a live state transfer sends, primary to backup, inside the logging channel's
//! `Transfer` messages (docs/PROTOCOL.md, "State transfer").
//!
//! ```text
//!  primary                                        backup
//!  round 1: every non-zero page  -- Pages -->     zeroed RAM, pages written in
//!  round n: pages dirtied since  -- Pages -->     ...
//!  (pause) final pages + vCPU, devices, clock
//!                                -- Final -->     restore; replay the log from here
//! ```
//!
//! Each message is `lz4(postcard(TransferMsg))` with the uncompressed size first, like a
//! snapshot; a decoder refuses sizes no valid message has before allocating.

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest pages per `Pages` message (1 MiB uncompressed).
pub const PAGES_PER_MESSAGE: usize = 256;
const PAGE: u64 = 4096;
/// The largest uncompressed transfer message: a full `Pages` batch with room to spare, or a
/// final snapshot (bounded like a snapshot file's body).
const MAX_MESSAGE: usize = (crate::config::MAX_MEMORY_BYTES as usize) + (64 << 20);

/// One message of a transfer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum TransferMsg {
    /// Guest pages of pre-copy round `round` (1-based): (page number, 4096 bytes).
    Pages {
        /// The round.
        round: u32,
        /// The pages.
        #[serde(with = "ft_core::wire::numbered_bytes")]
        pages: Vec<(u64, Vec<u8>)>,
    },
    /// The end of the transfer: an encoded incremental snapshot (the last pages, vCPU, devices,
    /// clock, exit digest), taken while the primary was paused.
    Final {
        /// `Snapshot::encode` of it.
        #[serde(with = "serde_bytes")]
        snapshot: Vec<u8>,
        /// The pair's epoch in the lock (0 without one): what the backup races from if the
        /// primary is lost.
        epoch: u64,
    },
    /// Blocks of a mirrored disk (a pair that shares no storage), in pre-copy round `round`
    /// or, with round 0, in the final pause: (block number, the block LZ4-compressed with its
    /// size first). The block size is the sender's and receiver's shared constant.
    DiskBlocks {
        /// The round.
        round: u32,
        /// The blocks.
        #[serde(with = "ft_core::wire::numbered_bytes")]
        blocks: Vec<(u64, Vec<u8>)>,
    },
    /// Backup -> primary, first after the welcome when the disk is mirrored: a digest of each
    /// block of the backup's copy (SHA-256, the first 16 bytes), so that the first round sends
    /// only the blocks that differ (a copy that shares history with the primary's, such as
    /// the old primary's after a failover, needs little).
    DiskDigests {
        /// One a block, in order.
        digests: Vec<[u8; 16]>,
    },
    /// Primary -> backup, in the final pause before `Final` when the disk is mirrored: the
    /// generation of the primary's copy (its sidecar's), which the backup's copy holds from
    /// now on.
    DiskGeneration {
        /// The generation id.
        generation: String,
    },
}

/// What goes wrong with a transfer message or the pages it carries.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The message does not encode (postcard's error).
    #[error("cannot encode a transfer message: {0}")]
    Encode(String),
    /// The bytes received are not a transfer message (the decoder's error).
    #[error("transfer message does not decode: {0}")]
    Decode(String),
    /// A page number outside guest RAM.
    #[error("page {0:#x} is outside guest RAM")]
    PageOutside(u64),
    /// A page that is not 4096 bytes.
    #[error("page {pfn:#x} has {len} bytes")]
    PageSize {
        /// The page number.
        pfn: u64,
        /// Its length as received.
        len: usize,
    },
    /// Writing a page into guest RAM failed (vm-memory's error).
    #[error("page {pfn:#x}: {why}")]
    Memory {
        /// The page number.
        pfn: u64,
        /// The error.
        why: String,
    },
}

impl TransferMsg {
    /// Encodes for the channel.
    pub fn encode(&self) -> Result<Vec<u8>, TransferError> {
        let raw = postcard::to_stdvec(self).map_err(|e| TransferError::Encode(e.to_string()))?;
        Ok(lz4_flex::compress_prepend_size(&raw))
    }

    /// Decodes what [`TransferMsg::encode`] made, refusing impossible sizes before allocating.
    pub fn decode(bytes: &[u8]) -> Result<TransferMsg, TransferError> {
        let raw = ft_core::log::unpack_lz4(bytes, MAX_MESSAGE)
            .map_err(|e| TransferError::Decode(e.to_string()))?;
        postcard::from_bytes(&raw).map_err(|e| TransferError::Decode(e.to_string()))
    }
}

/// Reads pages `pfns` of guest RAM (while the guest may run: a page torn by a concurrent write
/// is dirty again and goes in a later round). With `skip_zero`, zero pages are left out (round
/// 1, onto a backup whose RAM was zeroed).
pub fn read_pages(mem: &GuestMemoryMmap, pfns: &[u64], skip_zero: bool) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::with_capacity(pfns.len());
    for &pfn in pfns {
        let mut buf = vec![0u8; PAGE as usize];
        if mem.read_slice(&mut buf, GuestAddress(pfn * PAGE)).is_err() {
            continue;
        }
        if skip_zero && buf.iter().all(|b| *b == 0) {
            continue;
        }
        out.push((pfn, buf));
    }
    out
}

/// Writes received pages into guest RAM, refusing pages outside it or of the wrong size.
pub fn write_pages(mem: &GuestMemoryMmap, pages: &[(u64, Vec<u8>)]) -> Result<(), TransferError> {
    let ram = mem.last_addr().0 + 1;
    for (pfn, data) in pages {
        let addr = pfn.checked_mul(PAGE).filter(|a| a + PAGE <= ram);
        let Some(addr) = addr else {
            return Err(TransferError::PageOutside(*pfn));
        };
        if data.len() != PAGE as usize {
            return Err(TransferError::PageSize {
                pfn: *pfn,
                len: data.len(),
            });
        }
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| TransferError::Memory {
                pfn: *pfn,
                why: e.to_string(),
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let msg = TransferMsg::Pages {
            round: 1,
            pages: vec![(3, vec![7u8; 4096])],
        };
        let bytes = msg.encode().unwrap();
        match TransferMsg::decode(&bytes).unwrap() {
            TransferMsg::Pages { round, pages } => {
                assert_eq!(round, 1);
                assert_eq!(pages, vec![(3, vec![7u8; 4096])]);
            }
            other => panic!("{other:?}"),
        }
        let mut lie = (1u32 << 30).to_le_bytes().to_vec();
        lie.extend_from_slice(&[0; 8]);
        assert!(TransferMsg::decode(&lie).is_err());
        assert!(TransferMsg::decode(&[1]).is_err());
        let mem = crate::memory::create(8 << 20).unwrap();
        assert!(write_pages(&mem, &[(1 << 40, vec![0; 4096])]).is_err());
        assert!(write_pages(&mem, &[(1, vec![0; 10])]).is_err());
        write_pages(&mem, &[(1, vec![9; 4096])]).unwrap();
        assert_eq!(read_pages(&mem, &[0, 1], true).len(), 1);
    }
}
