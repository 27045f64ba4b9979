//! The end of every run: the snapshot on exit, the statistics line, the exit status and the
//! final `ftvmm: exits=<N> exit-digest=<hex>` line.

use crate::cli::{Args, Failure};
use vmm::vcpu::Stop;
use vmm::{Vm, VmError};

/// Saves the snapshot asked for, prints the statistics and the digest line, and turns the
/// run's result into the exit status.
pub(crate) fn finish(
    args: &Args,
    vm: &mut Vm,
    result: Result<Stop, VmError>,
) -> Result<u8, Failure> {
    finish_with(args, vm, result, None)
}

/// As [`finish`], for a run that ends for `reason` (a side of a pair that lost its peer, or was
/// fenced): `ftvmm: {reason}` is the line before the digest line, where an error would be.
pub(crate) fn finish_because(
    args: &Args,
    vm: &mut Vm,
    result: Result<Stop, VmError>,
    reason: &str,
) -> Result<u8, Failure> {
    finish_with(args, vm, result, Some(reason))
}

fn finish_with(
    args: &Args,
    vm: &mut Vm,
    result: Result<Stop, VmError>,
    reason: Option<&str>,
) -> Result<u8, Failure> {
    if let Some(path) = &args.snapshot_on_exit {
        match vm.snapshot(true) {
            Ok(snap) => match snap.write_file(path) {
                Ok(()) => tracing::info!("snapshot saved to {}", path.display()),
                Err(e) => eprintln!("ftvmm: error: {e}"),
            },
            Err(e) => eprintln!("ftvmm: error: cannot take the snapshot: {e}"),
        }
    }
    let state_digest = vm.state_digest().unwrap_or(0);
    if let Some(path) = std::env::var_os("FTVMM_DUMP_RAM") {
        use vm_memory::{Bytes, GuestAddress};
        let mem = vm.memory();
        let mut buf = vec![0u8; vm.config_memory() as usize];
        let _ = mem.read_slice(&mut buf, GuestAddress(0));
        let _ = std::fs::write(path, buf);
    }
    let fix = vm.vcpu().syscall_fix();
    let mem = vm.memory_stats();
    let cp = vm.checkpoint_stats();
    tracing::info!(
        "stats: kicks={} syscalls-completed={} syscall-vmm-ns={} page-faults-stepped={} page-fault-vmm-ns={} tsc-reads={} tsc-vmm-ns={} checkpoints={} checkpoint-bytes={} checkpoint-max-pause-us={} checkpoint-p99-pause-us={} checkpoint-p50-pause-us={} window-hits={} window-injections={} timer-interrupts={} timer-delay-p50-us={} timer-delay-p99-us={} timer-delay-max-us={} timer-ticks-dropped={} page-cache-hits={} page-cache-misses={} vmm-rss-kib={} vmm-private-kib={} guest-rss-kib={} state-digest={}",
        vm.kicks(),
        fix.map_or(0, |f| f.syscalls),
        fix.map_or(0, |f| f.syscall_ns),
        fix.map_or(0, |f| f.page_faults),
        fix.map_or(0, |f| f.page_fault_ns),
        vm.vcpu().tsc().reads,
        vm.vcpu().tsc().vmm_ns,
        cp.count,
        cp.bytes,
        cp.max_pause.as_micros(),
        cp.pause_quantile_us(0.99),
        cp.pause_quantile_us(0.5),
        vm.vcpu().window().hits,
        vm.vcpu().window().injections,
        vm.platform().ticks.delays_us.len(),
        vm.platform().ticks.quantile_us(0.5),
        vm.platform().ticks.quantile_us(0.99),
        vm.platform().ticks.quantile_us(1.0),
        vm.platform().ticks.dropped,
        vm.page_cache_stats().0,
        vm.page_cache_stats().1,
        mem.map_or(0, |m| m.vmm_kib()),
        mem.map_or(0, |m| m.private_kib),
        mem.map_or(0, |m| m.guest_rss_kib),
        state_digest,
    );
    let status = match result {
        Ok(stop) => {
            tracing::info!("guest stopped: {stop:?}");
            let interrupted_and_saved =
                matches!(stop, Stop::Interrupted) && args.snapshot_on_exit.is_some();
            Ok(if interrupted_and_saved {
                0
            } else {
                stop.status()
            })
        }
        Err(e) => Err(Failure::from(e)),
    };
    // The digest line is the last line of every run, whatever ended it; the reason a run ended
    // badly is the line before it.
    match (&status, reason) {
        (Err(f), _) => eprintln!("ftvmm: error: {}", f.message),
        (Ok(_), Some(reason)) => eprintln!("ftvmm: {reason}"),
        (Ok(_), None) => {}
    }
    eprintln!("ftvmm: {}", vm.digest());
    status.or_else(|f| Ok(f.status))
}
