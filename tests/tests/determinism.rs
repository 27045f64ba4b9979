//! Two runs of the same guest with the same inputs take the same synchronous exits in the same
//! order: the same `exits=N exit-digest=H` line.

use ftvmm_tests::{test_guest, Ftvmm, Run};
use std::time::Duration;

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

#[test]
fn ticks_is_deterministic() {
    let (a, b) = twice(|| Ftvmm::standalone(&test_guest("ticks")));
    same_digest("ticks", &a, &b);
}

#[test]
fn echo_is_deterministic_with_the_same_script() {
    let (a, b) = twice(|| {
        Ftvmm::standalone(&test_guest("echo")).input(b"abc xyz\rq", Duration::from_millis(100))
    });
    same_digest("echo", &a, &b);
}

#[test]
fn disk_is_deterministic() {
    let (a, b) = twice(|| {
        let img = crate_disk();
        Ftvmm::standalone(&test_guest("disk")).args(["--disk", img.to_str().unwrap()])
    });
    same_digest("disk", &a, &b);
}

fn crate_disk() -> std::path::PathBuf {
    let dir = ftvmm_tests::scratch("determinism-disk");
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}
