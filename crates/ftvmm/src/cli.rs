//! The command line of `ftvmm`: flags, their parsers, and what every role needs from them
//! (the machine configuration, the serial line, errors and exit statuses).

use clap::{Parser, ValueEnum};
use ft_core::disk::DiskMode;
use ft_core::live::{Clock, SerialSource};
use ft_core::BoundaryError;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use vmm::{CompatMode, GuestTscMode, IrqWindowMode, NetConfig, VmConfig, VmError};

/// What this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Role {
    /// Run the guest alone, with no fault tolerance (optionally recording it: `--record`).
    Standalone,
    /// Re-execute a recording (`--log`) on the same machine flags, checking every exit.
    Replay,
    /// Run the guest protected: accept a backup (`--listen`) and stream the log to it.
    Primary,
    /// Attach to a running primary (`--primary`), replay its log, stand by to take over.
    Backup,
    /// Wait for whichever side is live (the lock's owner record says where it listens),
    /// attach to it as its backup, and wait again whenever that ends without the guest ending.
    Standby,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Compat {
    Auto,
    On,
    Off,
}

/// `--guest-tsc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum GuestTsc {
    /// Every entropy RDTSC site of the kernel replaced by HLT in guest RAM; the VMM completes
    /// them from the virtual clock; no debug register is used (needs a symbol table).
    Patch,
    /// Hardware breakpoints on the kernel's entropy RDTSC sites; the VMM completes them from
    /// the virtual clock (needs a kernel with a symbol table).
    Breakpoints,
    /// The guest reads the host's TSC there, unobserved.
    Off,
}

/// A switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// `--window-sites`: function names (`none`: no sites).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Sites(pub(crate) Vec<String>);

fn parse_sites(s: &str) -> Result<Sites, String> {
    if s == "none" || s.is_empty() {
        return Ok(Sites(Vec::new()));
    }
    let names: Vec<String> = s.split(',').map(|n| n.trim().to_string()).collect();
    if names.iter().any(|n| {
        n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    }) {
        return Err(format!(
            "{s:?}: want kernel function names separated by commas, or none"
        ));
    }
    Ok(Sites(names))
}

/// Where the guest's serial line goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SerialOut {
    Stdio,
    File(PathBuf),
}

pub(crate) fn parse_serial(s: &str) -> Result<SerialOut, String> {
    match s {
        "stdio" => Ok(SerialOut::Stdio),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOut::File(PathBuf::from(p))),
            _ => Err(format!("expected `stdio` or `file:PATH`, got `{s}`")),
        },
    }
}

/// A size with an optional K, M or G suffix (powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
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
pub(crate) fn parse_disk_mode(s: &str) -> Result<DiskMode, String> {
    s.parse()
}

