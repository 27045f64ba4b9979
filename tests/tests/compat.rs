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
    // The run uses what the probe chose for this host.
    let chosen = &ftvmm_tests::host()["mechanisms"];
    let on = |b: &serde_json::Value| if b == true { "on" } else { "off" };
    let want = format!(
        "mechanisms: compat {}, irq windows {}",
        on(&chosen["compat"]),
        on(&chosen["irq_window"])
    );
    assert!(r.stderr.contains(&want), "want `{want}` in:\n{}", r.stderr);
    assert_eq!(chosen["compat"] == true, nested_host(), "{chosen}");
}

/// What happened to one instruction of the census guest.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Executed with the SDM's result (or raised exactly the fault the entry expects).
    Ok,
    /// Executed, with another result (the census prints the value).
    Wrong(String),
    /// Raised an exception the entry did not expect (vector).
    Fault(u32),
    /// Stopped the VM: an emulation failure neither KVM nor ftvmm completes (ftvmm's line).
    Stops(String),
}

impl Outcome {
    fn cell(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Wrong(_) => "wrong result".into(),
            Outcome::Fault(6) => "#UD".into(),
            Outcome::Fault(13) => "#GP".into(),
            Outcome::Fault(v) => format!("fault {v}"),
            Outcome::Stops(_) => "stops the VM".into(),
        }
    }
}

/// Runs the census guest from its first entry to its last with `--kvm-compat <compat>`,
/// booting it again past each instruction that stops the VM (`census.from=`).
fn census(compat: &str) -> Vec<(String, Outcome)> {
    let mut rows: Vec<(String, Outcome)> = Vec::new();
    let mut from = 0usize;
    loop {
        let r = Ftvmm::standalone(&test_guest("census"))
            .args([
                "--kvm-compat",
                compat,
                "--cmdline",
                &format!("census.from={from}"),
            ])
            .run();
        let mut stopped = None;
        for line in r.stdout.lines() {
            let Some(rest) = line.strip_prefix("census: ") else {
                continue;
            };
            let mut w = rest.split_whitespace();
            let (index, name) = (w.next().unwrap(), w.next().unwrap());
            let index: usize = index.parse().unwrap();
            assert_eq!(index, rows.len(), "{}", r.stdout);
            let outcome = match (w.next(), w.next()) {
                (Some("ok"), None) => Outcome::Ok,
                (Some("wrong"), Some(v)) => Outcome::Wrong(v.to_string()),
                (Some("fault"), Some(v)) => Outcome::Fault(v.parse().unwrap()),
                (None, None) => {
                    // The VM stopped in this entry: ftvmm says which instruction.
                    let why = r
                        .stderr
                        .lines()
                        .find(|l| l.starts_with("ftvmm: error"))
                        .unwrap_or("(no error line)")
                        .to_string();
                    assert_eq!(r.code(), 2, "{}\n{}", r.stdout, r.stderr);
                    stopped = Some(index);
                    Outcome::Stops(why)
                }
                other => panic!("census line {line:?}: {other:?}"),
            };
            rows.push((name.to_string(), outcome));
        }
        match stopped {
            Some(i) => from = i + 1,
            None => {
                assert!(
                    r.stdout.ends_with("census done\n"),
                    "{}\n{}",
                    r.stdout,
                    r.stderr
                );
                r.assert_code(0);
                return rows;
            }
        }
    }
}

