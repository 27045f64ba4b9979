//! Attaching a backup: the primary's greet, pre-copy and final snapshot against the backup's
//! hello and transfer.

use super::*;
use logging_channel::{connect, Msg, PROTOCOL_VERSION};

#[test]
fn the_backup_receives_the_running_guest_byte_for_byte() {
    let lock = TempLock::new("attach");
    let primary = Primary::start(Script::precopy(), Some(&lock));
    let backup = Backup::attach(&primary.addr).expect("the backup attaches");

    // Pre-copy while the guest runs (600 pages dirty, then 400: shrinking, another round;
    // then 10: few enough), one pause for the final state, then the guest runs again.
    primary.vcpu.wait_asked(
        0,
        &[
            "StartDirtyTracking",
            "DirtyPages",
            "DirtyPages",
            "DirtyPages",
            "Pause",
            "Snapshot { full: false }",
            "Resume",
            "StopDirtyTracking",
        ],
    );
    // The backup's RAM is the primary's at the pause, byte for byte: the rounds, the last
    // harvest's pages and those written before the pause all arrived.
    assert_eq!(
        vmm::memory::digest(&backup.mem),
        vmm::memory::digest(&primary.mem)
    );
    // Round 1 carried the non-zero pages, rounds 2 and 3 what was dirtied.
    assert_eq!(backup.transfer.pages, INITIAL_PAGES + 600 + 400);
    let snap = &backup.transfer.snapshot;
    assert!(!snap.full);
    assert_eq!(snap.vcpu.rip(), RIP);
    assert_eq!(snap.pages.pages.len(), 5 + 10);
    assert_eq!(
        snap.delta, None,
        "the final state is a base for both page caches"
    );
    assert_eq!(Some(backup.transfer.epoch), primary.epoch);

    wait_until("the attach to count", || primary.status()["attaches"] == 1);
    let status = primary.status();
    assert_eq!(status["mode"], "protected");
    assert_eq!(status["attach"]["rounds"], 3);
    assert_eq!(status["attach"]["pages"], INITIAL_PAGES + 600 + 400 + 15);

    // The log stream starts right after the transfer: its header, then the base.
    let backup = backup.follow();
    let header = backup.header();
    assert_eq!(
        (header.config_hash, header.config_summary.as_str()),
        (HASH, SUMMARY)
    );
    assert_eq!(
        backup.record(),
        Record::Base {
            rip: 0,
            time_ns: 0,
            exits: 0
        }
    );
}

#[test]
fn a_hello_from_another_machine_or_version_or_a_second_backup_is_refused_with_its_reason() {
    let primary = Primary::start(Script::default(), None);
    let refusal = |r: Result<Backup, PairError>| match r {
        Err(PairError::Refused { reason, .. }) => reason,
        Err(e) => panic!("not a refusal: {e}"),
        Ok(_) => panic!("attached"),
    };

    let reason = refusal(Backup::attach_as(
        &primary.addr,
        HASH ^ 1,
        "another machine",
    ));
    assert_eq!(
        reason,
        format!("the machine flags differ: the primary has [{SUMMARY}], the backup has [another machine]")
    );

    // A backup of another protocol version (its hello by hand: ours is always this version).
    let conn = connect(&primary.addr, channel()).expect("connects");
    conn.send(Msg::Hello {
        version: PROTOCOL_VERSION + 1,
        config_hash: HASH,
        config_summary: SUMMARY.into(),
    })
    .expect("sends");
    let answer = conn.recv_timeout(LIMIT).expect("an answer");
    drop(conn);
    assert_eq!(
        answer,
        Some(Msg::Refused {
            reason: format!(
                "protocol version {} is not this primary's {PROTOCOL_VERSION}",
                PROTOCOL_VERSION + 1
            )
        })
    );
    assert!(
        primary.vcpu.asked().is_empty(),
        "a refusal touched the guest"
    );

    // The right machine attaches; while it is attached, another is turned away.
    let first = Backup::attach(&primary.addr).expect("the backup attaches");
    let reason = refusal(Backup::attach(&primary.addr));
    assert!(
        reason.starts_with("this primary already has a backup"),
        "{reason}"
    );
    primary.vcpu.wait_asked(0, QUICK_ATTACH);
    wait_until("the attach to count", || primary.status()["attaches"] == 1);
    assert_eq!(primary.status()["backups_refused"], 3);
    assert_eq!(primary.link.mode(), crate::link::Mode::Protected);
    drop(first);
}
