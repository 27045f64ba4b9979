//! `ftvmm`: a fault-tolerant KVM hypervisor for one single-vCPU guest.
//!
//! Diagnostics go to stderr; stdout carries only the guest's serial output (with
//! `--serial stdio`). The last line on stderr of every run that built a VM is
//! `ftvmm: exits=<N> exit-digest=<hex>`.

use clap::{Parser, ValueEnum};
use ft_core::live::{Clock, LiveBoundary, SerialSource};
use ft_core::record::Recorder;
use ft_core::replay::Replayer;
use ft_core::{Boundary, BoundaryError};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vmm::vm::kernel_cmdline;
use vmm::{config_identity, CompatMode, Vm, VmConfig, VmError};

/// What this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Run the guest alone, with no fault tolerance (optionally recording it: `--record`).
    Standalone,
    /// Re-execute a recording (`--log`) on the same machine flags, checking every exit.
    Replay,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Compat {
    Auto,
    On,
    Off,
}

/// Where the guest's serial line goes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SerialOut {
    Stdio,
    File(PathBuf),
}

fn parse_serial(s: &str) -> Result<SerialOut, String> {
    match s {
        "stdio" => Ok(SerialOut::Stdio),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOut::File(PathBuf::from(p))),
            _ => Err(format!("expected `stdio` or `file:PATH`, got `{s}`")),
        },
    }
}

/// A size with an optional K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("expected a size like 256M, 1G or 4194304, got `{s}`"))
}

/// `host`, `virtual` (100us per exit) or `virtual:STEP` (e.g. `virtual:50us`).
fn parse_clock(s: &str) -> Result<Clock, String> {
    match s {
        "host" => Ok(Clock::Host),
        "virtual" => Ok(Clock::Virtual { step_ns: 100_000 }),
        _ => match s.strip_prefix("virtual:") {
            Some(step) => parse_duration(step).map(|d| Clock::Virtual {
                step_ns: d.as_nanos() as u64,
            }),
            None => Err(format!(
                "expected `host`, `virtual` or `virtual:STEP` (e.g. virtual:50us), got `{s}`"
            )),
        },
    }
}

/// A duration like 10ms, 50ms, 1s.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("expected a duration like 10ms or 1s, got `{s}`");
    let (num, unit) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1_000_000u64)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1_000)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000_000_000)
    } else {
        return Err(bad());
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    match n.checked_mul(unit) {
        Some(ns) if ns > 0 => Ok(Duration::from_nanos(ns)),
        _ => Err(bad()),
    }
}

/// ftvmm: a fault-tolerant KVM hypervisor.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// What this process is.
    #[arg(long, value_enum)]
    role: Role,
    /// The guest kernel: an uncompressed ELF (vmlinux or a test guest).
    #[arg(long)]
    kernel: PathBuf,
    /// An initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line (the deterministic profile and device switches are appended).
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Guest RAM, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// A raw disk image, attached as virtio-blk (/dev/vda).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Where the guest's serial output goes: `stdio` or `file:PATH`.
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    serial: SerialOut,
    /// Where the guest's serial input comes from: `-` (stdin), a file or pipe, or `none`.
    /// Default: stdin with `--serial stdio`, none otherwise.
    #[arg(long)]
    serial_input: Option<String>,
    /// Hold serial input back until the guest has printed this text (e.g. a shell prompt).
    #[arg(long)]
    serial_input_after: Option<String>,
    /// Do not append the deterministic profile to the kernel command line.
    #[arg(long)]
    no_deterministic_profile: bool,
    /// Completion of what this host's KVM cannot do (auto: only on hosts that need it).
    #[arg(long, value_enum, default_value = "auto")]
    kvm_compat: Compat,
    /// What guest time follows: `host` (real time), or `virtual[:STEP]`: STEP (default 100us)
    /// per VM exit and idle time skipped, so that runs with the same input are identical.
    #[arg(long, default_value = "host", value_parser = parse_clock)]
    clock: Clock,
    /// A vCPU that runs this long without an exit is kicked, e.g. 10ms.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    quantum: Duration,
    /// Record the run to this event log (standalone role).
    #[arg(long)]
    record: Option<PathBuf>,
    /// The event log to replay (replay role).
    #[arg(long)]
    log: Option<PathBuf>,
    /// When the VM stops (the guest exits, or SIGTERM/SIGINT), save a full snapshot here.
    #[arg(long)]
    snapshot_on_exit: Option<PathBuf>,
    /// Start from this snapshot instead of booting (same machine flags as when it was taken).
    #[arg(long)]
    restore: Option<PathBuf>,
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace).
    #[arg(long, default_value = "warn")]
    log_level: String,
}

