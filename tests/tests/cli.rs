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

/// `--config FILE`: a test guest's flags from a file; a flag on the command line overrides the
/// file's key; a missing file, an unknown key and a wrong type are each one line naming the
/// file and the key, exit 2, and nothing runs.
#[test]
fn a_guest_runs_from_a_config_file_and_flags_override_it() {
    let dir = ftvmm_tests::scratch("config-file");
    let hello = test_guest("hello");
    let serial = dir.join("serial.txt");
    let config = dir.join("hello.toml");
    std::fs::write(
        &config,
        format!(
            "# a test guest\nrole = \"standalone\"\nkernel = \"{}\"\nmemory = \"16M\"\n\
             serial = \"file:{}\"\nno-deterministic-profile = false\n",
            hello.display(),
            serial.display()
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap();

    let run = Ftvmm::raw(&["--config", c]).run();
    run.assert_code(0);
    assert!(
        run.stdout.is_empty(),
        "serial went to the file: {}",
        run.stdout
    );
    let written = std::fs::read_to_string(&serial).unwrap();
    assert!(written.contains("hello from ftvmm"), "{written}");

    // The command line wins over the file.
    std::fs::remove_file(&serial).unwrap();
    let run = Ftvmm::raw(&["--config", c, "--serial", "stdio"]).run();
    run.assert_code(0);
    assert!(run.stdout.contains("hello from ftvmm"), "{}", run.stdout);
    assert!(!serial.exists(), "the file's serial = was overridden");

    let bad = |name: &str, text: &str, needle: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        let run = Ftvmm::raw(&["--config", p]).run();
        assert_eq!(run.code(), 2, "{name}: {}", run.stderr);
        let want = format!("ftvmm: error: {p}: {needle}");
        assert_eq!(
            run.stderr.trim_end(),
            want,
            "{name}: one line, naming file and key"
        );
        assert!(run.stdout.is_empty(), "{name}: nothing ran: {}", run.stdout);
    };
    let guest = format!("role = \"standalone\"\nkernel = \"{}\"\n", hello.display());
    bad(
        "unknown.toml",
        &format!("{guest}frobnicate = 1\n"),
        "key `frobnicate`: not a flag of ftvmm: the keys are the long flags without their \
         dashes (`ftvmm --help` lists them)",
    );
    bad(
        "type.toml",
        &format!("{guest}memory = true\n"),
        "key `memory`: expected a string (the value of `--memory` as on the command line), \
         got true",
    );
    bad(
        "value.toml",
        &format!("{guest}clock = \"wall\"\n"),
        "key `clock`: expected `host`, `virtual` or `virtual:STEP` (e.g. virtual:50us), got \
         `wall`",
    );
    let missing = dir.join("missing.toml");
    let run = Ftvmm::raw(&["--config", missing.to_str().unwrap()]).run();
    assert_eq!(run.code(), 2, "{}", run.stderr);
    assert_eq!(
        run.stderr.trim_end(),
        format!(
            "ftvmm: error: cannot read configuration {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
}
