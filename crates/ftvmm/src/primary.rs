//! `--role primary`: runs the guest, accepts one backup at a time, transfers the running VM to
//! it (iterative pre-copy, then one short pause), streams the event log to it and holds output
//! until the backup has acknowledged the log up to it (ft_core::primary).
//!
//! Threads: the vCPU (this thread, `Vm::run`), the pair manager (accepts backups, runs the
//! transfer and resyncs, through the vCPU control path), the output releaser, the network
//! runtime of the logging channel, the API socket.

use crate::cli::{machine_config, open_net, serial_sink, serial_source, AckArg, Args, Failure};
use crate::report;
use crate::status::{refusal, ApiFn, ApiServer, Request, StatusFn, Then};
use ft_core::disk::{Disk, ImageFile};
use ft_core::live::{LiveBoundary, NetPort};
use ft_core::lock::{self, Arbiter, Race};
use ft_core::log::{Header, Record, VERSION};
use ft_core::primary::{AckMode, HeldDisk, HeldNet, HeldSerial, Link, Mode};
use ft_core::record::{RecordCounters, Recorder, SharedRecordCore};
use ft_core::Boundary;
use logging_channel::{ChannelConfig, Connection, Listener, Msg, Psk, PROTOCOL_VERSION};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::control::{VcpuEvent, VcpuHandle, VcpuResponse};
use vmm::memory::GuestMemoryMmap;
use vmm::transfer::{read_pages, TransferMsg, PAGES_PER_MESSAGE};
use vmm::vm::kernel_cmdline;
use vmm::{config_identity, Vm};

/// How long the control thread waits for the vCPU to answer a request.
const VCPU_ANSWER: Duration = Duration::from_secs(10);
/// Pre-copy stops when a round leaves no more than this many pages dirty...
const LAST_ROUND_PAGES: usize = 256;
/// ...or after this many rounds.
const MAX_ROUNDS: u32 = 12;

/// What one attach measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub(crate) struct AttachReport {
    pub(crate) peer: String,
    pub(crate) rounds: u32,
    pub(crate) bytes: u64,
    pub(crate) pages: u64,
    pub(crate) total_ms: f64,
    pub(crate) pause_ms: f64,
}

/// The pair's counters, from the primary's side.
#[derive(Default)]
struct PairState {
    attaches: AtomicU64,
    refused: AtomicU64,
    resyncs: AtomicU64,
    last_attach: Mutex<Option<AttachReport>>,
    stop: AtomicBool,
    /// Why this side was fenced, once it was.
    fenced: Mutex<Option<String>>,
    /// Takeovers this process made.
    history: Mutex<Vec<TakeoverRecord>>,
    /// Where the guest went in a planned switchover, once it did.
    handed_over: Mutex<Option<HandedOverTo>>,
    /// `ctl stop` asked for this stop.
    stop_requested: AtomicBool,
    /// Switchovers this side made as the primary, the last one's figures.
    switchovers: AtomicU64,
    last_switchover: Mutex<Option<serde_json::Value>>,
}

/// The new primary of a planned switchover, and what this side does next.
#[derive(Clone, Debug)]
pub(crate) struct HandedOverTo {
    /// Where the new primary accepts backups.
    pub(crate) addr: String,
    pub(crate) then: Then,
}

/// How a primary's services ended.
pub(crate) struct Ending {
    /// Why this side was fenced, if it was.
    pub(crate) fenced: Option<String>,
    /// Where the guest went, after a switchover.
    pub(crate) handed_over: Option<HandedOverTo>,
    /// Whether `ctl stop` stopped it.
    pub(crate) stop_requested: bool,
}

impl Ending {
    /// The exit status of a run that stopped on request (`ctl stop`, a switchover): 0, not
    /// the 130 of a signal.
    pub(crate) fn status(&self, status: u8) -> u8 {
        if (self.stop_requested || self.handed_over.is_some()) && status == 130 {
            0
        } else {
            status
        }
    }
}

/// A request for the pair manager, from the API socket.
enum Command {
    Stop(mpsc::Sender<serde_json::Value>),
    Switchover(Then, mpsc::Sender<serde_json::Value>),
}

fn psk(args: &Args) -> Result<Psk, String> {
    let path = args
        .key_file
        .as_ref()
        .ok_or("--role primary and --role backup need --key-file PATH (a pre-shared key)")?;
    Psk::from_file(path).map_err(|e| e.to_string())
}

pub(crate) fn channel_config(args: &Args) -> Result<ChannelConfig, String> {
    let mut cfg = ChannelConfig::new(psk(args)?);
    cfg.log_buffer = usize::try_from(args.log_buffer).unwrap_or(usize::MAX);
    cfg.timeout = args.failover_timeout;
    Ok(cfg)
}

