//! The host probe (vmm/src/host.rs, docs/HARDWARE.md): `ftvmm probe` answers every question,
//! a run uses the mechanisms it chose, a recording's header carries them, and a replay on a
//! host that cannot give a recording's mechanisms refuses, naming both.

use ft_core::log::{LogReader, LogWriter, Mechanisms};
use ftvmm_tests::{host, scratch, test_guest, Ftvmm};

const FINDINGS: &[&str] = &[
    "exact_irq_window",
    "breakpoints_cpl0",
    "breakpoints_cpl3",
    "single_step_cpl0",
    "single_step_cpl3",
    "dirty_log",
    "complete_emulation",
    "syscall",
    "branch_counter",
];

#[test]
fn the_probe_answers_every_question_and_a_run_uses_its_choice() {
    let h = &host()["host"];
    for f in FINDINGS {
        assert!(h[f]["ok"].is_boolean(), "{f} missing in {h}");
        assert!(
            !h[f]["detail"].as_str().unwrap_or("").is_empty(),
            "{f}: no detail in {h}"
        );
    }
    // Every KVM this project runs on keeps a dirty log and single-steps kernel code.
    assert_eq!(h["dirty_log"]["ok"], true, "{h}");
    assert_eq!(h["single_step_cpl0"]["ok"], true, "{h}");
    let m = &host()["mechanisms"];
    assert_eq!(m["irq_window"], h["exact_irq_window"]["ok"], "{m} from {h}");
    let gaps = h["complete_emulation"]["ok"] == false || h["syscall"]["ok"] == false;
    assert_eq!(m["compat"], gaps, "{m} from {h}");

    // The text form says the same.
    let text = Ftvmm::raw(&["probe"]).run();
    text.assert_code(0);
    for line in [
        "exact irq windows",
        "breakpoints cpl0",
        "dirty log",
        "default mechanisms",
    ] {
        assert!(text.stdout.contains(line), "{line}:\n{}", text.stdout);
    }
    assert_eq!(Ftvmm::raw(&["probe", "--bogus"]).run().code(), 2);
}

/// A recording's header names the mechanisms it used; a replay uses them, and refuses where
/// this host cannot give them (its header rewritten here to claim one this host lacks).
#[test]
fn a_replay_refuses_mechanisms_this_host_cannot_give() {
    let dir = scratch("host-mechanisms");
    let log = dir.join("ticks.ftl");
    let rec = Ftvmm::standalone(&test_guest("ticks"))
        .args(["--record", log.to_str().unwrap()])
        .run();
    rec.assert_code(0);
    let bytes = std::fs::read(&log).unwrap();
    let (_, header) = LogReader::new(&bytes[..]).unwrap();
    let used = header
        .mechanisms
        .expect("a version 4 header names its mechanisms");
    let m = &host()["mechanisms"];
    assert_eq!(used.compat, m["compat"] == true, "{used} against {m}");
    assert_eq!(
        used.irq_window,
        m["irq_window"] == true,
        "{used} against {m}"
    );

    let h = &host()["host"];
    let lacking = if h["exact_irq_window"]["ok"] == false {
        Mechanisms {
            irq_window: true,
            ..used
        }
    } else if h["breakpoints_cpl0"]["ok"] == false {
        Mechanisms {
            breakpoints: true,
            ..used
        }
    } else {
        eprintln!("this host gives every mechanism: no recording can ask it for more");
        return;
    };
    // The same log with the claim in its header: the frames after the header are unchanged.
    let mut old = Vec::new();
    LogWriter::new(&mut old, &header).unwrap();
    assert_eq!(&bytes[..old.len()], &old[..]);
    let mut new = Vec::new();
    let claimed = ft_core::log::Header {
        mechanisms: Some(lacking),
        ..header
    };
    LogWriter::new(&mut new, &claimed).unwrap();
    new.extend_from_slice(&bytes[old.len()..]);
    let forged = dir.join("claims-more.ftl");
    std::fs::write(&forged, new).unwrap();

    let rep = Ftvmm::raw(&["--role", "replay"])
        .args(["--kernel", test_guest("ticks").to_str().unwrap()])
        .args(["--log", forged.to_str().unwrap()])
        .run();
    assert_eq!(rep.code(), 2, "{}", rep.stderr);
    let named = format!("the recording ({lacking})");
    assert!(
        rep.stderr.contains(&named),
        "want `{named}`:\n{}",
        rep.stderr
    );
    assert!(rep.stderr.contains("this host's KVM"), "{}", rep.stderr);

    // The untouched log replays, with the recording's mechanisms.
    let ok = Ftvmm::raw(&["--role", "replay"])
        .args(["--kernel", test_guest("ticks").to_str().unwrap()])
        .args(["--log", log.to_str().unwrap(), "--log-level", "info"])
        .run();
    ok.assert_code(0);
    assert!(
        ok.stderr.contains(&format!("mechanisms: {used}")),
        "{}",
        ok.stderr
    );
    assert_eq!(ok.digest_line(), rec.digest_line());
}
