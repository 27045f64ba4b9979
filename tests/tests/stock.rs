//! A kernel nobody here built: Debian's stock `linux-image-amd64` kernel, its bzImage as Debian
//! installs it (`images/stock-kernel`, no rebuild), its symbols from its own kallsyms table,
//! boots with the project's initramfs and the command line ftvmm adds by itself to
//! `ftvmm-guest: ready`; the boot is recorded and replayed exactly.
//!
//! Opt-in: a stock kernel's boot takes many minutes of emulated kernel code here
//! (docs/STOCK-KERNELS.md), so the whole boot runs only with `FTVMM_STOCK_KERNEL=1`. It needs
//! `images/out/stock/vmlinuz` (`images/stock-kernel`) and the Linux guest's initramfs
//! (`images/build-linux`). Without it, CI records the first stretch of the same bzImage's boot
//! (past the kernel's first RDTSC at an entropy site) and replays it exactly. `FTVMM_STOCK_CMDLINE` adds the user's switches to the kernel command
//! line (e.g. `rodata=off init_on_alloc=0`, the user's choice to trade protection for boot
//! time: docs/STOCK-KERNELS.md); the default adds none.

use ftvmm_tests::{root, scratch, Ftvmm};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(45 * 60);

#[test]
fn a_stock_distribution_kernel_boots_and_replays_exactly() {
    if std::env::var_os("FTVMM_STOCK_KERNEL").is_none() {
        eprintln!("FTVMM_STOCK_KERNEL is not set: skipping the stock-kernel boot (opt-in)");
        return;
    }
    let kernel = root().join("images/out/stock/vmlinuz");
    let initrd = root().join("images/out/linux/initramfs.cpio");
    assert!(
        kernel.exists() && initrd.exists(),
        "{} or {} missing: run images/stock-kernel and images/build-linux",
        kernel.display(),
        initrd.display()
    );
    let mut cmdline = "console=ttyS0 panic=-1".to_string();
    if let Ok(extra) = std::env::var("FTVMM_STOCK_CMDLINE") {
        cmdline = format!("{cmdline} {extra}");
    }
    let dir = scratch("stock-kernel");
    let log = dir.join("boot.ftl");
    let input = dir.join("input.txt");
    std::fs::write(&input, "reboot -f\n").unwrap();
    let machine = |role: &str| {
        Ftvmm::raw(&["--role", role, "--kernel", kernel.to_str().unwrap()])
            .args(["--initrd", initrd.to_str().unwrap(), "--cmdline", &cmdline])
            .timeout(LIMIT)
    };

    let start = Instant::now();
    let rec = machine("standalone")
        .args(["--record", log.to_str().unwrap()])
        .args(["--serial-input", input.to_str().unwrap()])
        .args(["--serial-input-after", "ftvmm# ", "--log-level", "info"])
        .run();
    let recorded = start.elapsed();
    rec.assert_code(0);
    assert!(
        rec.stdout.contains("ftvmm-guest: ready"),
        "{}\n{}",
        rec.stdout,
        rec.stderr
    );
    // The TSC sites were found (in the kernel's kallsyms table): without them the RNG reads
    // the host's TSC and the replay below diverges.
    assert!(tsc_sites(&rec.stderr) > 0, "{}", rec.stderr);

    let start = Instant::now();
    let rep = machine("replay")
        .args(["--log", log.to_str().unwrap()])
        .run();
    let replayed = start.elapsed();
    rep.assert_code(0);
    assert_eq!(rep.stdout, rec.stdout, "replayed output differs");
    assert_eq!(rep.digest_line(), rec.digest_line());
    eprintln!(
        "stock kernel: recorded boot (ready, then reboot -f) {:.0} s, replay {:.0} s, {}",
        recorded.as_secs_f64(),
        replayed.as_secs_f64(),
        rec.digest_line().unwrap_or("(no digest line)")
    );
}

/// How many RDTSC sites the run patched (its `guest TSC: N RDTSC sites patched` line).
fn tsc_sites(stderr: &str) -> usize {
    stderr
        .split("guest TSC: ")
        .nth(1)
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A run's statistic `name=N` from its `stats:` line.
fn stat(stderr: &str, name: &str) -> u64 {
    stderr
        .split(&format!(" {name}="))
        .nth(1)
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Debian's bzImage: images/stock-kernel's, or the stock lane's host kernel (the same file,
/// which scripts/test builds anyway).
fn debian_bzimage() -> Option<PathBuf> {
    ["images/out/stock/vmlinuz", "images/out/stock-host/vmlinuz"]
        .iter()
        .map(|p| root().join(p))
        .find(|p| p.exists())
}

/// How far into the boot the short recording goes: Debian's 6.1 kernel reads the TSC at an
/// entropy site (`extract_entropy`) first at exit ~4,550, every few exits from then on.
const SHORT_EXITS: &str = "5000";

/// Debian's bzImage, as it is on disk, boots: ftvmm unpacks it, finds its RDTSC sites in its
/// kallsyms table, and a recording of its boot past the first of them replays exactly.
#[test]
fn debians_bzimage_boots_and_a_short_recording_replays_exactly() {
    let Some(kernel) = debian_bzimage() else {
        eprintln!("no Debian bzImage (images/stock-kernel or images/build-stock-host): skipping");
        return;
    };
    let initrd = root().join("images/out/linux/initramfs.cpio");
    if !initrd.exists() {
        eprintln!("{} missing: skipping", initrd.display());
        return;
    }
    let dir = scratch("stock-bzimage");
    let log = dir.join("boot.ftl");
    let machine = |role: &str| {
        Ftvmm::raw(&["--role", role, "--kernel", kernel.to_str().unwrap()])
            .args(["--initrd", initrd.to_str().unwrap()])
            .args([
                "--cmdline",
                "console=ttyS0 panic=-1",
                "--serial-input",
                "none",
            ])
            .args(["--log-level", "info"])
            .timeout(Duration::from_secs(900))
    };
    let start = Instant::now();
    let rec = machine("standalone")
        .args([
            "--record",
            log.to_str().unwrap(),
            "--stop-at-exit",
            SHORT_EXITS,
        ])
        .run();
    let recorded = start.elapsed();
    rec.assert_code(0);
    assert!(
        rec.stderr.contains("is a bzImage: xz payload unpacked"),
        "{}",
        rec.stderr
    );
    assert!(tsc_sites(&rec.stderr) >= 4, "{}", rec.stderr);
    let reads = stat(&rec.stderr, "tsc-reads");
    assert!(
        reads > 0,
        "the recording ended before the kernel read the TSC at a site:\n{}",
        rec.stderr
    );
    let start = Instant::now();
    let rep = machine("replay")
        .args(["--log", log.to_str().unwrap()])
        .run();
    let replayed = start.elapsed();
    rep.assert_code(0);
    assert_eq!(rep.stdout, rec.stdout, "replayed output differs");
    assert_eq!(rep.digest_line(), rec.digest_line());
    eprintln!(
        "Debian's bzImage: {SHORT_EXITS} exits recorded in {:.0} s ({reads} TSC reads at its sites), replayed in {:.0} s, {}",
        recorded.as_secs_f64(),
        replayed.as_secs_f64(),
        rec.digest_line().unwrap_or("(no digest line)")
    );
}