/// Runs the primary role; returns the exit status.
pub(crate) fn run(args: &Args) -> Result<u8, Failure> {
    let config = machine_config(args)?;
    for (flag, set) in [
        ("--record", args.record.is_some()),
        ("--log", args.log.is_some()),
        ("--primary", args.primary.is_some()),
    ] {
        if set {
            return Err(format!("{flag} is not for --role primary").into());
        }
    }
    let listen = args
        .listen
        .clone()
        .ok_or("--role primary needs --listen ADDR (where backups attach)")?;
    let channel = channel_config(args)?;
    let (hash, summary) = config_identity(&config, &kernel_cmdline(&config))?;

    // The lock first: a primary that cannot hold it must not run at all.
    let owner = lock::owner_name("primary");
    let arbiter = open_lock(args)?;
    let epoch = match &arbiter {
        Some(l) => {
            let e = l.claim(&owner).map_err(|e| e.to_string())?;
            tracing::info!("holding lock {} at epoch {e} as {owner}", l.spec());
            Some(e)
        }
        None => {
            tracing::warn!(
                "no --lock: if this pair is partitioned, both sides may stay live (split brain)"
            );
            None
        }
    };

    // The live side reads the host; its serial output goes through the output rule.
    let mut live =
        LiveBoundary::with_clock(serial_source(args)?, Box::new(std::io::sink()), args.clock)
            .with_kick_bound(args.checkpoint_bound);
    let rtc_epoch = live.rtc_epoch().map_err(|e| e.to_string())?;
    let header = Header {
        version: VERSION,
        config_hash: hash,
        config_summary: summary.clone(),
        rtc_epoch,
        mechanisms: Some(vmm::vm::mechanisms(&config)?),
    };
    let link = Link::new(header, ack_mode(args), args.max_lag, epoch);
    live.set_output(Box::new(HeldSerial::new(link.clone())));
    let mut net_out = None;
    if let Some((tap, queue)) = open_net(&config)? {
        net_out = Some(Box::new(tap.writer().map_err(|e| format!("tap: {e}"))?)
            as Box<dyn std::io::Write + Send>);
        live = live.with_net(NetPort {
            rx: queue,
            tx: Box::new(HeldNet::new(link.clone())),
        });
    }
    if let Some(marker) = &args.serial_input_after {
        live = live.input_after(marker.as_bytes());
    }
    let mut recorder = Recorder::new(
        live,
        Box::new(ft_core::primary::StreamSink::new(link.clone())),
        rtc_epoch,
    )
    .map_err(|e| e.to_string())?;
    let core = recorder.core();
    let (image, release_image) = held_image(&config, &link)?;

    vmm::kick::stop_on_signals().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut vm = Vm::new(&config, &mut recorder, false, image)?;
    vm.set_checkpoint_delta(args.checkpoint_delta == crate::cli::OnOff::On);
    tracing::info!("kernel command line: {}", vm.cmdline());
    if let Some(path) = &args.restore {
        let snap = vmm::snapshot::Snapshot::read_file(path).map_err(|e| e.to_string())?;
        vm.restore(&snap)?;
        recorder.restored(vm.now_ns());
        tracing::info!("restored {} (rip {:#x})", path.display(), snap.vcpu.rip());
        drop(snap);
        vmm::memory::trim_heap();
    }

    let listener =
        Listener::bind(&listen, channel).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let (handle, control) = vmm::control::channel();
    let services = Services::start(ServiceParts {
        listener,
        link: link.clone(),
        core,
        vcpu: handle,
        mem: vm.memory(),
        hash,
        summary,
        ram_pages: config.memory_bytes / 4096,
        serial: serial_sink(args)?,
        net: net_out,
        release_image,
        arbiter: arbiter.map(Arc::from),
        owner,
        history: Vec::new(),
    })?;
    let api = match &args.api_socket {
        Some(path) => Some(ApiServer::start(path, services.api())?),
        None => None,
    };
    let _metrics = crate::metrics::serve(args, services.status())?;

    let result = vm.run(&mut recorder, &control);
    control.finish();
    let ending = services.shutdown(result.is_ok());
    drop(api);
    end_as_primary(args, &mut vm, result, ending)
}

/// The end of a run as a primary (also of a backup that went live): the report, the exit
/// status, and after a switchover with `--then backup`, this process becomes the new
/// primary's backup.
pub(crate) fn end_as_primary(
    args: &Args,
    vm: &mut Vm,
    result: Result<vmm::vcpu::Stop, vmm::VmError>,
    ending: Ending,
) -> Result<u8, Failure> {
    if let Some(why) = &ending.fenced {
        let _ = report::finish(args, vm, result);
        return Err(Failure {
            message: format!("this primary stopped: {why}"),
            status: FENCED_STATUS,
        });
    }
    let status = report::finish(args, vm, result).map(|s| ending.status(s))?;
    match &ending.handed_over {
        Some(to) if to.then == Then::Backup => Err(become_backup(&to.addr)),
        _ => Ok(status),
    }
}

/// Replaces this process with `ftvmm --role backup --primary ADDR` and the same machine and
/// pair flags (what only a primary takes is left out). Returns only when that fails.
fn become_backup(addr: &str) -> Failure {
    use std::os::unix::process::CommandExt;
    let argv: Vec<String> = std::env::args().collect();
    let mut next = backup_argv(&argv[1..]);
    next.extend([
        "--role".to_string(),
        "backup".into(),
        "--primary".into(),
        addr.into(),
    ]);
    tracing::warn!("switchover done: attaching to the new primary {addr} as its backup");
    let exe = std::env::current_exe().unwrap_or_else(|_| argv[0].clone().into());
    let err = std::process::Command::new(exe).args(&next).exec();
    Failure {
        message: format!("cannot become the new primary's backup: {err}"),
        status: 2,
    }
}

