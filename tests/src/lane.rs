//! What this host is and how the lane runs things: the host probe, the TCG check, the flags a
//! lane adds to a pair's sides, the environment's trial counts.

use crate::ftvmm_bin;
use std::process::Command;

/// What `ftvmm probe --json` found on this host (vmm/src/host.rs): `host` (the findings) and
/// `mechanisms` (what a run with the default flags uses). Probed once per test binary.
pub fn host() -> &'static serde_json::Value {
    static HOST: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let out = Command::new(ftvmm_bin())
            .args(["probe", "--json"])
            .output()
            .expect("run ftvmm probe");
        assert!(out.status.success(), "ftvmm probe: {out:?}");
        serde_json::from_slice(&out.stdout).expect("ftvmm probe --json prints JSON")
    })
}

/// Whether this host's KVM runs under QEMU's TCG (the stock lane, docs/HARDWARE.md), whose
/// emulation of some instructions is not the hardware's.
pub fn under_tcg() -> bool {
    host()["host"]["kvm"]
        .as_str()
        .is_some_and(|k| k.contains("TCGTCGTCGTCG"))
}

/// `args` as the lane runs them: on a lane whose host is itself emulated (the stock lane: one
/// CPU under QEMU's TCG runs both sides of a pair and the test), `FTVMM_TEST_FAILOVER_TIMEOUT`
/// and `FTVMM_TEST_UNACKED_TIMEOUT` give a pair's sides a failover timeout and an
/// unacknowledged-data timeout that fit it (scripts/test-stock-lane), unless the test chose
/// them.
pub fn lane_args(args: &[String]) -> Vec<String> {
    let mut args = args.to_vec();
    let pair = args
        .windows(2)
        .any(|w| w[0] == "--role" && (w[1] == "primary" || w[1] == "backup"));
    for (flags, var) in [
        (
            &["--failover-timeout", "--peer-timeout"][..],
            "FTVMM_TEST_FAILOVER_TIMEOUT",
        ),
        (&["--unacked-timeout"][..], "FTVMM_TEST_UNACKED_TIMEOUT"),
    ] {
        let chosen = args.iter().any(|a| flags.contains(&a.as_str()));
        if let (true, false, Ok(t)) = (pair, chosen, std::env::var(var)) {
            args.extend([flags[0].to_string(), t]);
        }
    }
    args
}

/// How many trials a campaign runs: the number in environment variable `var`, else `default`.
pub fn trials(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
