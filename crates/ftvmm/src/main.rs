//! `ftvmm`: a fault-tolerant KVM hypervisor for one single-vCPU guest.
//!
//! Diagnostics go to stderr; stdout carries only the guest's serial output (with
//! `--serial stdio`). The last line on stderr of every run that built a VM is
//! `ftvmm: exits=<N> exit-digest=<hex>`.
//!
//! [`standalone`] runs the standalone and replay roles; [`pair`] turns the flags of a primary
//! or a backup into a configuration and runs the node (the pair itself is the `ft-pair`
//! crate); `ftvmm ctl` talks to a running one through its API socket ([`ctl`], served by
//! `ft_pair::serve`).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod cli;
mod config;
mod console;
mod ctl;
mod pair;
mod report;
mod standalone;

use cli::Role;
use std::io::Write;
use std::process::ExitCode;

/// malloc set for a long-running process, each setting unless its `MALLOC_*` variable says
/// otherwise:
///
/// - One arena for the whole process. glibc gives each thread that allocates an arena of its
///   own, and the pages an arena touched stay resident: a primary with a backup (the vCPU, the
///   channel's threads, the releaser, the API server) held ~4 MiB more that way, 18.5-20.4 MiB
///   beyond guest RAM against 13.9-15.4 with one arena (`diskwrite` under FT, three runs
///   each), and the guest ran as fast with one (its time is in `KVM_RUN`, not in malloc's lock).
/// - Fixed mmap and trim thresholds (256 KiB, 1 MiB). glibc raises both after the first large
///   buffer it frees (a snapshot file read at `--restore`, a kernel image: ~20 MiB), to that
///   size and twice it, and from then on keeps up to 40 MiB of freed heap resident and serves
///   buffers up to 20 MiB (a checkpoint's pages, a batch) from the heap, where they leave holes:
///   a primary's heap held 6.0 MiB for 2.2 MiB in use. Fixed, large buffers come and go as
///   mappings of their own and the heap gives back what it frees above 1 MiB.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    for (var, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 1),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 256 << 10),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 1 << 20),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: mallopt takes two integers; it is called before any other thread starts.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

fn main() -> ExitCode {
    tune_malloc();
    match std::env::args().nth(1).as_deref() {
        Some("ctl") => return ctl::main(),
        Some("probe" | "--probe") => return probe(),
        _ => {}
    }
    let args = match config::args_from(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(config::ArgsError::Clap(e)) => e.exit(),
        Err(config::ArgsError::Config(message)) => {
            eprintln!("ftvmm: error: {message}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match args.log_format {
        cli::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        cli::LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    let result = match args.role {
        Role::Standalone | Role::Replay => standalone::run(&args),
        Role::Primary => pair::run_primary(&args),
        Role::Backup => pair::run_backup(&args),
        Role::Standby => pair::run_standby(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(f) => {
            eprintln!("ftvmm: error: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}

/// `ftvmm probe [--json]`: what this host's KVM can do and the mechanisms a run would choose
/// with the default flags (vmm/src/host.rs, docs/HARDWARE.md).
fn probe() -> ExitCode {
    let json = std::env::args().skip(2).any(|a| a == "--json");
    if let Some(other) = std::env::args().skip(2).find(|a| a != "--json") {
        eprintln!("ftvmm: error: unknown argument `{other}` (usage: ftvmm probe [--json])");
        return ExitCode::from(2);
    }
    let caps = vmm::host::probe();
    let chosen = caps.choose(vmm::CompatMode::Auto, vmm::IrqWindowMode::Auto);
    let mut out = std::io::stdout().lock();
    let written = if json {
        let doc = serde_json::json!({
            "host": caps,
            "mechanisms": chosen.as_ref().ok(),
        });
        writeln!(out, "{doc}")
    } else {
        let mut text = caps.lines().join("\n");
        match &chosen {
            Ok(m) => text.push_str(&format!(
                "\n{:<22} {m} (with --window-sites, breakpoints where they fire)",
                "default mechanisms"
            )),
            Err(e) => text.push_str(&format!("\n{:<22} {e}", "default mechanisms")),
        }
        writeln!(out, "{text}")
    };
    if written.is_err() {
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