/// A primary's arguments without the flags a backup does not take.
fn backup_argv(args: &[String]) -> Vec<String> {
    const DROP_WITH_VALUE: [&str; 6] = [
        "--role",
        "--primary",
        "--restore",
        "--snapshot-on-exit",
        "--record",
        "--log",
    ];
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let flag = a.split('=').next().unwrap_or(a);
        if DROP_WITH_VALUE.contains(&flag) {
            if !a.contains('=') {
                it.next();
            }
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// Exit status of a side that lost the arbitration (or could not reach the lock) and stopped.
pub(crate) const FENCED_STATUS: u8 = 5;

pub(crate) fn ack_mode(args: &Args) -> AckMode {
    match args.ack {
        AckArg::Received => AckMode::Received,
        AckArg::Executed => AckMode::Executed,
    }
}

pub(crate) fn open_lock(args: &Args) -> Result<Option<Box<dyn Arbiter>>, String> {
    args.lock
        .as_deref()
        .map(|spec| lock::open(spec).map_err(|e| e.to_string()))
        .transpose()
}

/// The disk as the guest sees it (through the output rule), and a second handle on the image
/// for the thread that releases held writes.
pub(crate) type HeldImage = (Option<Box<dyn Disk>>, Option<ImageFile>);

/// The disk image through the output rule (for the guest), and a second handle on it for the
/// thread that releases held writes.
pub(crate) fn held_image(config: &vmm::VmConfig, link: &Arc<Link>) -> Result<HeldImage, String> {
    match &config.disk {
        Some(path) => {
            let img = ImageFile::open(path)
                .map_err(|e| format!("cannot open disk image {}: {e}", path.display()))?;
            let for_release = img
                .try_clone()
                .map_err(|e| format!("disk image {}: {e}", path.display()))?;
            Ok((
                Some(Box::new(HeldDisk::new(link.clone(), img))),
                Some(for_release),
            ))
        }
        None => Ok((None, None)),
    }
}

/// A takeover this process made (it was a backup and went live).
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct TakeoverRecord {
    /// Unix time of the takeover, seconds.
    pub(crate) at_unix_s: u64,
    /// The epoch won.
    pub(crate) epoch: u64,
    /// The primary that was lost.
    pub(crate) from: String,
    /// Why it was considered lost.
    pub(crate) why: String,
    /// A planned switchover (the old primary handed the guest over), not a failure.
    pub(crate) planned: bool,
    /// From the last frame received from the old primary to the end of its stream, ms.
    pub(crate) detect_ms: f64,
    /// From the end of the stream to the live guest, ms.
    pub(crate) go_live_ms: f64,
}

/// What a primary's services are made of.
pub(crate) struct ServiceParts {
    pub(crate) listener: Listener,
    pub(crate) link: Arc<Link>,
    pub(crate) core: SharedRecordCore,
    pub(crate) vcpu: VcpuHandle,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) hash: u64,
    pub(crate) summary: String,
    pub(crate) ram_pages: u64,
    pub(crate) serial: Box<dyn std::io::Write + Send>,
    pub(crate) net: Option<Box<dyn std::io::Write + Send>>,
    pub(crate) release_image: Option<ImageFile>,
    pub(crate) arbiter: Option<Arc<dyn Arbiter>>,
    pub(crate) owner: String,
    pub(crate) history: Vec<TakeoverRecord>,
}

/// A primary's threads beside the vCPU: the output releaser and the pair manager.
pub(crate) struct Services {
    link: Arc<Link>,
    counters: Arc<RecordCounters>,
    commands: mpsc::Sender<Command>,
    pair: Arc<PairState>,
    releaser: ft_core::primary::Releaser,
    manager: std::thread::JoinHandle<()>,
    listen: String,
    arbiter: Option<Arc<dyn Arbiter>>,
    owner: String,
}

impl Services {
    /// Starts the releaser and the pair manager.
    pub(crate) fn start(parts: ServiceParts) -> Result<Services, String> {
        let releaser = parts
            .link
            .start_releaser(parts.serial, parts.net, parts.release_image)
            .map_err(|e| format!("cannot start the output releaser: {e}"))?;
        let listen = parts.listener.local_addr().to_string();
        tracing::warn!(
            "primary listening for a backup on {listen}: no backup attached, running UNPROTECTED"
        );
        let pair = Arc::new(PairState::default());
        *pair.history.lock().unwrap_or_else(|e| e.into_inner()) = parts.history;
        let (commands, requests) = mpsc::channel();
        // Taken now: the vCPU may hold the core's lock for long later (a full log buffer).
        let counters = parts
            .core
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters();
        let ctx = Manager {
            listener: parts.listener,
            link: parts.link.clone(),
            core: parts.core.clone(),
            requests,
            vcpu: parts.vcpu,
            mem: parts.mem,
            hash: parts.hash,
            summary: parts.summary,
            pair: pair.clone(),
            ram_pages: parts.ram_pages,
            arbiter: parts.arbiter.clone(),
            owner: parts.owner.clone(),
        };
        let manager = std::thread::Builder::new()
            .name("pair-manager".into())
            .spawn(move || ctx.run())
            .map_err(|e| format!("cannot start the pair manager: {e}"))?;
        Ok(Services {
            link: parts.link,
            counters,
            commands,
            pair,
            releaser,
            manager,
            listen,
            arbiter: parts.arbiter,
            owner: parts.owner,
        })
    }

    /// The status document of this primary.
    pub(crate) fn status(&self) -> StatusFn {
        primary_status(
            self.link.clone(),
            self.pair.clone(),
            self.counters.clone(),
            self.listen.clone(),
            self.arbiter.as_ref().map(|a| a.spec()),
        )
    }

    /// What this primary answers on its API socket: status, stop, switchover.
    pub(crate) fn api(&self) -> ApiFn {
        let status = self.status();
        let commands = self.commands.clone();
        Arc::new(move |req| {
            let (reply, answer) = mpsc::channel();
            let (cmd, limit) = match req {
                Request::Status => return status(),
                Request::Stop => (Command::Stop(reply), Duration::from_secs(30)),
                Request::Switchover(then) => {
                    (Command::Switchover(then, reply), SWITCHOVER_LIMIT * 3)
                }
            };
            if commands.send(cmd).is_err() {
                return refusal("this primary is stopping");
            }
            answer
                .recv_timeout(limit)
                .unwrap_or_else(|_| refusal("the pair manager did not answer"))
        })
    }

    /// Stops the manager, lets what the rule allows leave, closes the backup's channel and,
    /// after a clean stop, frees the lock.
    pub(crate) fn shutdown(self, clean: bool) -> Ending {
        self.pair.stop.store(true, Ordering::Release);
        let _ = self.manager.join();
        // What the backup acknowledges now may still leave; then the rest (unprotected).
        self.releaser.finish(Duration::from_secs(2));
        if let Some(conn) = self.link.connection() {
            conn.close("the primary stopped");
        }
        let (p50, p99) = latency_percentiles(&self.link.stats.latencies());
        tracing::info!(
            "pair: attaches={} resyncs={} outputs-released={} output-latency-p50-us={p50} output-latency-p99-us={p99} log-bytes={} throttled={} epoch={}",
            self.pair.attaches.load(Ordering::Relaxed),
            self.pair.resyncs.load(Ordering::Relaxed),
            self.link.stats.released.load(Ordering::Relaxed),
            self.link.stats.log_bytes.load(Ordering::Relaxed),
            self.link.stats.throttled.load(Ordering::Relaxed),
            self.link.epoch(),
        );
        let fenced = self
            .pair
            .fenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let handed_over = self
            .pair
            .handed_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // After a switchover the lock is the new primary's.
        if fenced.is_none() && handed_over.is_none() && clean {
            if let Some(a) = &self.arbiter {
                if let Err(e) = a.release(self.link.epoch(), &self.owner) {
                    tracing::warn!("cannot free the lock: {e}");
                }
            }
        }
        Ending {
            fenced,
            handed_over,
            stop_requested: self.pair.stop_requested.load(Ordering::Acquire),
        }
    }
}

/// The 50th and 99th percentiles of output latencies (ns in, us out).
fn latency_percentiles(ns: &[u64]) -> (u64, u64) {
    if ns.is_empty() {
        return (0, 0);
    }
    let mut v = ns.to_vec();
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] / 1000;
    (at(0.5), at(0.99))
}

