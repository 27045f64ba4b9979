//! `--role backup`: attaches to a running primary, receives its VM (the live state transfer),
//! then replays its event log a step behind it, checking every exit and every output, and
//! acknowledging what it has received and executed. It never emits output and never touches
//! the shared disk: disk reads come in the log, disk writes are kept until the primary reports
//! them released. A divergence is reported and healed with a full snapshot from the primary.

use crate::cli::{machine_config, open_net, serial_sink, serial_source, Args, Failure};
use crate::primary::{
    ack_mode, channel_config, end_as_primary, held_image, open_lock, ServiceParts, Services,
    TakeoverRecord, FENCED_STATUS,
};
use crate::report;
use crate::status::{status_only, ApiServer, StatusFn, SwappableApi};
use ft_core::backup::BackupLink;
use ft_core::disk::Disk;
use ft_core::disk::ImageFile;
use ft_core::live::{LiveBoundary, NetPort, SerialSource};
use ft_core::lock::{self, Arbiter, Race};
use ft_core::log::{Header, VERSION};
use ft_core::primary::{HeldNet, HeldSerial, Link};
use ft_core::record::Recorder;
use ft_core::replay::{KeptOutput, KeptWrites, Progress, Replayer};
use ft_core::takeover::{Decision, GoLive, LiveSide, SwitchPoint, Takeover};
use ft_core::{Boundary, BoundaryError};
use logging_channel::{connect, Connection, Listener, Msg, PROTOCOL_VERSION};
use std::io::{self, Write};
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
    vm.set_checkpoint_delta(args.checkpoint_delta == crate::cli::OnOff::On);
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
            TransferMsg::Final { snapshot, epoch } => {
                if tty {
                    eprintln!();
                }
                break (snapshot, epoch);
            }
        }
    };
    let (final_state, epoch) = final_state;
    let snap = Snapshot::decode(&final_state).map_err(|e| e.to_string())?;
    vm.restore(&snap)?;
    drop(snap);
    vmm::memory::trim_heap();
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
    let rtc_epoch = replayer.header().rtc_epoch;

    // Arbitration: when the stream ends because the primary is lost, race for the lock.
    let arbiter: Option<Arc<dyn Arbiter>> = open_lock(args)?.map(Arc::from);
    let owner = lock::owner_name("backup");
    let decision = Arc::new(Decision::default());
    let lost_at = Arc::new(Mutex::new(None::<(Instant, String, Duration)>));
    {
        let (link, decision, arbiter, owner, lost_at) = (
            link.clone(),
            decision.clone(),
            arbiter.clone(),
            owner.clone(),
            lost_at.clone(),
        );
        std::thread::Builder::new()
            .name("arbiter".into())
            .spawn(move || loop {
                if let Some(theirs) = link.handover() {
                    *lost_at.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), "planned switchover".into(), Duration::ZERO));
                    let outcome = take_over(arbiter.as_deref(), epoch, theirs, &owner);
                    if let Err(why) = &outcome {
                        tracing::error!("switchover declined: {why}");
                        let _ = link.connection().send(Msg::Refused {
                            reason: why.clone(),
                        });
                    }
                    decision.set(outcome);
                    return;
                }
                if let Some((why, silence)) = link.lost() {
                    *lost_at.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), why.clone(), silence));
                    decision.set(race(arbiter.as_deref(), epoch, &owner, &why));
                    return;
                }
                if let Some(why) = link.ended() {
                    decision.set(Err(why));
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            })
            .map_err(|e| format!("cannot start the arbiter thread: {e}"))?;
    }

    // The role's status: the backup's until it goes live, then the primary's.
    let status: Arc<Mutex<StatusFn>> = Arc::new(Mutex::new(backup_status(
        addr.clone(),
        link.clone(),
        progress.clone(),
        kept.clone(),
        counters.clone(),
        epoch,
    )));
    let dynamic_status: StatusFn = {
        let current = status.clone();
        Arc::new(move || {
            let f = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            f()
        })
    };
    let api = SwappableApi::new(status_only(dynamic_status.clone(), "backup"));
    let (handle, control) = vmm::control::channel();
    let services: Arc<Mutex<Option<Services>>> = Arc::new(Mutex::new(None));
    let go_live = go_live_builder(GoLiveParts {
        args: args.clone(),
        config: config.clone(),
        hash,
        summary: summary.clone(),
        rtc_epoch,
        kept: kept.clone(),
        arbiter,
        owner,
        vcpu: handle,
        mem: vm.memory(),
        services: services.clone(),
        status: status.clone(),
        api: api.clone(),
        old_link: link.clone(),
        old_primary: addr.clone(),
        lost_at,
    });
    let mut boundary = Takeover::new(replayer, decision, go_live);
    *slot.slot.lock().unwrap_or_else(|e| e.into_inner()) = boundary.disk(None, disk_size);

    vmm::kick::stop_on_signals().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let api_server = match &args.api_socket {
        Some(path) => Some(ApiServer::start(path, api.api())?),
        None => None,
    };
    let _metrics = crate::metrics::serve(args, dynamic_status)?;
    let result = loop {
        let result = vm.run(&mut boundary, &control);
        match result {
            Err(VmError::Vcpu(VcpuError::Boundary(e @ BoundaryError::Divergence { .. })))
            | Err(VmError::Boundary(e @ BoundaryError::Divergence { .. }))
                if !boundary.is_live() =>
            {
                counters.divergences.fetch_add(1, Ordering::Relaxed);
                tracing::error!("{e}: asking the primary for a resync");
                link.request_resync(&e.to_string());
                let data = match boundary.with_replayer(|r| r.skip_to_resync()) {
                    Ok(d) => d,
                    Err(e2) => {
                        control.finish();
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
            other => break other,
        }
    };
    control.finish();
    let live_services = services.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(services) = live_services {
        // This process went live: it ends as the primary it became.
        let ending = services.shutdown(result.is_ok());
        drop(api_server);
        return end_as_primary(args, &mut vm, result, ending);
    }
    match result {
        Err(VmError::Vcpu(VcpuError::Boundary(BoundaryError::Fenced { why })))
        | Err(VmError::Boundary(BoundaryError::Fenced { why })) => {
            let _ = report::finish(args, &mut vm, Ok(vmm::vcpu::Stop::EndOfLog));
            if link.lost().is_some() && arbiter_configured(args) {
                Err(Failure {
                    message: format!(
                        "the primary is lost but this backup may not take over: {why}"
                    ),
                    status: FENCED_STATUS,
                })
            } else {
                Ok(PRIMARY_LOST_STATUS)
            }
        }
        other => {
            if other.is_ok() {
                tracing::info!("the primary's guest stopped; the backup stops with it");
            }
            report::finish(args, &mut vm, other)
        }
    }
}

fn arbiter_configured(args: &Args) -> bool {
    args.lock.is_some()
}

/// Races for the lock from `epoch`.
fn race(arbiter: Option<&dyn Arbiter>, epoch: u64, owner: &str, why: &str) -> Result<u64, String> {
    let Some(arbiter) = arbiter else {
        return Err(format!(
            "{why}; without --lock a backup never takes over (it could not rule out a live primary)"
        ));
    };
    match arbiter.test_and_set(epoch, owner) {
        Ok(Race::Won(e)) => {
            tracing::warn!("{why}: won the lock {} at epoch {e}", arbiter.spec());
            Ok(e)
        }
        Ok(Race::Lost(state)) => Err(format!(
            "{why}; lost the lock {} to {} at epoch {}",
            arbiter.spec(),
            state.owner,
            state.epoch
        )),
        Err(e) => Err(format!("{why}; {e}")),
    }
}

/// A planned switchover: the primary handed the guest over at `theirs`, its epoch. With a lock
/// this side still takes it (so that the old primary can never come back); without one the
/// handover itself decides.
fn take_over(
    arbiter: Option<&dyn Arbiter>,
    epoch: u64,
    theirs: u64,
    owner: &str,
) -> Result<u64, String> {
    if theirs != epoch {
        tracing::warn!("the primary hands over at epoch {theirs}, this backup attached at {epoch}");
    }
    match arbiter {
        Some(_) => race(arbiter, theirs, owner, "planned switchover"),
        None => Ok(theirs),
    }
}

/// What going live needs (moved into the closure the takeover boundary calls once).
struct GoLiveParts {
    args: Args,
    config: vmm::VmConfig,
    hash: u64,
    summary: String,
    rtc_epoch: i64,
    kept: Arc<Mutex<KeptWrites>>,
    arbiter: Option<Arc<dyn Arbiter>>,
    owner: String,
    vcpu: vmm::control::VcpuHandle,
    mem: vmm::memory::GuestMemoryMmap,
    services: Arc<Mutex<Option<Services>>>,
    status: Arc<Mutex<StatusFn>>,
    api: SwappableApi,
    /// The channel to the old primary, and whether it handed the guest over (then it waits
    /// for [`Msg::HandedOver`] on it).
    old_link: Arc<BackupLink>,
    old_primary: String,
    lost_at: Arc<Mutex<Option<(Instant, String, Duration)>>>,
}

/// Going live: emit again what the primary may not have released (disk writes re-issued,
/// serial bytes re-sent: at least once at the failover edge), then become a primary from the
/// point where the log ended, and accept a new backup.
fn go_live_builder(p: GoLiveParts) -> GoLive {
    Box::new(move |point: SwitchPoint| -> Result<LiveSide, String> {
        let args = &p.args;
        let mut serial = serial_sink(args)?;
        let mut image = match &p.config.disk {
            Some(path) => Some(
                ImageFile::open(path)
                    .map_err(|e| format!("cannot open disk image {}: {e}", path.display()))?,
            ),
            None => None,
        };
        // The NIC's host side on this host: opened only now (a backup never reads its tap).
        let net = open_net(&p.config)?;
        let mut tap_out = match &net {
            Some((tap, _)) => Some(tap.writer().map_err(|e| format!("tap: {e}"))?),
            None => None,
        };
        let kept = p.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (mut serial_bytes, mut writes, mut frames) = (0usize, 0usize, 0usize);
        for (_, out) in &kept {
            match out {
                KeptOutput::Serial(b) => {
                    serial_bytes += b.len();
                    serial
                        .write_all(b)
                        .map_err(|e| format!("serial output: {e}"))?;
                }
                KeptOutput::Net(frame) => {
                    frames += 1;
                    if let Some(t) = tap_out.as_mut() {
                        let _ = t.write_all(frame);
                    }
                }
                KeptOutput::DiskWrite { offset, data } => {
                    writes += 1;
                    if let Some(img) = image.as_mut() {
                        img.write_at(data, *offset)
                            .map_err(|e| format!("re-issuing a disk write: {e}"))?;
                    }
                }
                KeptOutput::DiskFlush => {}
            }
        }
        let _ = serial.flush();
        if let Some(img) = image.as_mut() {
            img.flush().map_err(|e| format!("disk flush: {e}"))?;
        }
        // Tell the network the guest is here now: switches learn its MAC on this host's port.
        if let (Some(t), Some(net)) = (tap_out.as_mut(), &p.config.net) {
            match vmm::tap::guest_ip(&p.config.cmdline) {
                Some(ip) => {
                    let _ = t.write_all(&vmm::tap::gratuitous_arp(net.mac, ip));
                    tracing::warn!(
                        "announced {}.{}.{}.{} at the guest's MAC (gratuitous ARP)",
                        ip[0],
                        ip[1],
                        ip[2],
                        ip[3]
                    );
                }
                None => tracing::warn!(
                    "the guest's address is not on its command line (ftvmm.ip=): no gratuitous ARP"
                ),
            }
        }
        tracing::warn!(
            "re-emitted what the lost primary may not have released: {serial_bytes} serial bytes, {frames} frames, {writes} disk writes"
        );

        let mut live =
            LiveBoundary::with_clock(serial_source(args)?, Box::new(io::sink()), args.clock)
                .with_kick_bound(args.checkpoint_bound);
        let header = Header {
            version: VERSION,
            config_hash: p.hash,
            config_summary: p.summary.clone(),
            rtc_epoch: p.rtc_epoch,
            // Chosen when the VM was built (the probe runs once per process).
            mechanisms: vmm::vm::mechanisms(&p.config).ok(),
        };
        let link = Link::new(
            header,
            ack_mode(args),
            args.max_lag,
            p.arbiter.as_ref().map(|_| point.epoch),
        );
        live.set_output(Box::new(HeldSerial::new(link.clone())));
        if let Some((_, queue)) = &net {
            live = live.with_net(NetPort {
                rx: queue.clone(),
                tx: Box::new(HeldNet::new(link.clone())),
            });
        }
        live.restored(point.time_ns);
        let mut recorder = Recorder::new(
            live,
            Box::new(ft_core::primary::StreamSink::new(link.clone())),
            p.rtc_epoch,
        )
        .map_err(|e| e.to_string())?;
        recorder.continue_from(point.rip, point.time_ns);
        let (held, release_image) = held_image(&p.config, &link)?;
        let size = p
            .config
            .disk
            .as_ref()
            .and_then(|d| std::fs::metadata(d).ok())
            .map_or(0, |m| m.len());
        let disk = recorder.disk(held, size);
        let listen = args.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let listener = Listener::bind(&listen, channel_config(args)?)
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        if p.old_link.handover().is_some() {
            confirm_handover(p.old_link.connection(), &listener);
        }
        let record = {
            let lost = p.lost_at.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let (at, why, silence) =
                lost.unwrap_or((Instant::now(), String::new(), Duration::ZERO));
            TakeoverRecord {
                at_unix_s: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                epoch: point.epoch,
                from: p.old_primary.clone(),
                why,
                planned: p.old_link.handover().is_some(),
                detect_ms: silence.as_secs_f64() * 1e3,
                go_live_ms: at.elapsed().as_secs_f64() * 1e3,
            }
        };
        if record.planned {
            tracing::warn!(
                "LIVE: took over from {} at epoch {} by a planned switchover (live {:.1} ms after its handover)",
                record.from,
                record.epoch,
                record.go_live_ms
            );
        } else {
            tracing::warn!(
            "LIVE: took over from {} at epoch {} (detected {:.0} ms after its last message, live {:.0} ms later)",
            record.from,
            record.epoch,
            record.detect_ms,
            record.go_live_ms
        );
        }
        let services = Services::start(ServiceParts {
            listener,
            link,
            core: recorder.core(),
            vcpu: p.vcpu.clone(),
            mem: p.mem.clone(),
            hash: p.hash,
            summary: p.summary.clone(),
            ram_pages: p.config.memory_bytes / 4096,
            serial,
            net: tap_out.map(|t| Box::new(t) as Box<dyn Write + Send>),
            release_image,
            arbiter: p.arbiter.clone(),
            owner: p.owner.clone(),
            history: vec![record],
        })?;
        *p.status.lock().unwrap_or_else(|e| e.into_inner()) = services.status();
        p.api.set(services.api());
        *p.services.lock().unwrap_or_else(|e| e.into_inner()) = Some(services);
        Ok(LiveSide {
            boundary: Box::new(recorder),
            disk,
        })
    })
}

/// Tells the old primary of a switchover that this side is live and where it accepts backups.
fn confirm_handover(conn: &Connection, listener: &Listener) {
    let listen = listener.local_addr().to_string();
    if let Err(e) = conn.send(Msg::HandedOver {
        listen: listen.clone(),
    }) {
        // It stopped its guest for good already; only its `--then backup` waits for this.
        tracing::warn!("cannot confirm the switchover to the old primary: {e}");
    }
    conn.close("switchover done");
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
    epoch: u64,
) -> StatusFn {
    Arc::new(move || {
        let stats = link.connection().stats();
        let (writes, write_bytes) = kept.lock().map(|k| k.len_bytes()).unwrap_or_default();
        let received = link.received();
        let executed = progress.executed.load(Ordering::Relaxed);
        serde_json::json!({
            "role": "backup",
            "host": vmm::host::status(),
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
            "kept_output_bytes": write_bytes,
            "channel": {
                "bytes_sent": stats.bytes_sent,
                "bytes_received": stats.bytes_received,
                "max_silence_ms": stats.max_silence_us as f64 / 1e3,
            },
            "divergences": counters.divergences.load(Ordering::Relaxed),
            "resyncs": counters.resyncs.load(Ordering::Relaxed),
            "attach_ms": counters.attach_ms.load(Ordering::Relaxed),
            "ended": link.ended(),
            "epoch": epoch,
        })
    })
}