fn serial_source(args: &Args) -> Result<SerialSource, String> {
    let spec = match (&args.serial_input, &args.serial) {
        (Some(s), _) => s.as_str(),
        (None, SerialOut::Stdio) => "-",
        (None, SerialOut::File(_)) => "none",
    };
    Ok(match spec {
        "none" => SerialSource::None,
        "-" => SerialSource::Reader(Box::new(std::io::stdin())),
        path => {
            let file =
                File::open(path).map_err(|e| format!("cannot open serial input {path}: {e}"))?;
            let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(false);
            if is_file {
                // A script: all of it is known now, and waits for the guest to be ready.
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("cannot read serial input {path}: {e}"))?;
                SerialSource::Bytes(bytes)
            } else {
                SerialSource::Reader(Box::new(file))
            }
        }
    })
}

fn serial_sink(args: &Args) -> Result<Box<dyn Write + Send>, String> {
    Ok(match &args.serial {
        SerialOut::Stdio => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(
            File::create(p)
                .map_err(|e| format!("cannot create serial output {}: {e}", p.display()))?,
        ),
    })
}

fn check_file(what: &str, path: &PathBuf) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{what} {} is not a regular file", path.display())),
        Err(e) => Err(format!("{what} {}: {e}", path.display())),
    }
}

/// Exit status for a replay that diverged from its recording.
const DIVERGENCE_STATUS: u8 = 3;

/// What went wrong, and the exit status it gets.
struct Failure {
    message: String,
    status: u8,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { message, status: 2 }
    }
}

impl From<VmError> for Failure {
    fn from(e: VmError) -> Self {
        let status = match &e {
            VmError::Boundary(BoundaryError::Divergence { .. })
            | VmError::Vcpu(vmm::vcpu::VcpuError::Boundary(BoundaryError::Divergence { .. })) => {
                DIVERGENCE_STATUS
            }
            _ => 2,
        };
        Failure {
            message: e.to_string(),
            status,
        }
    }
}

fn machine_config(args: &Args) -> Result<VmConfig, String> {
    check_file("kernel", &args.kernel)?;
    if let Some(p) = &args.initrd {
        check_file("initrd", p)?;
    }
    if let Some(p) = &args.disk {
        check_file("disk image", p)?;
    }
    Ok(VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        memory_bytes: args.memory,
        disk: args.disk.clone(),
        deterministic_profile: !args.no_deterministic_profile,
        kvm_compat: match args.kvm_compat {
            Compat::Auto => CompatMode::Auto,
            Compat::On => CompatMode::On,
            Compat::Off => CompatMode::Off,
        },
        quantum: args.quantum,
    })
}