fn primary_status(
    link: Arc<Link>,
    pair: Arc<PairState>,
    counters: Arc<RecordCounters>,
    listen: String,
    lock: Option<String>,
) -> StatusFn {
    let start = Instant::now();
    let last = Mutex::new((Instant::now(), 0u64, 0u64));
    Arc::new(move || {
        let conn = link.connection();
        let stats = &link.stats;
        let sent = stats.sent_seq.load(Ordering::Relaxed);
        let (received, executed, backup_vtime) = conn.as_ref().map_or((0, 0, 0), |c| c.acked());
        let vtime = stats.sent_vtime_ns.load(Ordering::Relaxed);
        let wire = conn.as_ref().map(|c| c.stats());
        let (bytes_out, bytes_in) = wire.map_or((0, 0), |w| (w.bytes_sent, w.bytes_received));
        let max_silence_ms = wire.map_or(0.0, |w| w.max_silence_us as f64 / 1e3);
        let rate = {
            let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
            let dt = l.0.elapsed().as_secs_f64().max(1e-3);
            let r = (bytes_out.saturating_sub(l.1) + bytes_in.saturating_sub(l.2)) as f64 / dt;
            *l = (Instant::now(), bytes_out, bytes_in);
            r
        };
        let attach = pair
            .last_attach
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let (checkpoints, checkpoint_bytes) = (
            counters.checkpoints.load(Ordering::Relaxed),
            counters.checkpoint_bytes.load(Ordering::Relaxed),
        );
        serde_json::json!({
            "role": "primary",
            "host": vmm::host::status(),
            "listen": listen,
            "peer": conn.as_ref().map(|c| c.peer_addr().to_string()),
            "protected": link.protected(),
            "ack_mode": match link.ack_mode() { AckMode::Received => "received", AckMode::Executed => "executed" },
            "uptime_s": start.elapsed().as_secs_f64(),
            "log": {
                "sent": sent,
                "received": received,
                "executed": executed,
                "bytes": stats.log_bytes.load(Ordering::Relaxed),
            },
            "lag": {
                "records": sent.saturating_sub(executed),
                // Before the backup's first acknowledgement there is no lag to speak of.
                "vtime_ns": if conn.is_some() && executed > 0 { vtime.saturating_sub(backup_vtime) } else { 0 },
                "throttled": stats.throttled.load(Ordering::Relaxed),
            },
            "outputs_held": stats.held.load(Ordering::Relaxed),
            "outputs_held_bytes": stats.held_bytes.load(Ordering::Relaxed),
            "outputs_released": stats.released.load(Ordering::Relaxed),
            "output_latency_us": {
                "p50": latency_percentiles(&stats.latencies()).0,
                "p99": latency_percentiles(&stats.latencies()).1,
            },
            "channel": {
                "bytes_sent": bytes_out,
                "bytes_received": bytes_in,
                "bytes_per_s": rate,
                "max_silence_ms": max_silence_ms,
            },
            "attaches": pair.attaches.load(Ordering::Relaxed),
            "backups_refused": pair.refused.load(Ordering::Relaxed),
            "resyncs": pair.resyncs.load(Ordering::Relaxed),
            "last_backup_lost": link.lost(),
            "attach": attach,
            "mode": format!("{:?}", link.mode()).to_lowercase(),
            "lock": lock,
            "epoch": link.epoch(),
            "takeovers": pair.history.lock().map(|h| h.clone()).unwrap_or_default(),
            "fenced": pair.fenced.lock().map(|f| f.clone()).unwrap_or_default(),
            "checkpoints": checkpoints,
            "checkpoint_bytes": checkpoint_bytes,
            "switchovers": pair.switchovers.load(Ordering::Relaxed),
            "last_switchover": pair.last_switchover.lock().map(|s| s.clone()).unwrap_or_default(),
            "handed_over_to": pair.handed_over.lock().ok().and_then(|h| h.as_ref().map(|h| h.addr.clone())),
        })
    })
}

