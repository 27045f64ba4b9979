//! A kernel nobody here built: Debian's stock `linux-image-amd64` kernel (extracted by
//! `images/stock-kernel`, no rebuild) boots with the project's initramfs and the command line
//! ftvmm adds by itself to `ftvmm-guest: ready`; the boot is recorded and replayed exactly.
//!
//! Opt-in: a stock kernel's boot takes many minutes of emulated kernel code here
//! (docs/STOCK-KERNELS.md), so this runs only with `FTVMM_STOCK_KERNEL=1`. It needs
//! `images/out/stock/vmlinux` (`images/stock-kernel`) and the Linux guest's initramfs
//! (`images/build-linux`). `FTVMM_STOCK_CMDLINE` adds the user's switches to the kernel command
//! line (e.g. `rodata=off init_on_alloc=0`, the user's choice to trade protection for boot
//! time: docs/STOCK-KERNELS.md); the default adds none.

use ftvmm_tests::{root, scratch, Ftvmm};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(45 * 60);

#[test]
fn a_stock_distribution_kernel_boots_and_replays_exactly() {
    if std::env::var_os("FTVMM_STOCK_KERNEL").is_none() {
        eprintln!("FTVMM_STOCK_KERNEL is not set: skipping the stock-kernel boot (opt-in)");
        return;
    }
    let kernel = root().join("images/out/stock/vmlinux");
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
    // The TSC sites were found (the kernel has its symbol table): without them the RNG reads
    // the host's TSC and the replay below diverges.
    assert!(
        rec.stderr.contains("guest TSC: breakpoints on"),
        "{}",
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
        "stock kernel: recorded boot (ready, then reboot -f) {:.0} s, replay {:.0} s, {}",
        recorded.as_secs_f64(),
        replayed.as_secs_f64(),
        rec.digest_line().unwrap_or("(no digest line)")
    );
}
