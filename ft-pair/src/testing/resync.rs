//! A resync: the backup asks, the primary writes a full snapshot into the stream.

use super::*;

#[test]
fn a_resync_request_pauses_the_guest_for_a_full_snapshot_in_the_stream() {
    let pair = Pair::start(None, false);
    let (primary, backup) = (&pair.primary, &pair.backup);
    // The guest ran on after the attach.
    for pfn in 800..820 {
        scribble(&primary.mem, pfn, 99);
    }

    backup.link.request_resync("test: a divergence at exit 7");
    primary.vcpu.wait_asked(
        pair.attached,
        &["Pause", "Snapshot { full: true }", "Resume"],
    );
    let Record::Resync {
        rip,
        time_ns,
        exits,
        data,
    } = backup.record()
    else {
        panic!("not a resync");
    };
    // Relative to the recorder's base, as the stream's Base was.
    assert_eq!((rip, time_ns, exits), (0, 0, 0));
    let snap = Snapshot::decode(&data).expect("a snapshot");
    assert!(snap.full);
    assert_eq!(snap.vcpu.rip(), RIP);
    assert_eq!(
        snap.pages.pages,
        Pages::full(&primary.mem).expect("RAM reads").pages
    );
    // Restored, it is the primary's RAM.
    snap.pages.apply(&backup.mem, snap.full).expect("applies");
    assert_eq!(
        vmm::memory::digest(&backup.mem),
        vmm::memory::digest(&primary.mem)
    );
    wait_until("the resync to count", || primary.status()["resyncs"] == 1);
    // The backup stays attached.
    assert_eq!(primary.link.mode(), crate::link::Mode::Protected);
}