/// The pair manager: accepts backups, runs their transfer, serves resync requests.
struct Manager {
    listener: Listener,
    link: Arc<Link>,
    core: SharedRecordCore,
    requests: mpsc::Receiver<Command>,
    vcpu: VcpuHandle,
    mem: GuestMemoryMmap,
    hash: u64,
    summary: String,
    pair: Arc<PairState>,
    ram_pages: u64,
    arbiter: Option<Arc<dyn Arbiter>>,
    owner: String,
}

impl Manager {
    /// The backup was lost and a lock decides: race for it. Winning leaves this side
    /// unprotected (its held output is released); losing, or not reaching the lock, fences it
    /// and stops the guest.
    fn arbitrate(&self) {
        let Some(arbiter) = &self.arbiter else {
            return;
        };
        let epoch = self.link.epoch();
        let outcome = match arbiter.test_and_set(epoch, &self.owner) {
            Ok(Race::Won(e)) => Ok(e),
            Ok(Race::Lost(state)) => Err(format!(
                "lost the lock {} to {} at epoch {}",
                arbiter.spec(),
                state.owner,
                state.epoch
            )),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(e) => self.link.won(e),
            Err(why) => {
                self.link.fence(&why);
                *self.pair.fenced.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                let _ = self.vcpu.request(VcpuEvent::Stop, VCPU_ANSWER);
            }
        }
    }

    fn run(self) {
        while !self.pair.stop.load(Ordering::Acquire) {
            while let Ok(cmd) = self.requests.try_recv() {
                self.serve(cmd);
            }
            match self.link.mode() {
                Mode::Arbitrating => {
                    self.arbitrate();
                    continue;
                }
                Mode::Fenced | Mode::HandedOver => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Mode::Unprotected | Mode::Protected => {}
            }
            if let Some(conn) = self.listener.accept_timeout(Duration::from_millis(50)) {
                self.greet(conn);
            }
            if let Some(conn) = self.link.connection() {
                loop {
                    match conn.try_recv() {
                        Ok(Some(Msg::ResyncRequest { reason })) => {
                            tracing::warn!(
                                "backup {} asks for a resync: {reason}",
                                conn.peer_addr()
                            );
                            if let Err(e) = self.resync() {
                                tracing::error!("resync failed: {e}");
                                self.link.detach(&format!("resync failed: {e}"));
                            }
                        }
                        Ok(Some(Msg::Bye { reason })) => {
                            self.link.detach(&format!("the backup left: {reason}"));
                            break;
                        }
                        Ok(Some(other)) => {
                            tracing::debug!("ignored from the backup: {other:?}");
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let why = conn.failure().unwrap_or_else(|| e.to_string());
                            self.link.detach(&why);
                            break;
                        }
                    }
                }
            }
        }
    }