pub(crate) fn parse_clock(s: &str) -> Result<Clock, String> {
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
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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

/// How diagnostics are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// A duration as [`parse_duration`] takes it, or zero (`0`, `0ms`).
pub(crate) fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// ftvmm: a fault-tolerant KVM hypervisor.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub(crate) struct Args {
    /// Read flags from this TOML file, one key per long flag without its dashes
    /// (`kernel = "/srv/vm1/vmlinux"`, `memory = "512M"`, `no-deterministic-profile = true`);
    /// a flag on the command line overrides the file's key (docs/OPERATIONS.md, "The
    /// configuration file").
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// What this process is.
    #[arg(long, value_enum)]
    pub(crate) role: Role,
    /// The guest kernel: an ELF (vmlinux or a test guest), or a bzImage (/boot/vmlinuz-*), whose
    /// payload ftvmm unpacks and whose symbols it reads from the kernel's kallsyms table.
    #[arg(long)]
    pub(crate) kernel: PathBuf,
    /// An initial ramdisk.
    #[arg(long)]
    pub(crate) initrd: Option<PathBuf>,
    /// The kernel command line (the deterministic profile and device switches are appended).
    #[arg(long, default_value = "console=ttyS0")]
    pub(crate) cmdline: String,
    /// Guest RAM, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub(crate) memory: u64,
    /// A raw disk image, attached as virtio-blk (/dev/vda).
    #[arg(long)]
    pub(crate) disk: Option<PathBuf>,
    /// Where the guest's serial output goes: `stdio` or `file:PATH`.
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    pub(crate) serial: SerialOut,
    /// Where the guest's serial input comes from: `-` (stdin), a file or pipe, or `none`.
    /// Default: stdin with `--serial stdio`, none otherwise.
    #[arg(long)]
    pub(crate) serial_input: Option<String>,
    /// Hold serial input back until the guest has printed this text (e.g. a shell prompt).
    #[arg(long)]
    pub(crate) serial_input_after: Option<String>,
    /// Do not append the deterministic profile to the kernel command line.
    #[arg(long)]
    pub(crate) no_deterministic_profile: bool,
    /// Completion of what this host's KVM cannot do (auto: only on hosts that need it).
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) kvm_compat: Compat,
    /// Interrupt-window exits as positions in the instruction stream: `auto` uses them where
    /// the host's KVM places them exactly (`ftvmm probe` tells), `on` requires them, `off`
    /// never asks for one (a pending interrupt waits for a synchronous exit or a kick). Both
    /// sides of a pair must choose alike; a replay follows its recording.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) irq_window: Compat,
    /// The guest kernel's RDTSC at its entropy sites (drivers/char/random.c): `patch` (HLT in
    /// their place) and `breakpoints` (debug registers, which then serve no interrupt-window
    /// site) make it read virtual time, logged like any input; `off` leaves it to the host's TSC.
    #[arg(long, value_enum, default_value = "patch")]
    pub(crate) guest_tsc: GuestTsc,
    /// What guest time follows: `host` (real time), or `virtual[:STEP]`: STEP (default 100us)
    /// per VM exit and idle time skipped, so that runs with the same input are identical.
    #[arg(long, default_value = "host", value_parser = parse_clock)]
    pub(crate) clock: Clock,
    /// Timer ticks that fall due while an earlier one still waits for the guest: `on` delivers
    /// each, one after the other (KVM's in-kernel PIT does so in its reinject mode), so that a
    /// guest counting ticks keeps time; `off` coalesces them into one, as a real 8259 does.
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) timer_reinject: OnOff,
    /// Kernel functions whose entries are interrupt-window sites: breakpoints where a due
    /// interrupt is injected at a point replay finds again, instead of behind a checkpoint at
    /// a kick (vmm/src/window.rs). A comma-separated list, or `none`. They get the debug
    /// registers the SYSCALL completion and `--guest-tsc` leave free. Not every function is a
    /// safe site on this KVM: docs/ARCHITECTURE.md says which were measured.
    #[arg(long, default_value = "__cond_resched,memcpy", value_parser = parse_sites)]
    pub(crate) window_sites: Sites,
    /// How long a due timer tick (or a pending interrupt) may wait for the next synchronous
    /// exit or interrupt-window hit, where it needs no checkpoint, before a kick delivers it
    /// behind a checkpoint (a recording or a primary) or at once (standalone), e.g. 30ms; 0 acts
    /// at the first kick.
    #[arg(long, default_value = "30ms", value_parser = parse_duration_or_zero)]
    pub(crate) checkpoint_bound: Duration,
    /// Checkpoint pages written again travel as a delta (XOR, then LZ4) against the copy the
    /// previous checkpoints carried, kept on both sides (`on`), or whole (`off`).
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) checkpoint_delta: OnOff,
    /// A vCPU that runs this long without an exit is kicked, e.g. 10ms.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub(crate) quantum: Duration,
    /// Record the run to this event log (standalone role).
    #[arg(long)]
    pub(crate) record: Option<PathBuf>,
    /// The event log to replay (replay role).
    #[arg(long)]
    pub(crate) log: Option<PathBuf>,
    /// When the VM stops (the guest exits, or SIGTERM/SIGINT), save a full snapshot here.
    #[arg(long)]
    pub(crate) snapshot_on_exit: Option<PathBuf>,
    /// Stop once the guest has made this many exits (standalone and replay roles): the count
    /// of the final `exits=` line and of a divergence report, so the same point on every run
    /// of the same execution. With --snapshot-on-exit, a snapshot taken exactly there.
    #[arg(long, value_name = "N")]
    pub(crate) stop_at_exit: Option<u64>,
    /// Start from this snapshot instead of booting (same machine flags as when it was taken).
    /// A replay of a recording that began from a snapshot restores the same one.
    #[arg(long)]
    pub(crate) restore: Option<PathBuf>,
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace, or a tracing
    /// filter such as `warn,ft_core=info`).
    #[arg(long, default_value = "warn")]
    pub(crate) log_level: String,
    /// Diagnostics on stderr as `text` (one line per event) or `json` (one JSON object per
    /// line: timestamp, level, fields, message), for a log collector.
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    /// Serve Prometheus metrics over HTTP at this address (`GET /metrics`), e.g.
    /// 127.0.0.1:9477. docs/OPERATIONS.md lists them.
    #[arg(long)]
    pub(crate) metrics: Option<String>,
    /// Primary: the address to accept a backup on, e.g. 10.0.0.1:7000; a backup or standby:
    /// where it accepts one once it goes live. The lock's owner record carries it, for
    /// standbys to find the live side (an address other hosts reach, not 0.0.0.0).
    #[arg(long)]
    pub(crate) listen: Option<String>,
    /// Standby: how often it reads the lock while it waits for a live side.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub(crate) standby_poll: Duration,
    /// Backup: the primary's address, e.g. 10.0.0.1:7000.
    #[arg(long)]
    pub(crate) primary: Option<String>,
    /// Primary and backup: the pre-shared key both ends prove they hold (a file of at least 16
    /// bytes, e.g. `head -c 32 /dev/urandom > key`).
    #[arg(long)]
    pub(crate) key_file: Option<PathBuf>,
    /// A Unix socket for `ftvmm ctl` (status, stop, switchover).
    #[arg(long)]
    pub(crate) api_socket: Option<PathBuf>,
    /// Primary: log bytes in flight to the backup before the vCPU stalls, e.g. 16M.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub(crate) log_buffer: u64,
    /// Primary: slow the vCPU when the backup's replay lags by more than this virtual time.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub(crate) max_lag: Duration,
    /// Primary: drop a backup that stays more than `--max-lag` behind through every slow-down
    /// for this long (each slow-down holds the vCPU up to 1 s): a backup host too slow or too
    /// busy to keep up even with the guest slowed to a crawl. The guest runs on at full speed,
    /// unprotected until a backup attaches. 0 never drops one.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) drop_lagging_after: Duration,
    /// Primary: send a log batch without an output once the guest has run this long without
    /// halting, or five times this in short runs between halts (an idle guest's ticks): how
    /// much replay the backup can be short of for want of the log. The default, with
    /// `--batch-age 50ms`, sends by age alone; `--batch-run 2ms --batch-age 100ms` sends a busy
    /// guest's log every few milliseconds (docs/PROTOCOL.md, "Batches", for what it measured).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub(crate) batch_run: Duration,
    /// Primary: ... or once it is this old, whatever the guest did (an idle guest's ticks and
    /// halts gather into one frame, one acknowledgement).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub(crate) batch_age: Duration,
    /// Backup: besides the acknowledgements outputs wait for and the one when the replay has
    /// used up what arrived (one per batch), acknowledge every 20 ms while the replay has had
    /// log waiting that long (`behind`), or every 20 ms whenever anything moved (`always`: the
    /// backup's position fresher in the primary's view, ~2.5 times the acknowledgements of an
    /// idle pair). `--prompt-acks on|off`, its former name, still means `always|behind`.
    #[arg(long, alias = "prompt-acks", value_enum, default_value = "behind")]
    pub(crate) ack_timer: AckTimerArg,
    /// Primary: output leaves once the backup has `received` its log record (the VMware FT
    /// rule), or has `executed` it and produced the same output (verified output).
    #[arg(long, value_enum, default_value = "received")]
    pub(crate) ack: AckArg,
    /// Primary and backup: the peer is lost after this long without a frame or heartbeat
    /// (heartbeats go every 50 ms) even while its host still acknowledges the channel's TCP
    /// data: a process stopped, hung or starved. A dead host or a cut link is found sooner, by
    /// `--unacked-timeout`. Then the lock decides which side goes on (docs/FAILOVER.md).
    #[arg(long, alias = "peer-timeout", default_value = "2s", value_parser = parse_duration)]
    pub(crate) failover_timeout: Duration,
    /// Primary and backup: the peer is lost when the channel's data has waited this long with
    /// no TCP acknowledgement at all from its host (host down or link cut); raised to 40 ms +
    /// 3 round trips on a slow link (docs/FAILOVER.md).
    #[arg(long, default_value = "80ms", value_parser = parse_duration)]
    pub(crate) unacked_timeout: Duration,
    /// Primary and backup: the nice value (-20..19) of the channel's network threads, which
    /// carry the heartbeats and run the failure detector; raised above the vCPUs' so that a busy
    /// host does not delay them (needs CAP_SYS_NICE; without it they keep the process's own, and
    /// status `channel.nice` is null).
    #[arg(long, default_value_t = logging_channel::DEFAULT_NICE, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub(crate) channel_nice: i32,
    /// A virtio-net NIC whose host side is the tap interface NAME (create it with
    /// `ip tuntap add NAME mode tap`): `tap=NAME[,mac=MAC]`. A backup opens its tap only when
    /// it goes live.
    #[arg(long, value_parser = parse_net)]
    pub(crate) net: Option<NetConfig>,
    /// Primary and backup: where the pair arbitrates when it loses its channel:
    /// `file:PATH` (a lock block on storage both hosts see) or `etcd:HOST:PORT[,...]/KEY`.
    /// Without one, a backup never takes over and a primary that loses its backup goes on
    /// unprotected (a partition could then leave two live sides).
    #[arg(long)]
    pub(crate) lock: Option<String>,
    /// Primary and backup: where the guest's disk lives. `shared`: one image both hosts reach
    /// (its path on each); `mirrored`: each host its own copy at its own `--disk` path (of the
    /// primary's size), copied to a backup when it attaches; needs `--lock etcd:...`
    /// (docs/OPERATIONS.md, "Disk modes").
    #[arg(long, default_value = "shared", value_parser = parse_disk_mode)]
    pub(crate) disk_mode: DiskMode,
    /// The flags this run was started with, without `--config` and with the configuration
    /// file's keys written out as flags: what a run that replaces itself (a switchover's
    /// `--then backup`, a mirrored backup attaching again) starts the next one with.
    #[arg(skip)]
    pub(crate) argv: Vec<OsString>,
}

