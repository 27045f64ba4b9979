//! `--role backup`: attaches to a running primary, receives its VM (the live state transfer),
//! then replays its event log a step behind it, checking every exit and every output, and
//! acknowledging what it has received and executed. It never emits output and never touches
//! the shared disk: disk reads come in the log, disk writes are kept until the primary reports
//! them released. A divergence is reported and healed with a full snapshot from the primary.

use crate::cli::{machine_config, Args, Failure};
use crate::primary::channel_config;
use crate::report;
use crate::status::{ApiServer, StatusFn};
use ft_core::backup::BackupLink;
use ft_core::disk::Disk;
use ft_core::live::{LiveBoundary, SerialSource};
use ft_core::replay::{KeptWrites, Progress, Replayer};
use ft_core::{Boundary, BoundaryError};
use logging_channel::{connect, Msg, PROTOCOL_VERSION};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::snapshot::Snapshot;
use vmm::transfer::{write_pages, TransferMsg};
use vmm::vcpu::VcpuError;
use vmm::vm::kernel_cmdline;
use vmm::{config_identity, Vm, VmError};

/// Exit status of a backup whose primary is lost (failover is not this role's job yet: it
/// reports what it holds and stops).
const PRIMARY_LOST_STATUS: u8 = 4;

/// The disk the VM is built with before the replayer (which serves it) exists.
#[derive(Clone)]
struct SlotDisk {
    slot: Arc<Mutex<Option<Box<dyn Disk>>>>,
    size: u64,
}

impl SlotDisk {
    fn with<T>(&self, f: impl FnOnce(&mut dyn Disk) -> io::Result<T>) -> io::Result<T> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(d) => f(d.as_mut()),
            None => Err(io::Error::other("the backup's disk is not ready")),
        }
    }
}

impl Disk for SlotDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|d| d.read_at(buf, offset))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(|d| d.write_at(buf, offset))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.with(|d| d.flush())
    }
}

#[derive(Default)]
struct BackupCounters {
    divergences: AtomicU64,
    resyncs: AtomicU64,
    attach_ms: AtomicU64,
}

