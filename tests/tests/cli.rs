//! Bad input gets one clear line on stderr and a non-zero exit code, and nothing runs.

use ftvmm_tests::{test_guest, Ftvmm};

fn fails_with(args: &[&str], needle: &str) {
    let run = Ftvmm::raw(args).run();
    assert_ne!(run.code(), 0, "expected failure for {args:?}");
    assert!(
        run.stderr.contains(needle),
        "stderr for {args:?} should mention `{needle}`:\n{}",
        run.stderr
    );
    assert!(
        run.stdout.is_empty(),
        "no guest output expected: {}",
        run.stdout
    );
}

#[test]
fn missing_kernel_is_one_clear_error() {
    fails_with(
        &["--role", "standalone", "--kernel", "/nonexistent/vmlinux"],
        "kernel /nonexistent/vmlinux",
    );
}

#[test]
fn missing_initrd_and_disk_are_clear_errors() {
    let hello = test_guest("hello");
    let k = hello.to_str().unwrap();
    fails_with(
        &[
            "--role",
            "standalone",
            "--kernel",
            k,
            "--initrd",
            "/nope.cpio",
        ],
        "initrd /nope.cpio",
    );
    fails_with(
        &["--role", "standalone", "--kernel", k, "--disk", "/nope.img"],
        "disk image /nope.img",
    );
}

#[test]
fn bad_flags_are_rejected() {
    let hello = test_guest("hello");
    let k = hello.to_str().unwrap();
    fails_with(
        &["--role", "standalone", "--kernel", k, "--memory", "12X"],
        "12X",
    );
    fails_with(
        &["--role", "standalone", "--kernel", k, "--memory", "8G"],
        "--memory",
    );
    fails_with(&["--role", "sideways", "--kernel", k], "sideways");
    fails_with(
        &["--role", "standalone", "--kernel", k, "--serial", "tcp:1"],
        "tcp:1",
    );
    fails_with(
        &["--role", "standalone", "--kernel", k, "--frobnicate"],
        "--frobnicate",
    );
}

#[test]
fn a_file_that_is_not_an_elf_is_rejected() {
    let dir = ftvmm_tests::scratch("not-an-elf");
    let p = dir.join("junk");
    std::fs::write(&p, b"this is not a kernel").unwrap();
    let run = Ftvmm::standalone(&p).run();
    assert_eq!(run.code(), 2, "{}", run.stderr);
    assert!(run.stderr.contains("cannot load kernel"), "{}", run.stderr);
}