    fn serve(&self, cmd: Command) {
        match cmd {
            Command::Stop(reply) => {
                tracing::warn!("stopping the pair on request (ctl stop)");
                self.pair.stop_requested.store(true, Ordering::Release);
                let answer = match self.vcpu.request(VcpuEvent::Stop, VCPU_ANSWER) {
                    VcpuResponse::Stopped => serde_json::json!({ "stopping": true }),
                    other => refusal(format!("the vCPU did not stop: {other:?}")),
                };
                let _ = reply.send(answer);
            }
            Command::Switchover(then, reply) => {
                let answer = match self.switchover(then) {
                    Ok(done) => {
                        self.pair.switchovers.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut l) = self.pair.last_switchover.lock() {
                            *l = Some(done.clone());
                        }
                        done
                    }
                    Err(e) => {
                        tracing::error!("switchover: {e}");
                        refusal(e)
                    }
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// A planned switchover (docs/FAILOVER.md): pause, drain the log and the held output,
    /// hand the stream's end to the backup, which takes the lock and goes live there; then
    /// this side's guest stops for good. If the backup does not confirm, the lock decides
    /// which side runs, as when a backup is lost.
    fn switchover(&self, then: Then) -> Result<serde_json::Value, String> {
        let conn = match (self.link.mode(), self.link.connection()) {
            (Mode::Protected, Some(c)) => c,
            (mode, _) => {
                return Err(format!(
                    "no backup to hand over to: this primary is {}",
                    format!("{mode:?}").to_lowercase()
                ))
            }
        };
        let peer = conn.peer_addr();
        let start = Instant::now();
        tracing::warn!("switchover to {peer}: pausing the guest and draining the log");
        self.ask(VcpuEvent::Pause)?;
        let drained = self.drain(&conn);
        let drain_ms = start.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = drained {
            let _ = self.ask(VcpuEvent::Resume);
            return Err(format!(
                "switchover to {peer} abandoned, the guest runs on here: {e}"
            ));
        }
        // The point of no return for this side's output: nothing leaves here any more.
        self.link.begin_handover();
        let epoch = self.link.epoch();
        let sent = self.link.stats.sent_seq.load(Ordering::Acquire);
        let confirmed = conn
            .send(Msg::Released { seq: sent })
            .and_then(|()| conn.send(Msg::Handover { epoch }))
            .map_err(|e| e.to_string())
            .and_then(|()| wait_handed_over(&conn));
        match confirmed {
            Ok(listen) => {
                let addr = reachable(&listen, peer);
                *self
                    .pair
                    .handed_over
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(HandedOverTo {
                    addr: addr.clone(),
                    then,
                });
                self.link.detach("handed over");
                let total_ms = start.elapsed().as_secs_f64() * 1e3;
                tracing::warn!(
                    "switchover done: {peer} is the primary now (accepting backups on {addr}); drained in {drain_ms:.0} ms, live {total_ms:.0} ms after the pause; this side {}",
                    match then { Then::Stop => "stops", Then::Backup => "becomes its backup" }
                );
                let _ = self.vcpu.request(VcpuEvent::Stop, VCPU_ANSWER);
                Ok(serde_json::json!({
                    "switchover": "done",
                    "new_primary": addr,
                    "then": then.as_str(),
                    "epoch": epoch,
                    "drain_ms": drain_ms,
                    "pause_ms": total_ms,
                }))
            }
            Err(e) => {
                let why = format!("the backup {peer} did not take the guest: {e}");
                self.link.handover_failed(&why);
                if self.link.mode() == Mode::Arbitrating {
                    self.arbitrate();
                }
                if self.link.mode() == Mode::Fenced {
                    let fenced = format!("{why}; this side is fenced");
                    *self.pair.fenced.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(fenced.clone());
                    let _ = self.vcpu.request(VcpuEvent::Stop, VCPU_ANSWER);
                    return Err(fenced);
                }
                self.ask(VcpuEvent::Resume)?;
                Err(format!(
                    "{why}; this side won the lock and runs on, UNPROTECTED"
                ))
            }
        }
    }

    /// With the guest paused: every record out, every held output released (the backup has
    /// acknowledged the whole log).
    fn drain(&self, conn: &Connection) -> Result<(), String> {
        self.core
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + SWITCHOVER_LIMIT;
        while self.link.stats.held.load(Ordering::Acquire) > 0 {
            if !conn.is_alive() || self.link.mode() != Mode::Protected {
                return Err("the backup was lost while the log drained".into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the backup did not acknowledge the log within {} s",
                    SWITCHOVER_LIMIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// A new connection: check it, then attach it or refuse it.
    fn greet(&self, conn: Connection) {
        let peer = conn.peer_addr();
        let refuse = |reason: String| {
            tracing::warn!("refused backup {peer}: {reason}");
            self.pair.refused.fetch_add(1, Ordering::Relaxed);
            let _ = conn.send(Msg::Refused { reason });
            conn.close("refused");
        };
        let hello = match conn.recv_timeout(Duration::from_secs(5)) {
            Ok(Some(Msg::Hello {
                version,
                config_hash,
                config_summary,
            })) => (version, config_hash, config_summary),
            Ok(other) => {
                return refuse(format!("expected Hello, got {other:?}"));
            }
            Err(e) => {
                tracing::warn!("backup {peer} left before saying hello: {e}");
                return;
            }
        };
        if hello.0 != PROTOCOL_VERSION {
            return refuse(format!(
                "protocol version {} is not this primary's {PROTOCOL_VERSION}",
                hello.0
            ));
        }
        if let Some(current) = self.link.connection() {
            return refuse(format!(
                "this primary already has a backup ({}); stop it first",
                current.peer_addr()
            ));
        }
        if hello.1 != self.hash {
            return refuse(format!(
                "the machine flags differ: the primary has [{}], the backup has [{}]",
                self.summary, hello.2
            ));
        }
        if let Err(e) = conn.send(Msg::Welcome) {
            tracing::warn!("backup {peer}: {e}");
            return;
        }
        match self.attach(&conn) {
            Ok(report) => {
                tracing::warn!(
                    "backup {peer} attached: {} rounds, {:.1} MiB in {:.0} ms, pause {:.1} ms: PROTECTED",
                    report.rounds,
                    report.bytes as f64 / (1 << 20) as f64,
                    report.total_ms,
                    report.pause_ms
                );
                self.pair.attaches.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut a) = self.pair.last_attach.lock() {
                    *a = Some(report);
                }
            }
            Err(e) => {
                tracing::error!("attaching backup {peer} failed: {e}: still UNPROTECTED");
                let _ = self.vcpu.request(VcpuEvent::StopDirtyTracking, VCPU_ANSWER);
                conn.close(&e);
            }
        }
    }

    fn ask(&self, event: VcpuEvent) -> Result<VcpuResponse, String> {
        match self.vcpu.request(event, VCPU_ANSWER) {
            VcpuResponse::Refused(why) => Err(why),
            VcpuResponse::Stopped => Err("the guest stopped".into()),
            r => Ok(r),
        }
    }

    fn send_pages(
        &self,
        conn: &Connection,
        round: u32,
        pfns: &[u64],
        report: &mut AttachReport,
    ) -> Result<(), String> {
        for chunk in pfns.chunks(PAGES_PER_MESSAGE) {
            let pages = read_pages(&self.mem, chunk, round == 1);
            if pages.is_empty() {
                continue;
            }
            report.pages += pages.len() as u64;
            let msg = TransferMsg::Pages { round, pages }.encode();
            report.bytes += msg.len() as u64;
            conn.send(Msg::Transfer(msg)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Live state transfer to a new backup (ARCHITECTURE.md, "Attaching a backup").
    fn attach(&self, conn: &Connection) -> Result<AttachReport, String> {
        let start = Instant::now();
        let mut report = AttachReport {
            peer: conn.peer_addr().to_string(),
            ..AttachReport::default()
        };
        let progress = Progress::new(conn.peer_addr().to_string());
        self.ask(VcpuEvent::StartDirtyTracking)?;
        // Round 1: all of RAM (zero pages skipped: the backup starts from zeroed RAM).
        let all: Vec<u64> = (0..self.ram_pages).collect();
        let mut round = 1;
        self.send_pages(conn, round, &all, &mut report)?;
        progress.round(round, &report, start, 0);
        let mut prev = usize::MAX;
        loop {
            let dirty = match self.ask(VcpuEvent::DirtyPages)? {
                VcpuResponse::DirtyPages(p) => p,
                other => return Err(format!("unexpected answer {other:?}")),
            };
            // Stop when few pages are left, when the set stops shrinking, or after a bound;
            // what is left goes in the pause.
            if dirty.len() <= LAST_ROUND_PAGES
                || dirty.len() * 10 >= prev * 9
                || round >= MAX_ROUNDS
            {
                // The pages of this harvest go in the final snapshot: give them back.
                return self.finish_attach(conn, dirty, report, start, &progress);
            }
            prev = dirty.len();
            round += 1;
            self.send_pages(conn, round, &dirty, &mut report)?;
            progress.round(round, &report, start, dirty.len());
            if !conn.is_alive() {
                return Err(conn.failure().unwrap_or_else(|| "connection lost".into()));
            }
        }
    }

    fn finish_attach(
        &self,
        conn: &Connection,
        leftover: Vec<u64>,
        mut report: AttachReport,
        start: Instant,
        progress: &Progress,
    ) -> Result<AttachReport, String> {
        report.rounds = progress.rounds();
        let pause = Instant::now();
        self.ask(VcpuEvent::Pause)?;
        let result = (|| {
            let mut snap = match self.ask(VcpuEvent::Snapshot { full: false })? {
                VcpuResponse::Snapshot(s) => s,
                other => return Err(format!("unexpected answer {other:?}")),
            };
            // The last harvest's pages were taken out of the transfer set: add them.
            let extra = read_pages(&self.mem, &leftover, false);
            report.pages += (snap.pages.pages.len() + extra.len()) as u64;
            snap.pages.pages.extend(extra);
            let exits = snap.digest.count();
            let msg = TransferMsg::Final {
                snapshot: snap.encode(),
                epoch: self.link.epoch(),
            }
            .encode();
            report.bytes += msg.len() as u64;
            conn.send(Msg::Transfer(msg)).map_err(|e| e.to_string())?;
            // The log stream starts here: its header, then the base of the deltas after it.
            self.link.attach(conn.clone());
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let (rip, time_ns, _) = core.base();
            core.write_record(&Record::Base {
                rip,
                time_ns,
                exits,
            })
            .map_err(|e| e.to_string())?;
            core.flush().map_err(|e| e.to_string())?;
            Ok(())
        })();
        let resumed = self.ask(VcpuEvent::Resume);
        report.pause_ms = pause.elapsed().as_secs_f64() * 1e3;
        report.total_ms = start.elapsed().as_secs_f64() * 1e3;
        let _ = self.ask(VcpuEvent::StopDirtyTracking);
        progress.done(&report);
        if let Err(e) = result {
            self.link.detach(&e);
            return Err(e);
        }
        resumed?;
        Ok(report)
    }

    /// A full snapshot into the stream, for a backup that diverged.
    fn resync(&self) -> Result<(), String> {
        self.ask(VcpuEvent::Pause)?;
        let result = (|| {
            let snap = match self.ask(VcpuEvent::Snapshot { full: true })? {
                VcpuResponse::Snapshot(s) => s,
                other => return Err(format!("unexpected answer {other:?}")),
            };
            let exits = snap.digest.count();
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let (rip, time_ns, _) = core.base();
            core.write_record(&Record::Resync {
                rip,
                time_ns,
                exits,
                data: snap.encode(),
            })
            .map_err(|e| e.to_string())?;
            core.flush().map_err(|e| e.to_string())
        })();
        self.ask(VcpuEvent::Resume)?;
        self.pair.resyncs.fetch_add(1, Ordering::Relaxed);
        result
    }
}

/// How long a switchover waits for the backup to acknowledge the log, and then to go live.
const SWITCHOVER_LIMIT: Duration = Duration::from_secs(30);

/// Waits for the backup's [`Msg::HandedOver`]; its refusal or its loss is an error.
fn wait_handed_over(conn: &Connection) -> Result<String, String> {
    let deadline = Instant::now() + SWITCHOVER_LIMIT;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(Msg::HandedOver { listen })) => return Ok(listen),
            Ok(Some(Msg::Refused { reason })) => return Err(format!("it declined: {reason}")),
            Ok(Some(Msg::Bye { reason })) => return Err(format!("it left: {reason}")),
            Ok(_) => {}
            Err(e) => return Err(conn.failure().unwrap_or_else(|| e.to_string())),
        }
    }
    Err(format!(
        "it did not confirm within {} s",
        SWITCHOVER_LIMIT.as_secs()
    ))
}

/// The new primary's listening address as this side can reach it: an unspecified address
/// (`0.0.0.0:P`) means the address this side reached it at.
fn reachable(listen: &str, peer: std::net::SocketAddr) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            std::net::SocketAddr::new(peer.ip(), a.port()).to_string()
        }
        _ => listen.to_string(),
    }
}

/// Attach progress: a line per round, or one line rewritten in place on a terminal.
struct Progress {
    peer: String,
    tty: bool,
    rounds: std::cell::Cell<u32>,
}

impl Progress {
    fn new(peer: String) -> Progress {
        Progress {
            peer,
            tty: std::io::stderr().is_terminal(),
            rounds: std::cell::Cell::new(0),
        }
    }

    fn rounds(&self) -> u32 {
        self.rounds.get()
    }

    fn round(&self, round: u32, r: &AttachReport, start: Instant, dirty: usize) {
        self.rounds.set(round);
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        let mib = r.bytes as f64 / (1 << 20) as f64;
        let line = format!(
            "attach {}: round {round}: {} pages, {mib:.1} MiB sent, {:.1} MiB/s, {} pages dirty",
            self.peer,
            r.pages,
            mib / secs,
            dirty
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            tracing::info!("{line}");
        }
    }

    fn done(&self, r: &AttachReport) {
        if self.tty {
            eprintln!();
        }
        tracing::info!(
            "attach {}: done in {:.0} ms, {} pages, pause {:.1} ms",
            self.peer,
            r.total_ms,
            r.pages,
            r.pause_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_becomes_a_backup_with_its_machine_and_pair_flags() {
        let args: Vec<String> = [
            "--role",
            "primary",
            "--listen",
            "10.0.0.1:7000",
            "--restore",
            "vm.snap",
            "--kernel",
            "k",
            "--snapshot-on-exit=x.snap",
            "--key-file",
            "key",
            "--lock",
            "file:/l",
            "--memory",
            "256M",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            backup_argv(&args),
            [
                "--listen",
                "10.0.0.1:7000",
                "--kernel",
                "k",
                "--key-file",
                "key",
                "--lock",
                "file:/l",
                "--memory",
                "256M"
            ]
        );
    }

    #[test]
    fn an_unspecified_listen_address_is_reached_at_the_peer() {
        let peer: std::net::SocketAddr = "10.1.2.3:45678".parse().unwrap();
        assert_eq!(reachable("0.0.0.0:7000", peer), "10.1.2.3:7000");
        assert_eq!(reachable("10.9.9.9:7000", peer), "10.9.9.9:7000");
    }
}