/// Instructions the census finds this KVM and ftvmm cannot run right, and why a guest kernel
/// on ftvmm does not run them (docs/CENSUS.md).
const NOT_FOR_GUEST_KERNELS: &[(&str, &str)] = &[
    ("movbe", "movbe hidden"),
    ("lzcnt", "abm hidden"),
    ("tzcnt", "bmi1 hidden"),
    ("andn", "bmi1 hidden"),
    ("bextr", "bmi1 hidden"),
    ("blsr", "bmi1 hidden"),
    ("shlx", "bmi2 hidden"),
    ("rorx", "bmi2 hidden"),
    ("pext", "bmi2 hidden"),
    ("mulx", "bmi2 hidden"),
    ("crc32", "sse4_2 hidden"),
    ("fld1-faddp-fistp", "no x87 arithmetic in kernels"),
    ("fnsave-frstor", "FXSR present"),
    ("movd-xmm", "sse2 users hidden"),
    ("movq-xmm", "sse2 users hidden"),
    ("movaps", "sse2 users hidden"),
    ("pxor", "sse2 users hidden"),
    ("paddd", "sse2 users hidden"),
    ("pshufd", "sse2 users hidden"),
    ("pcmpeqb-pmovmskb", "sse2 users hidden"),
    ("addsd-cvtsd2si", "sse2 users hidden"),
    ("pshufb-ssse3", "ssse3 hidden"),
    ("pinsrd-sse41", "sse4_1 hidden"),
    ("pcmpestri-sse42", "sse4_2 hidden"),
    ("aesenc", "aes hidden"),
    ("pclmulqdq", "pclmulqdq hidden"),
    ("clwb", "clwb hidden"),
    ("rdfsbase", "fsgsbase hidden"),
    ("rdtscp", "rdtscp hidden"),
    ("rdpid", "rdpid hidden"),
    ("rdrand", "rdrand hidden"),
    ("rdseed", "rdseed hidden"),
    ("rdpkru", "pku hidden"),
];

/// Where QEMU's TCG (the stock lane's CPU, docs/HARDWARE.md) departs from the SDM: not
/// ftvmm's nor KVM's doing, and hardware does what the census expects.
const TCG_DEPARTS: &[(&str, &str)] = &[(
    "ldmxcsr-reserved",
    "QEMU 7.2's LDMXCSR loads reserved MXCSR bits instead of raising #GP",
)];

#[test]
fn instruction_census() {
    let on = census("on");
    assert!(on.len() >= 80, "{on:?}");
    let tcg = ftvmm_tests::under_tcg();
    // Everything a guest kernel on ftvmm may run works: every instruction that does not is
    // one the platform keeps from the kernel, for the reason the list gives.
    for (name, outcome) in &on {
        if *outcome != Outcome::Ok {
            if tcg && TCG_DEPARTS.iter().any(|(n, _)| n == name) {
                eprintln!("{name}: {outcome:?} under TCG (known: {TCG_DEPARTS:?})");
                continue;
            }
            assert!(
                NOT_FOR_GUEST_KERNELS.iter().any(|(n, _)| n == name),
                "{name}: {outcome:?}, and the platform does not keep it from guest kernels"
            );
        }
    }
    for name in [
        "cmpxchg16b",
        "ldmxcsr-stmxcsr",
        "fnstcw-fldcw",
        "popcnt",
        "int3",
        "verr-verw",
        "lar",
        "lsl",
        "xgetbv",
    ] {
        assert!(
            on.iter().any(|(n, o)| n == name && *o == Outcome::Ok),
            "{name}: {on:?}"
        );
    }
    if !nested_host() {
        return;
    }
    // The table of docs/CENSUS.md is this host's: each row starts with what was measured.
    let off = census("off");
    assert_eq!(off.len(), on.len());
    let doc = std::fs::read_to_string(ftvmm_tests::root().join("docs/CENSUS.md")).unwrap();
    let mut table = String::new();
    let mut missing = Vec::new();
    for ((name, a), (_, b)) in off.iter().zip(&on) {
        let why = NOT_FOR_GUEST_KERNELS
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, w)| w);
        let row = format!("| `{name}` | {} | {} |", a.cell(), b.cell());
        table += &format!("{row} {why} |\n");
        if !doc.lines().any(|l| l.starts_with(&row)) {
            missing.push(row);
        }
    }
    eprintln!("measured:\n{table}");
    assert!(missing.is_empty(), "docs/CENSUS.md lacks {missing:#?}");
}
