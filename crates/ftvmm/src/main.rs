//! `ftvmm`: a fault-tolerant KVM hypervisor for one single-vCPU guest.
//!
//! Diagnostics go to stderr; stdout carries only the guest's serial output (with
//! `--serial stdio`). The last line on stderr of every run that built a VM is
//! `ftvmm: exits=<N> exit-digest=<hex>`.

use clap::{Parser, ValueEnum};
use ft_core::live::{LiveBoundary, SerialSource};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vmm::{CompatMode, Vm, VmConfig};

/// What this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Run the guest alone, with no fault tolerance.
    Standalone,
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
    /// Do not append the deterministic profile to the kernel command line.
    #[arg(long)]
    no_deterministic_profile: bool,
    /// Completion of what this host's KVM cannot do (auto: only on hosts that need it).
    #[arg(long, value_enum, default_value = "auto")]
    kvm_compat: Compat,
    /// A vCPU that runs this long without an exit is kicked, e.g. 10ms.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    quantum: Duration,
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
        path => SerialSource::Reader(Box::new(
            File::open(path).map_err(|e| format!("cannot open serial input {path}: {e}"))?,
        )),
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

fn run(args: Args) -> Result<u8, String> {
    match args.role {
        Role::Standalone => {}
    }
    check_file("kernel", &args.kernel)?;
    if let Some(p) = &args.initrd {
        check_file("initrd", p)?;
    }
    if let Some(p) = &args.disk {
        check_file("disk image", p)?;
    }
    let config = VmConfig {
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
    };
    let mut boundary = LiveBoundary::new(serial_source(&args)?, serial_sink(&args)?);
    let mut vm = Vm::new(&config, &mut boundary).map_err(|e| e.to_string())?;
    tracing::info!("kernel command line: {}", vm.cmdline());
    let result = vm.run(&mut boundary);
    let status = match result {
        Ok(stop) => {
            tracing::info!("guest stopped: {stop:?}");
            Ok(stop.status())
        }
        Err(e) => Err(e.to_string()),
    };
    let fix = vm.vcpu().syscall_fix();
    let mem = vm.memory_stats();
    tracing::info!(
        "stats: kicks={} syscalls-completed={} page-faults-stepped={} vmm-rss-kib={} guest-rss-kib={}",
        vm.kicks(),
        fix.map_or(0, |f| f.syscalls),
        fix.map_or(0, |f| f.page_faults),
        mem.map_or(0, |m| m.vmm_kib()),
        mem.map_or(0, |m| m.guest_rss_kib),
    );
    // The digest line is the last line of every run, whatever ended it.
    if let Err(e) = &status {
        eprintln!("ftvmm: error: {e}");
    }
    eprintln!("ftvmm: {}", vm.digest());
    status.or(Ok(2))
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
        Err(e) => {
            eprintln!("ftvmm: error: {e}");
            ExitCode::from(2)
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
