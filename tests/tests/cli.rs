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

/// A bzImage around `elf`: a boot sector and setup header (boot protocol 2.15) whose payload is
/// `elf` gzipped, as the kernel's build makes one with CONFIG_KERNEL_GZIP.
fn bzimage_of(elf: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let gz = std::process::Command::new("gzip")
        .args(["-n", "-9", "-c"])
        .arg(elf)
        .output()
        .expect("gzip");
    assert!(gz.status.success());
    let mut image = vec![0u8; 5 * 512];
    image[0x1f1] = 4; // setup sectors
    image[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    image[0x248..0x24c].copy_from_slice(&0x40u32.to_le_bytes());
    image[0x24c..0x250].copy_from_slice(&(gz.stdout.len() as u32).to_le_bytes());
    image.extend_from_slice(&[0u8; 0x40]);
    image.extend_from_slice(&gz.stdout);
    let p = dir.join("bzImage");
    std::fs::write(&p, image).unwrap();
    p
}

/// A bzImage with no kallsyms table (a test guest inside) is refused in one line that says
/// what to do; with what it says (no RDTSC or window sites), it boots: the ELF inside runs.
#[test]
fn a_bzimage_without_kallsyms_says_what_to_do_and_boots_without_sites() {
    let dir = ftvmm_tests::scratch("bzimage-no-kallsyms");
    let bz = bzimage_of(&test_guest("hello"), &dir);
    let run = Ftvmm::standalone(&bz).run();
    assert_eq!(run.code(), 2, "{}", run.stderr);
    // Before the VM exists: the only line.
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    let err = run.stderr.trim_end();
    assert!(
        err.contains("is a bzImage whose symbols ftvmm cannot read")
            && err.contains("no kallsyms table")
            && err.contains("--guest-tsc off --window-sites none"),
        "{}",
        run.stderr
    );
    let elf = Ftvmm::standalone(&test_guest("hello")).run();
    elf.assert_code(0);
    let run = Ftvmm::standalone(&bz)
        .args(["--guest-tsc", "off", "--window-sites", "none"])
        .run();
    run.assert_code(0);
    assert_eq!(run.stdout, elf.stdout);
}