impl Role {
    /// The flags (long names) this role does not take: a primary or a backup refuses them on
    /// the command line, a standalone run or a replay ignores those it has no use for. From a
    /// configuration file they are left out, so that one file can serve every role of a guest
    /// on its host (`primary = "..."` for when the host's side runs as a backup).
    pub(crate) fn refuses(self) -> &'static [&'static str] {
        match self {
            Role::Standalone => &["log", "disk-mode"],
            Role::Replay => &["record", "disk-mode"],
            Role::Primary => &["record", "log", "primary", "stop-at-exit"],
            Role::Backup => &[
                "record",
                "log",
                "restore",
                "snapshot-on-exit",
                "stop-at-exit",
            ],
            Role::Standby => &[
                "primary",
                "record",
                "log",
                "restore",
                "snapshot-on-exit",
                "stop-at-exit",
            ],
        }
    }
}

/// `--ack-timer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum AckTimerArg {
    /// While the backup is behind.
    #[value(alias = "off")]
    Behind,
    /// Whenever anything moved.
    #[value(alias = "on")]
    Always,
}

/// `--ack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum AckArg {
    /// The backup holds the log record.
    Received,
    /// The backup replayed it and produced the same output.
    Executed,
}

pub(crate) fn serial_source(args: &Args) -> Result<SerialSource, String> {
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

pub(crate) fn serial_sink(args: &Args) -> Result<Box<dyn Write + Send>, String> {
    Ok(match &args.serial {
        SerialOut::Stdio => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(
            File::create(p)
                .map_err(|e| format!("cannot create serial output {}: {e}", p.display()))?,
        ),
    })
}

/// The NIC's host side, if the machine has one: the tap, opened, with a thread reading its
/// frames into the queue the boundary delivers from.
pub(crate) fn open_net(
    config: &VmConfig,
) -> Result<Option<(vmm::tap::Tap, std::sync::Arc<ft_core::live::NetQueue>)>, String> {
    let Some(net) = &config.net else {
        return Ok(None);
    };
    let tap = vmm::tap::Tap::open(&net.tap).map_err(|e| {
        format!(
            "cannot open tap {}: {e} (create it with `ip tuntap add {} mode tap`)",
            net.tap, net.tap
        )
    })?;
    let queue = std::sync::Arc::new(ft_core::live::NetQueue::default());
    tap.start_reader(queue.clone())
        .map_err(|e| format!("tap {}: {e}", net.tap))?;
    Ok(Some((tap, queue)))
}

pub(crate) fn check_file(what: &str, path: &PathBuf) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{what} {} is not a regular file", path.display())),
        Err(e) => Err(format!("{what} {}: {e}", path.display())),
    }
}

