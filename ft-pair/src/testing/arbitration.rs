//! Arbitration at the nodes: a primary that loses its backup races for the lock from the pair's
//! epoch through its pair manager; the backup races through the same path
//! ([`crate::arbitrate::race`], as `backup::run` does). The race itself on one lock is
//! `arbitrate`'s and `lock`'s tests.

use super::*;
use crate::arbitrate::{race, Lost};
use crate::link::Mode;

#[test]
fn a_primary_that_loses_its_backup_takes_the_next_epoch_and_attaches_the_next_backup_there() {
    let lock = TempLock::new("arbitrate-uncontested");
    let pair = Pair::start(Some(&lock), true);
    let epoch = pair.primary.epoch.expect("a lock");
    pair.cable.as_ref().expect("a cable").cut();

    wait_until("the primary to win the lock", || {
        pair.primary.link.mode() == Mode::Unprotected
    });
    assert_eq!(pair.primary.link.epoch(), epoch + 1);
    let held = lock.open().read().expect("the lock reads");
    assert_eq!((held.owner.as_str(), held.epoch), (PRIMARY, epoch + 1));
    // The guest was never stopped.
    assert_eq!(pair.primary.vcpu.asked().len(), pair.attached);
    // The lost backup, racing late from the old epoch, loses to the primary.
    wait_until("the backup to notice", || pair.backup.link.lost().is_some());
    match race(&lock.open(), epoch, BACKUP) {
        Err(Lost::Taken {
            owner, epoch: e, ..
        }) => assert_eq!((owner.as_str(), e), (PRIMARY, epoch + 1)),
        other => panic!("{other:?}"),
    }
    // A new backup is attached at the epoch the primary won.
    let next = Backup::attach(&pair.primary.addr).expect("the next backup attaches");
    assert_eq!(next.transfer.epoch, epoch + 1);
}

#[test]
fn a_primary_whose_backup_took_the_lock_is_fenced_at_its_stale_epoch() {
    let lock = TempLock::new("arbitrate-stale");
    let pair = Pair::start(Some(&lock), true);
    let epoch = pair.primary.epoch.expect("a lock");
    assert_eq!(race(&lock.open(), epoch, BACKUP).expect("wins"), epoch + 1);
    pair.cable.as_ref().expect("a cable").cut();

    pair.primary.vcpu.wait_asked(pair.attached, &["Stop"]);
    assert_eq!(pair.primary.link.mode(), Mode::Fenced);
    let Pair { primary, .. } = pair;
    let fenced = primary.shutdown().fenced.expect("fenced");
    assert!(
        fenced.starts_with(&format!("lost the lock file:{}", lock.path().display())),
        "{fenced}"
    );
    assert!(
        fenced.ends_with(&format!("to {BACKUP} at epoch {}", epoch + 1)),
        "{fenced}"
    );
    let held = lock.open().read().expect("the lock reads");
    assert_eq!((held.owner.as_str(), held.epoch), (BACKUP, epoch + 1));
}

#[test]
fn a_partitioned_pair_racing_for_the_lock_leaves_exactly_one_side_live() {
    let lock = TempLock::new("arbitrate-partition");
    let pair = Pair::start(Some(&lock), true);
    let epoch = pair.primary.epoch.expect("a lock");
    // Both sides lose each other at once; each races as soon as it notices.
    let backup = {
        let link = pair.backup.link.clone();
        let lock = lock.open();
        std::thread::spawn(move || {
            wait_until("the backup to notice", || link.lost().is_some());
            race(&lock, epoch, BACKUP)
        })
    };
    pair.cable.as_ref().expect("a cable").cut();
    let backup = backup.join().expect("the backup's race");
    wait_until("the primary's race", || {
        matches!(pair.primary.link.mode(), Mode::Unprotected | Mode::Fenced)
    });

    let held = lock.open().read().expect("the lock reads");
    assert_eq!(held.epoch, epoch + 1, "one test-and-set won, once");
    match backup {
        Ok(won) => {
            assert_eq!((won, held.owner.as_str()), (epoch + 1, BACKUP));
            assert_eq!(pair.primary.link.mode(), Mode::Fenced);
            pair.primary.vcpu.wait_asked(pair.attached, &["Stop"]);
        }
        Err(Lost::Taken {
            owner, epoch: e, ..
        }) => {
            assert_eq!((owner.as_str(), e), (PRIMARY, epoch + 1));
            assert_eq!(held.owner, PRIMARY);
            assert_eq!(pair.primary.link.mode(), Mode::Unprotected);
            assert_eq!(pair.primary.link.epoch(), epoch + 1);
            assert_eq!(pair.primary.vcpu.asked().len(), pair.attached);
        }
        Err(e) => panic!("{e}"),
    }
}