fn run(args: Args) -> Result<u8, Failure> {
    let config = machine_config(&args)?;
    match (args.role, &args.record, &args.log) {
        (Role::Standalone, _, Some(_)) => {
            return Err("--log is for --role replay; to record, use --record"
                .to_string()
                .into())
        }
        (Role::Replay, Some(_), _) => {
            return Err("--record is for --role standalone".to_string().into())
        }
        (Role::Replay, None, None) => {
            return Err("--role replay needs --log PATH".to_string().into())
        }
        _ => {}
    }
    if args.role == Role::Replay && args.restore.is_some() {
        return Err("--restore cannot be combined with --role replay"
            .to_string()
            .into());
    }
    let (hash, summary) = config_identity(&config, &kernel_cmdline(&config))?;
    let live = || -> Result<LiveBoundary, String> {
        let live = LiveBoundary::with_clock(serial_source(&args)?, serial_sink(&args)?, args.clock);
        Ok(match &args.serial_input_after {
            Some(marker) => live.input_after(marker.as_bytes()),
            None => live,
        })
    };
    let mut boundary: Box<dyn Boundary> = match (args.role, &args.record, &args.log) {
        (Role::Standalone, Some(path), _) => {
            let file = File::create(path)
                .map_err(|e| format!("cannot create log {}: {e}", path.display()))?;
            let out = std::io::BufWriter::with_capacity(1 << 16, file);
            Box::new(
                Recorder::new(live()?, out, hash, summary.clone())
                    .map_err(|e| format!("cannot start recording: {e}"))?,
            )
        }
        (Role::Standalone, None, _) => Box::new(live()?),
        (Role::Replay, _, Some(path)) => {
            let file =
                File::open(path).map_err(|e| format!("cannot open log {}: {e}", path.display()))?;
            let replayer = Replayer::new(
                std::io::BufReader::with_capacity(1 << 16, file),
                serial_sink(&args)?,
            )
            .map_err(|e| format!("cannot replay {}: {e}", path.display()))?;
            replayer
                .check_config(hash, &summary)
                .map_err(|e| e.to_string())?;
            Box::new(replayer)
        }
        (Role::Replay, _, None) => unreachable!("checked above"),
    };
    vmm::kick::stop_on_signals().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let track_dirty = args.record.is_some();
    let mut vm = Vm::new(&config, boundary.as_mut(), track_dirty)?;
    tracing::info!("kernel command line: {}", vm.cmdline());
    if let Some(path) = &args.restore {
        let snap = vmm::snapshot::Snapshot::read_file(path).map_err(|e| e.to_string())?;
        vm.restore(&snap)?;
        boundary.restored(vm.now_ns());
        tracing::info!("restored {} (rip {:#x})", path.display(), snap.vcpu.rip());
    }
    let result = vm.run(boundary.as_mut());
    if let Some(path) = &args.snapshot_on_exit {
        match vm.snapshot(true) {
            Ok(snap) => match snap.write_file(path) {
                Ok(()) => tracing::info!("snapshot saved to {}", path.display()),
                Err(e) => eprintln!("ftvmm: error: {e}"),
            },
            Err(e) => eprintln!("ftvmm: error: cannot take the snapshot: {e}"),
        }
    }
    let fix = vm.vcpu().syscall_fix();
    let mem = vm.memory_stats();
    let cp = vm.checkpoint_stats();
    tracing::info!(
        "stats: kicks={} syscalls-completed={} syscall-vmm-ns={} page-faults-stepped={} page-fault-vmm-ns={} checkpoints={} checkpoint-bytes={} checkpoint-max-pause-us={} vmm-rss-kib={} guest-rss-kib={}",
        vm.kicks(),
        fix.map_or(0, |f| f.syscalls),
        fix.map_or(0, |f| f.syscall_ns),
        fix.map_or(0, |f| f.page_faults),
        fix.map_or(0, |f| f.page_fault_ns),
        cp.count,
        cp.bytes,
        cp.max_pause.as_micros(),
        mem.map_or(0, |m| m.vmm_kib()),
        mem.map_or(0, |m| m.guest_rss_kib),
    );
    let status = match result {
        Ok(stop) => {
            tracing::info!("guest stopped: {stop:?}");
            let interrupted_and_saved =
                matches!(stop, vmm::vcpu::Stop::Interrupted) && args.snapshot_on_exit.is_some();
            Ok(if interrupted_and_saved {
                0
            } else {
                stop.status()
            })
        }
        Err(e) => Err(Failure::from(e)),
    };
    // The digest line is the last line of every run, whatever ended it.
    if let Err(f) = &status {
        eprintln!("ftvmm: error: {}", f.message);
    }
    eprintln!("ftvmm: {}", vm.digest());
    status.or_else(|f| Ok(f.status))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match run(args) {
        Ok(status) => ExitCode::from(status),
        Err(f) => {
            eprintln!("ftvmm: error: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999G").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("10").is_err());
    }

    #[test]
    fn clocks() {
        assert_eq!(parse_clock("host"), Ok(Clock::Host));
        assert_eq!(
            parse_clock("virtual"),
            Ok(Clock::Virtual { step_ns: 100_000 })
        );
        assert_eq!(
            parse_clock("virtual:50us"),
            Ok(Clock::Virtual { step_ns: 50_000 })
        );
        assert!(parse_clock("wall").is_err());
        assert!(parse_clock("virtual:fast").is_err());
    }

    #[test]
    fn serial_specs() {
        assert_eq!(parse_serial("stdio"), Ok(SerialOut::Stdio));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialOut::File(PathBuf::from("/tmp/x")))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }
}