/// Exit status for a replay that diverged from its recording.
pub(crate) const DIVERGENCE_STATUS: u8 = 3;

/// What went wrong, and the exit status it gets.
pub(crate) struct Failure {
    pub(crate) message: String,
    pub(crate) status: u8,
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure {
            message: message.to_string(),
            status: 2,
        }
    }
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

pub(crate) fn machine_config(args: &Args) -> Result<VmConfig, String> {
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
        irq_window: match args.irq_window {
            Compat::Auto => IrqWindowMode::Auto,
            Compat::On => IrqWindowMode::On,
            Compat::Off => IrqWindowMode::Off,
        },
        follow: None,
        guest_tsc: match args.guest_tsc {
            GuestTsc::Patch => GuestTscMode::Patch,
            GuestTsc::Breakpoints => GuestTscMode::Breakpoints,
            GuestTsc::Off => GuestTscMode::Off,
        },
        window_sites: args.window_sites.0.clone(),
        timer_reinject: args.timer_reinject == OnOff::On,
        quantum: args.quantum,
        net: args.net.clone(),
    })
}

/// `tap=NAME[,mac=MAC]`.
fn parse_net(s: &str) -> Result<NetConfig, String> {
    let bad = || format!("expected tap=NAME[,mac=52:54:00:12:34:56], got `{s}`");
    let mut tap = None;
    let mut mac = vmm::config::DEFAULT_MAC;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() && name.len() < 16 => {
                tap = Some(name.to_string())
            }
            Some(("mac", m)) => mac = vmm::tap::parse_mac(m).ok_or_else(bad)?,
            _ => return Err(bad()),
        }
    }
    Ok(NetConfig {
        tap: tap.ok_or_else(bad)?,
        mac,
    })
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
