//! The compatibility paths for this project's nested KVM (vmm/src/compat.rs): guests that make
//! system calls from user mode, take user page faults, take timer interrupts in user mode and
//! execute the instructions this KVM cannot emulate. Each passes with `--kvm-compat on`, and
//! two runs take the same exits.
//!
//! On a host whose KVM does not need the paths (`/sys/module/kvm_pvm` absent), `--kvm-compat
//! on` still runs them: every path is then exercised less (SYSCALL works natively), and the
//! tests still check the guests' own results.

use ftvmm_tests::{test_guest, Ftvmm, Run};

fn run(name: &str) -> Run {
    let run = Ftvmm::standalone(&test_guest(name))
        .args(["--kvm-compat", "on", "--log-level", "info"])
        .run();
    run.assert_code(0);
    run
}

fn nested_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn deterministic(name: &str) {
    let (a, b) = (run(name), run(name));
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(
        a.digest_line(),
        b.digest_line(),
        "{name}: two runs took different exits"
    );
}

#[test]
fn system_calls_from_user_mode() {
    let r = run("usersys");
    assert_eq!(r.stdout, "usersys ok calls=1000\n");
    if nested_host() {
        // 1000 adds, 22 putc, 1 exit: every one completed by the VMM.
        assert_eq!(r.stat("syscalls-completed"), 1023, "{}", r.stderr);
    }
    deterministic("usersys");
}

#[test]
fn user_page_faults_resolved_by_the_guest_kernel() {
    let r = run("userpf");
    assert_eq!(r.stdout, "userpf ok faults=64\n");
    if nested_host() {
        // With SYSCALL enabled the VMM watches #PF: each fault is stepped over to the guest.
        assert!(r.stat("page-faults-stepped") >= 64, "{}", r.stderr);
    }
    deterministic("userpf");
}

#[test]
fn timer_interrupts_in_user_mode() {
    let r = run("usertimer");
    assert_eq!(r.stdout, "usertimer ok ticks=50\n");
}

#[test]
fn instructions_the_emulator_cannot_run() {
    let r = run("insns");
    for insn in [
        "popcnt", "stac", "clac", "int3", "fnclex", "fnstsw", "fnstcw", "fldcw", "fwait",
    ] {
        assert!(
            r.stdout.contains(&format!("insn {insn} ok\n")),
            "{}",
            r.stdout
        );
    }
    assert!(r.stdout.ends_with("insns ok\n"), "{}", r.stdout);
    deterministic("insns");
}

#[test]
fn without_the_paths_the_gaps_show() {
    if !nested_host() {
        return;
    }
    // The same guest, paths off: the emulation failure stops the VM with one clear line.
    let r = Ftvmm::standalone(&test_guest("insns"))
        .args(["--kvm-compat", "off"])
        .run();
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stderr.contains("--kvm-compat is off"), "{}", r.stderr);
}

#[test]
fn the_mode_is_logged() {
    let r = Ftvmm::standalone(&test_guest("hello"))
        .args(["--log-level", "info"])
        .run();
    r.assert_code(0);
    let want = if nested_host() {
        "paths on"
    } else {
        "paths off"
    };
    assert!(r.stderr.contains(want), "{}", r.stderr);
}
