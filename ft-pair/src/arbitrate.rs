//! The one arbitration path: a side that lost its peer races for the lock from the pair's epoch
//! (docs/FAILOVER.md). A primary that loses its backup and a backup that loses its primary (or
//! is handed the guest) both come here; what each does with the outcome is its own.

use crate::lock::{Arbiter, LockError, Race};
use thiserror::Error;

/// Why a side may not go on.
#[derive(Debug, Error)]
pub enum Lost {
    /// Another side won the test-and-set (or the epoch had moved on).
    #[error("lost the lock {spec} to {owner} at epoch {epoch}")]
    Taken {
        /// The lock.
        spec: String,
        /// Who holds it now.
        owner: String,
        /// Its epoch now.
        epoch: u64,
    },
    /// The lock could not be reached or read: this side cannot prove it may go on.
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// Test-and-set on `arbiter` from `epoch` as `owner`: the epoch won, or why not.
pub fn race(arbiter: &dyn Arbiter, epoch: u64, owner: &str) -> Result<u64, Lost> {
    match arbiter.test_and_set(epoch, owner)? {
        Race::Won(e) => Ok(e),
        Race::Lost(state) => Err(Lost::Taken {
            spec: arbiter.spec(),
            owner: state.owner,
            epoch: state.epoch,
        }),
    }
}