/// Runs the backup role; returns the exit status.
pub(crate) fn run(args: &Args) -> Result<u8, Failure> {
    let config = machine_config(args)?;
    for (flag, set) in [
        ("--record", args.record.is_some()),
        ("--log", args.log.is_some()),
        ("--listen", args.listen.is_some()),
        ("--restore", args.restore.is_some()),
        ("--snapshot-on-exit", args.snapshot_on_exit.is_some()),
    ] {
        if set {
            return Err(format!("{flag} is not for --role backup").into());
        }
    }
    let addr = args
        .primary
        .clone()
        .ok_or("--role backup needs --primary ADDR (the primary's --listen address)")?;
    let channel = channel_config(args)?;
    let (hash, summary) = config_identity(&config, &kernel_cmdline(&config))?;
    let started = Instant::now();

    let conn = connect(&addr, channel).map_err(|e| format!("cannot attach to {addr}: {e}"))?;
    conn.send(Msg::Hello {
        version: PROTOCOL_VERSION,
        config_hash: hash,
        config_summary: summary.clone(),
    })
    .map_err(|e| format!("primary {addr}: {e}"))?;
    match conn.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(Msg::Welcome)) => {}
        Ok(Some(Msg::Refused { reason })) => {
            return Err(format!("the primary {addr} refused this backup: {reason}").into())
        }
        Ok(other) => return Err(format!("primary {addr}: unexpected {other:?}").into()),
        Err(e) => return Err(format!("primary {addr}: {e}").into()),
    }
    tracing::info!("attached to primary {addr}: receiving its VM");

    // The VM is built before the stream exists; its disk is served by the replayer later.
    let disk_size = match &config.disk {
        Some(p) => std::fs::metadata(p)
            .map_err(|e| format!("disk image {}: {e}", p.display()))?
            .len(),
        None => 0,
    };
    let slot = SlotDisk {
        slot: Arc::new(Mutex::new(None)),
        size: disk_size,
    };
    let mut placeholder = LiveBoundary::new(SerialSource::None, Box::new(io::sink()));
    let mut vm = Vm::new(
        &config,
        &mut placeholder,
        false,
        Some(Box::new(slot.clone())),
    )?;
    vm.zero_memory()?;
    let mem = vm.memory();
    let (mut pages, mut bytes, mut round) = (0u64, 0u64, 0u32);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let final_state = loop {
        let msg = conn
            .recv_timeout(Duration::from_secs(60))
            .map_err(|e| format!("primary {addr} during the transfer: {e}"))?
            .ok_or_else(|| format!("primary {addr}: the transfer stalled"))?;
        let Msg::Transfer(data) = msg else {
            return Err(format!("primary {addr}: unexpected {msg:?} during the transfer").into());
        };
        bytes += data.len() as u64;
        match TransferMsg::decode(&data).map_err(|e| format!("primary {addr}: {e}"))? {
            TransferMsg::Pages { pages: p, round: r } => {
                pages += p.len() as u64;
                write_pages(&mem, &p).map_err(|e| format!("primary {addr}: {e}"))?;
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                let mib = bytes as f64 / (1 << 20) as f64;
                let line = format!(
                    "receiving from {addr}: round {r}: {pages} pages, {mib:.1} MiB, {:.1} MiB/s",
                    mib / secs
                );
                if tty {
                    eprint!("\r\x1b[2K{line}");
                } else if r != round {
                    tracing::info!("{line}");
                }
                round = r;
            }
            TransferMsg::Final { snapshot } => {
                if tty {
                    eprintln!();
                }
                break snapshot;
            }
        }
    };
    let snap = Snapshot::decode(&final_state).map_err(|e| e.to_string())?;
    vm.restore(&snap)?;
    let counters = Arc::new(BackupCounters::default());
    let attach_ms = started.elapsed().as_millis() as u64;
    counters.attach_ms.store(attach_ms, Ordering::Relaxed);
    tracing::warn!(
        "backup of {addr}: VM received ({pages} pages, {:.1} MiB in {attach_ms} ms); replaying",
        bytes as f64 / (1 << 20) as f64
    );

    let progress = Arc::new(Progress::default());
    let kept = Arc::new(Mutex::new(KeptWrites::default()));
    let (link, _threads) = BackupLink::start(conn.clone(), progress.clone(), kept.clone())
        .map_err(|e| format!("cannot start the log receiver: {e}"))?;
    let mut replayer =
        Replayer::with_progress(link.reader(), Box::new(io::sink()), progress.clone())
            .map_err(|e| format!("primary {addr}: the log stream: {e}"))?;
    replayer
        .check_config(hash, &summary)
        .map_err(|e| e.to_string())?;
    replayer.keep_writes(kept.clone());
    if let Some(n) = std::env::var("FTVMM_TEST_DIVERGE_AT_EXIT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        replayer.force_divergence_at(n);
    }
    *slot.slot.lock().unwrap_or_else(|e| e.into_inner()) = replayer.disk(None, disk_size);

    vmm::kick::stop_on_signals().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let _api = match &args.api_socket {
        Some(path) => Some(ApiServer::start(
            path,
            backup_status(
                addr.clone(),
                link.clone(),
                progress.clone(),
                kept.clone(),
                counters.clone(),
            ),
        )?),
        None => None,
    };
    let (_handle, control) = vmm::control::channel();
    loop {
        let result = vm.run(&mut replayer, &control);
        match result {
            Err(VmError::Vcpu(VcpuError::Boundary(e @ BoundaryError::Divergence { .. })))
            | Err(VmError::Boundary(e @ BoundaryError::Divergence { .. })) => {
                counters.divergences.fetch_add(1, Ordering::Relaxed);
                tracing::error!("{e}: asking the primary for a resync");
                link.request_resync(&e.to_string());
                let data = match replayer.skip_to_resync() {
                    Ok(d) => d,
                    Err(e2) => {
                        return lost(args, &mut vm, &link, &format!("{e}; then {e2}"));
                    }
                };
                let snap = Snapshot::decode(&data).map_err(|e| e.to_string())?;
                vm.restore(&snap)?;
                counters.resyncs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "resynchronised with the primary at exit {}",
                    snap.digest.count()
                );
            }
            Err(VmError::Vcpu(VcpuError::Boundary(e @ BoundaryError::LogEnded { .. })))
            | Err(VmError::Vcpu(VcpuError::Boundary(e @ BoundaryError::Log(_))))
                if link.ended().is_some() =>
            {
                return lost(args, &mut vm, &link, &e.to_string());
            }
            other => {
                if other.is_ok() {
                    tracing::info!("the primary's guest stopped; the backup stops with it");
                }
                return report::finish(args, &mut vm, other);
            }
        }
    }
}

fn lost(args: &Args, vm: &mut Vm, link: &BackupLink, what: &str) -> Result<u8, Failure> {
    let why = link.ended().unwrap_or_default();
    eprintln!(
        "ftvmm: backup: {why} (replay stopped: {what}); taking over is not implemented yet: stopping"
    );
    let _ = report::finish(args, vm, Ok(vmm::vcpu::Stop::EndOfLog));
    Ok(PRIMARY_LOST_STATUS)
}

fn backup_status(
    primary: String,
    link: Arc<BackupLink>,
    progress: Arc<Progress>,
    kept: Arc<Mutex<KeptWrites>>,
    counters: Arc<BackupCounters>,
) -> StatusFn {
    Arc::new(move || {
        let stats = link.connection().stats();
        let (writes, write_bytes) = kept.lock().map(|k| k.len_bytes()).unwrap_or_default();
        let received = link.received();
        let executed = progress.executed.load(Ordering::Relaxed);
        serde_json::json!({
            "role": "backup",
            "peer": primary,
            "protected": link.ended().is_none(),
            "log": {
                "received": received,
                "executed": executed,
                "released": link.released(),
                "buffered_bytes": link.buffered(),
            },
            "lag": {
                "records": received.saturating_sub(executed),
                "exits_replayed": progress.exits.load(Ordering::Relaxed),
                "vtime_ns": progress.vtime_ns.load(Ordering::Relaxed),
            },
            "kept_writes": writes,
            "kept_write_bytes": write_bytes,
            "channel": {
                "bytes_sent": stats.bytes_sent,
                "bytes_received": stats.bytes_received,
            },
            "divergences": counters.divergences.load(Ordering::Relaxed),
            "resyncs": counters.resyncs.load(Ordering::Relaxed),
            "attach_ms": counters.attach_ms.load(Ordering::Relaxed),
            "ended": link.ended(),
        })
    })
}
