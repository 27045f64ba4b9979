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
        /// The lock as `--lock` named it (`file:PATH`, `etcd:...`).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::FileLock;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ftvmm-race-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    #[test]
    fn a_partitioned_pair_races_once_and_the_loser_learns_the_winner() {
        let p = tmp("pair");
        let lock = FileLock::new(&p);
        let epoch = lock.claim("primary@a:1").unwrap();
        // Both sides lost their peer at the same epoch: the primary and the backup race.
        let sides = ["primary@a:1", "backup@b:2"].map(|owner| {
            let p = p.clone();
            std::thread::spawn(move || race(&FileLock::new(&p), epoch, owner))
        });
        let outcomes: Vec<_> = sides.into_iter().map(|t| t.join().unwrap()).collect();
        let won: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(won, [&(epoch + 1)], "{outcomes:?}");
        let lost = outcomes.iter().find_map(|o| o.as_ref().err()).unwrap();
        let winner = lock.read().unwrap().owner;
        match lost {
            Lost::Taken {
                owner, epoch: e, ..
            } => {
                assert_eq!((owner, *e), (&winner, epoch + 1));
            }
            other => panic!("{other}"),
        }
        assert!(lost.to_string().starts_with("lost the lock "), "{lost}");
        // A side still at the old epoch (it woke up late) loses too.
        assert!(matches!(
            race(&lock, epoch, "late"),
            Err(Lost::Taken { .. })
        ));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_lock_that_cannot_be_read_is_a_loss_not_a_win() {
        let p = tmp("corrupt");
        std::fs::write(&p, [0x5a; 512]).unwrap();
        let lost = race(&FileLock::new(&p), 1, "backup").unwrap_err();
        assert!(
            matches!(lost, Lost::Lock(LockError::Corrupt { .. })),
            "{lost}"
        );
        let _ = std::fs::remove_file(&p);
    }
}
