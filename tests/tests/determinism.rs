//! Two runs of the same guest with the same inputs take the same synchronous exits in the same
//! order: the same `exits=N exit-digest=H` line.
//!
//! The runs use `--clock virtual`, so that what is compared is the platform (VMM and devices),
//! not the host's scheduling: on the host clock, a run preempted for 10 ms while `ticks` prints
//! would see a timer interrupt at another exit, correctly, and the test would say nothing about
//! the VMM. Scripted input comes from a file, as a user would script it.

use ftvmm_tests::{scratch, test_guest, Ftvmm, Run};

fn twice(make: impl Fn() -> Ftvmm) -> (Run, Run) {
    let a = make().run();
    let b = make().run();
    a.assert_code(0);
    b.assert_code(0);
    (a, b)
}

fn same_digest(what: &str, a: &Run, b: &Run) {
    let (da, db) = (a.digest_line(), b.digest_line());
    assert!(da.is_some(), "{what}: no digest line:\n{}", a.stderr);
    assert_eq!(da, db, "{what}: two runs took different exits");
    assert_eq!(
        a.stdout, b.stdout,
        "{what}: two runs printed different output"
    );
}

fn virtual_clock(guest: &str) -> Ftvmm {
    Ftvmm::standalone(&test_guest(guest)).args(["--clock", "virtual"])
}

#[test]
fn ticks_is_deterministic() {
    let (a, b) = twice(|| virtual_clock("ticks"));
    same_digest("ticks", &a, &b);
    assert!(a.stdout.ends_with("tick 100\n"), "{}", a.stdout);
}

#[test]
fn echo_is_deterministic_with_the_same_script() {
    let dir = scratch("determinism-echo");
    let script = dir.join("input.txt");
    std::fs::write(&script, b"abc xyz\rq").unwrap();
    let (a, b) = twice(|| virtual_clock("echo").args(["--serial-input", script.to_str().unwrap()]));
    same_digest("echo", &a, &b);
    assert_eq!(a.stdout, "ABC XYZ\r\nbye\n");
}

#[test]
fn disk_is_deterministic() {
    let (a, b) = twice(|| {
        let dir = scratch("determinism-disk");
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        virtual_clock("disk").args(["--disk", path.to_str().unwrap()])
    });
    same_digest("disk", &a, &b);
}
