//! A planned switchover: the primary pauses, drains, hands the stream's end over, and the
//! backup's answer (or its loss) decides where the guest runs.

use super::*;
use crate::api::{SwitchoverPlan, Then};
use crate::arbitrate::race;
use crate::link::Mode;
use logging_channel::Msg;

/// Asks `pair`'s primary for a switchover and waits for the handover to reach the backup:
/// the request's answer, to join.
fn hand_over(pair: &Pair) -> JoinHandle<serde_json::Value> {
    let answer = pair
        .primary
        .request(Request::Switchover(SwitchoverPlan::then(Then::Stop)));
    wait_until("the handover", || pair.backup.link.handover().is_some());
    assert_eq!(
        pair.backup.link.handover(),
        Some(pair.primary.link.epoch()),
        "handed over at the pair's epoch"
    );
    // Everything the guest produced has left: released up to the end of the stream.
    assert_eq!(pair.backup.link.released(), pair.backup.link.received());
    answer
}

fn error(answer: JoinHandle<serde_json::Value>) -> String {
    let answer = answer.join().expect("the API answers");
    answer["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {answer}"))
        .to_string()
}

#[test]
fn a_confirmed_handover_leaves_the_guest_to_the_backup_and_stops_this_side() {
    let lock = TempLock::new("switchover-done");
    let pair = Pair::start(Some(&lock), false);
    let epoch = pair.primary.epoch.expect("a lock");
    let answer = hand_over(&pair);
    // The backup takes the lock from the handover's epoch, goes live, says where.
    assert_eq!(race(&lock.open(), epoch, BACKUP).expect("wins"), epoch + 1);
    pair.backup
        .link
        .connection()
        .send(Msg::HandedOver {
            listen: "0.0.0.0:7000".into(),
        })
        .expect("sends");

    let answer = answer.join().expect("the API answers");
    assert_eq!(answer["switchover"], "done", "{answer}");
    assert_eq!(answer["new_primary"], "127.0.0.1:7000");
    assert_eq!(answer["then"], "stop");
    assert_eq!(answer["epoch"], epoch);
    // Paused for good: never resumed here.
    pair.primary
        .vcpu
        .wait_asked(pair.attached, &["Pause", "Stop"]);
    assert_eq!(pair.primary.link.mode(), Mode::HandedOver);
    let Pair { primary, .. } = pair;
    let ending = primary.shutdown();
    assert_eq!(
        ending.handed_over.map(|h| h.addr).as_deref(),
        Some("127.0.0.1:7000")
    );
    assert_eq!(ending.fenced, None);
    // The old primary leaves the lock to the new one.
    let held = lock.open().read().expect("the lock reads");
    assert_eq!((held.owner.as_str(), held.epoch), (BACKUP, epoch + 1));
}

#[test]
fn a_declined_handover_resumes_the_guest_on_the_side_that_wins_the_lock() {
    let lock = TempLock::new("switchover-declined");
    let pair = Pair::start(Some(&lock), false);
    let epoch = pair.primary.epoch.expect("a lock");
    let answer = hand_over(&pair);
    pair.backup
        .link
        .connection()
        .send(Msg::Refused {
            reason: "not now".into(),
        })
        .expect("sends");

    let why = error(answer);
    assert!(
        why.contains("did not take the guest: it declined: not now"),
        "{why}"
    );
    assert!(
        why.ends_with("this side won the lock and runs on, UNPROTECTED"),
        "{why}"
    );
    pair.primary
        .vcpu
        .wait_asked(pair.attached, &["Pause", "Resume"]);
    assert_eq!(pair.primary.link.mode(), Mode::Unprotected);
    assert_eq!(pair.primary.link.epoch(), epoch + 1);
    let held = lock.open().read().expect("the lock reads");
    assert_eq!((held.owner.as_str(), held.epoch), (PRIMARY, epoch + 1));
}

#[test]
fn a_backup_lost_after_taking_the_lock_in_a_handover_fences_this_side() {
    let lock = TempLock::new("switchover-lost");
    let pair = Pair::start(Some(&lock), true);
    let epoch = pair.primary.epoch.expect("a lock");
    let answer = hand_over(&pair);
    // The backup takes the lock, and is lost before it confirms.
    assert_eq!(race(&lock.open(), epoch, BACKUP).expect("wins"), epoch + 1);
    pair.cable.as_ref().expect("a cable").cut();

    let why = error(answer);
    assert!(why.ends_with("; this side is fenced"), "{why}");
    pair.primary
        .vcpu
        .wait_asked(pair.attached, &["Pause", "Stop"]);
    assert_eq!(pair.primary.link.mode(), Mode::Fenced);
    let Pair { primary, .. } = pair;
    let ending = primary.shutdown();
    assert!(ending.handed_over.is_none());
    let fenced = ending.fenced.expect("fenced");
    assert!(fenced.contains("did not take the guest"), "{fenced}");
    // The lock stays the backup's: a fenced side does not free it.
    assert_eq!(lock.open().read().expect("reads").owner, BACKUP);
}

#[test]
fn without_a_lock_a_handover_that_fails_fences_this_side() {
    let pair = Pair::start(None, false);
    let answer = hand_over(&pair);
    pair.backup
        .link
        .connection()
        .send(Msg::Refused {
            reason: "not now".into(),
        })
        .expect("sends");

    let why = error(answer);
    assert!(why.contains("it declined: not now"), "{why}");
    assert!(why.ends_with("; this side is fenced"), "{why}");
    pair.primary
        .vcpu
        .wait_asked(pair.attached, &["Pause", "Stop"]);
    assert_eq!(pair.primary.link.mode(), Mode::Fenced);
}

#[test]
fn a_switchover_without_a_backup_is_refused_and_leaves_the_guest_alone() {
    let primary = Primary::start(Script::default(), None);
    let why = error(primary.request(Request::Switchover(SwitchoverPlan::then(Then::Stop))));
    assert_eq!(
        why,
        "no backup to hand over to: this primary is unprotected"
    );
    assert!(primary.vcpu.asked().is_empty());
    assert_eq!(primary.link.mode(), Mode::Unprotected);
}
