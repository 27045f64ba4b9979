//! The primary node: runs the guest, accepts one backup at a time, transfers the running VM to
//! it (iterative pre-copy, then one short pause: [`crate::attach`]), streams the event log to it
//! and holds output until the backup has acknowledged the log up to it ([`crate::link`]).
//!
//! Threads: the vCPU (the caller's, `Vm::run`), the pair manager (accepts backups, runs the
//! transfer, resyncs and switchovers, through the vCPU control path), the output releaser, the
//! network runtime of the logging channel, the API socket.

use crate::api::{refusal, ApiFn, Request, StatusFn, SwitchoverPlan, Then};
use crate::arbitrate;
use crate::attach::{AttachReport, VCPU_ANSWER};
use crate::config::{Host, PrimaryConfig};
use crate::error::{Handover, PairError, SwitchoverError};
use crate::golive::{self, Start};
use crate::link::{AckMode, Link, Mode};
use crate::lock::{self, Arbiter, LockError};
use crate::mirror::Mirror;
use crate::status::{
    ChannelFigures, Latency, PrimaryLag, PrimaryLog, PrimaryStatus, Status, SwitchoverReport,
};
use crate::{End, Finished};
use devices::disk::ImageFile;
use ft_core::disk::{copy_digest, hex, DiskCheck, DiskMode};
use ft_core::log::Record;
use ft_core::record::{RecordCounters, SharedRecordCore};
use ft_core::Boundary;
use logging_channel::{Connection, Listener, Msg};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::control::{VcpuEvent, VcpuHandle, VcpuResponse};
use vmm::memory::GuestMemoryMmap;
use vmm::Vm;

/// The pair's counters, from the primary's side.
#[derive(Default)]
pub(crate) struct PairState {
    pub(crate) attaches: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) resyncs: AtomicU64,
    pub(crate) last_attach: Mutex<Option<AttachReport>>,
    pub(crate) stop: AtomicBool,
    /// Why this side was fenced, once it was.
    pub(crate) fenced: Mutex<Option<String>>,
    /// Takeovers this process made.
    pub(crate) history: Mutex<Vec<TakeoverRecord>>,
    /// Where the guest went in a planned switchover, once it did.
    pub(crate) handed_over: Mutex<Option<HandedOverTo>>,
    /// `ctl stop` asked for this stop.
    pub(crate) stop_requested: AtomicBool,
    /// Switchovers this side made as the primary, the last one's figures.
    pub(crate) switchovers: AtomicU64,
    pub(crate) last_switchover: Mutex<Option<SwitchoverReport>>,
    /// Verifications of a mirrored disk the backup answered, those that found a difference,
    /// and the last one.
    pub(crate) disk_check_ids: AtomicU64,
    pub(crate) disk_checks: AtomicU64,
    pub(crate) disk_mismatches: AtomicU64,
    pub(crate) last_disk_check: Mutex<Option<DiskCheck>>,
}

/// The new primary of a planned switchover, and what this side does next.
#[derive(Clone, Debug)]
pub struct HandedOverTo {
    /// Where the new primary accepts backups.
    pub addr: String,
    /// What the old primary does next: stop, or become the new primary's backup.
    pub then: Then,
}

/// How a primary's services ended.
pub struct Ending {
    /// Why this side was fenced, if it was.
    pub fenced: Option<String>,
    /// Where the guest went, after a switchover.
    pub handed_over: Option<HandedOverTo>,
    /// Whether `ctl stop` stopped it.
    pub stop_requested: bool,
}

impl Ending {
    /// The exit status of a run that stopped on request (`ctl stop`, a switchover): 0, not
    /// the 130 of a signal.
    pub fn status(&self, status: u8) -> u8 {
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
    Switchover(SwitchoverPlan, mpsc::Sender<serde_json::Value>),
    VerifyDisk(mpsc::Sender<serde_json::Value>),
}

/// Runs a primary until its guest stops; the caller reports the run and decides the exit
/// status ([`End::Primary`]).
pub fn run(cfg: &PrimaryConfig, host: Arc<dyn Host>) -> Result<Finished, PairError> {
    let config = &cfg.machine;
    cfg.pair.check()?;
    let (hash, summary) = crate::config::identity(config, cfg.pair.disk)?;

    // The lock first: a primary that cannot hold it must not run at all.
    // The owner record says where this side accepts backups: standbys find it there.
    let owner = lock::owner_record("primary", Some(&cfg.listen));
    let arbiter = open_lock(cfg.pair.lock.as_deref())?;
    // Nor on a mirrored copy that is behind the pair's other one.
    if let (DiskMode::Mirrored, Some(image)) = (cfg.pair.disk, &config.disk) {
        let sidecar =
            crate::sidecar::read(image).map_err(|e| PairError::StaleCopy(e.to_string()))?;
        if let Some(s) = sidecar {
            let lock_epoch = match &arbiter {
                Some(l) => l.read()?.epoch,
                None => 0,
            };
            if let Some(why) = crate::sidecar::refuse_as_primary(image, &s, lock_epoch) {
                return Err(PairError::StaleCopy(format!(
                    "a primary does not start on {}: {why}",
                    image.display()
                )));
            }
        }
    }
    let epoch = match &arbiter {
        Some(l) => {
            let e = l.claim(&owner)?;
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

    // The live side reads the host; its output goes through the output rule.
    let net = host.net(config)?;
    let net_out =
        match &net {
            Some((tap, _)) => Some(Box::new(tap.writer().map_err(PairError::io("tap"))?)
                as Box<dyn std::io::Write + Send>),
            None => None,
        };
    let mut stack = golive::build(golive::StackParts {
        cfg: &cfg.pair,
        live: &cfg.live,
        machine: config,
        host: host.as_ref(),
        hash,
        summary: &summary,
        epoch,
        net_rx: net.map(|(_, queue)| queue),
        start: Start::Boot,
    })?;
    let core = stack.recorder.core();

    vmm::kick::stop_on_signals().map_err(PairError::io("cannot install signal handlers"))?;
    let mut vm = Vm::new(config, &mut stack.recorder, false, stack.held.take())?;
    vm.set_checkpoint_delta(cfg.live.checkpoint_delta);
    tracing::info!("kernel command line: {}", vm.cmdline());
    if let Some(path) = &cfg.restore {
        let snap = vmm::snapshot::Snapshot::read_file(path)?;
        vm.restore(&snap)?;
        stack.recorder.restored(vm.now_ns());
        tracing::info!("restored {} (rip {:#x})", path.display(), snap.vcpu.rip());
        drop(snap);
        vmm::memory::trim_heap();
    }

    let listen = &cfg.listen;
    let listener = Listener::bind(listen, cfg.pair.channel.clone())
        .map_err(PairError::channel(format!("cannot listen on {listen}")))?;
    let (handle, control) = vmm::control::channel();
    let services = Services::start(ServiceParts {
        listener,
        link: stack.link.clone(),
        core,
        vcpu: handle,
        mem: vm.memory(),
        hash,
        summary,
        ram_pages: config.memory_bytes / 4096,
        serial: host.serial_output()?,
        net: net_out,
        release_image: stack.release_image.take(),
        mirror: stack.mirror.take(),
        arbiter: arbiter.map(Arc::from),
        owner,
        history: Vec::new(),
    })?;
    let served = host.serve(services.api(), services.status())?;

    let result = vm.run(&mut stack.recorder, &control);
    control.finish();
    let ending = services.shutdown(result.is_ok());
    drop(served);
    Ok(Finished {
        vm,
        result,
        end: End::Primary(ending),
    })
}

/// Opens the lock named by a `--lock` value, if there is one.
pub(crate) fn open_lock(spec: Option<&str>) -> Result<Option<Box<dyn Arbiter>>, LockError> {
    spec.map(lock::open).transpose()
}

/// A takeover this process made (it was a backup and went live).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TakeoverRecord {
    /// Unix time of the takeover, seconds.
    pub at_unix_s: u64,
    /// The epoch won.
    pub epoch: u64,
    /// The primary that was lost.
    pub from: String,
    /// Why it was considered lost.
    pub why: String,
    /// A planned switchover (the old primary handed the guest over), not a failure.
    pub planned: bool,
    /// From the last frame received from the old primary to the end of its stream, ms.
    pub detect_ms: f64,
    /// From the end of the stream to the live guest, ms.
    pub go_live_ms: f64,
    /// From the end of the stream to the next backup attached (the pair protected again), ms;
    /// `null` until one has attached.
    pub protected_again_ms: Option<f64>,
    /// When the stream ended (what `protected_again_ms` counts from).
    #[serde(skip)]
    pub lost_at: Instant,
}

/// What a primary's services are made of.
pub(crate) struct ServiceParts {
    pub listener: Listener,
    pub link: Arc<Link>,
    pub core: SharedRecordCore,
    pub vcpu: VcpuHandle,
    pub mem: GuestMemoryMmap,
    pub hash: u64,
    pub summary: String,
    pub ram_pages: u64,
    pub serial: Box<dyn std::io::Write + Send>,
    pub net: Option<Box<dyn std::io::Write + Send>>,
    pub release_image: Option<ImageFile>,
    /// The primary's copy of a mirrored disk, for attaches.
    pub mirror: Option<Mirror>,
    pub arbiter: Option<Arc<dyn Arbiter>>,
    pub owner: String,
    pub history: Vec<TakeoverRecord>,
}

/// A primary's threads beside the vCPU: the output releaser and the pair manager.
pub(crate) struct Services {
    link: Arc<Link>,
    counters: Arc<RecordCounters>,
    commands: mpsc::Sender<Command>,
    pair: Arc<PairState>,
    releaser: crate::link::Releaser,
    manager: std::thread::JoinHandle<()>,
    listen: String,
    arbiter: Option<Arc<dyn Arbiter>>,
    owner: String,
}

impl Services {
    /// Starts the releaser and the pair manager.
    pub fn start(parts: ServiceParts) -> Result<Services, PairError> {
        let releaser = parts
            .link
            .start_releaser(parts.serial, parts.net, parts.release_image)
            .map_err(PairError::io("cannot start the output releaser"))?;
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
            mirror: parts.mirror.map(Mutex::new),
            arbiter: parts.arbiter.clone(),
            owner: parts.owner.clone(),
            verifying: RefCell::new(None),
        };
        let manager = std::thread::Builder::new()
            .name("pair-manager".into())
            .spawn(move || ctx.run())
            .map_err(PairError::io("cannot start the pair manager"))?;
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
    pub fn status(&self) -> StatusFn {
        primary_status(
            self.link.clone(),
            self.pair.clone(),
            self.counters.clone(),
            self.listen.clone(),
            self.arbiter.as_ref().map(|a| a.spec()),
        )
    }

    /// What this primary answers on its API socket: status, stop, switchover.
    pub fn api(&self) -> ApiFn {
        let status = self.status();
        let commands = self.commands.clone();
        Arc::new(move |req| {
            let (reply, answer) = mpsc::channel();
            let (cmd, limit) = match req {
                Request::Status => return status().to_json(),
                Request::Stop => (Command::Stop(reply), Duration::from_secs(30)),
                Request::Switchover(plan) => (
                    Command::Switchover(plan, reply),
                    SWITCHOVER_LIMIT * 3 + CONVERGE_LIMIT,
                ),
                Request::VerifyDisk => (
                    Command::VerifyDisk(reply),
                    VERIFY_LIMIT + Duration::from_secs(60),
                ),
                // The socket's server attaches consoles (crate::console).
                Request::Console => return refusal("this API socket has no console"),
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
    pub fn shutdown(self, clean: bool) -> Ending {
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
    lock_spec: Option<String>,
) -> StatusFn {
    let start = Instant::now();
    let last = Mutex::new((Instant::now(), 0u64, 0u64));
    Arc::new(move || {
        let conn = link.connection();
        let stats = &link.stats;
        let sent = stats.sent_seq.load(Ordering::Relaxed);
        let (received, executed, backup_vtime) = conn.as_ref().map_or((0, 0, 0), |c| c.acked());
        let wire = conn.as_ref().map(|c| c.stats());
        let (bytes_out, bytes_in) = wire.map_or((0, 0), |w| (w.bytes_sent, w.bytes_received));
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
        let (p50, p99) = latency_percentiles(&stats.latencies());
        Status::Primary(Box::new(PrimaryStatus {
            role: "primary",
            host: vmm::host::status(),
            listen: listen.clone(),
            peer: conn.as_ref().map(|c| c.peer_addr().to_string()),
            protected: link.protected(),
            ack_mode: match link.ack_mode() {
                AckMode::Received => "received",
                AckMode::Executed => "executed",
            },
            uptime_s: start.elapsed().as_secs_f64(),
            log: PrimaryLog {
                sent,
                received,
                executed,
                bytes: stats.log_bytes.load(Ordering::Relaxed),
                batches: stats.log_batches.load(Ordering::Relaxed),
                raw_bytes: stats.log_raw_bytes.load(Ordering::Relaxed),
            },
            lag: PrimaryLag {
                records: sent.saturating_sub(executed),
                vtime_ns: link.lag_ns((received, executed, backup_vtime)),
                throttled: stats.throttled.load(Ordering::Relaxed),
                exceeded: stats.lag_exceeded.load(Ordering::Relaxed),
                dropped: stats.dropped_lagging.load(Ordering::Relaxed),
            },
            outputs_held: stats.held.load(Ordering::Relaxed),
            outputs_held_bytes: stats.held_bytes.load(Ordering::Relaxed),
            outputs_released: stats.released.load(Ordering::Relaxed),
            output_latency_us: Latency { p50, p99 },
            channel: ChannelFigures {
                bytes_per_s: Some(rate),
                ..wire.as_ref().map(ChannelFigures::of).unwrap_or_default()
            },
            attaches: pair.attaches.load(Ordering::Relaxed),
            backups_refused: pair.refused.load(Ordering::Relaxed),
            resyncs: pair.resyncs.load(Ordering::Relaxed),
            last_backup_lost: link.lost(),
            attach,
            mode: format!("{:?}", link.mode()).to_lowercase(),
            lock: lock_spec.clone(),
            epoch: link.epoch(),
            takeovers: pair.history.lock().map(|h| h.clone()).unwrap_or_default(),
            fenced: pair.fenced.lock().map(|f| f.clone()).unwrap_or_default(),
            checkpoints,
            checkpoint_bytes,
            switchovers: pair.switchovers.load(Ordering::Relaxed),
            last_switchover: pair
                .last_switchover
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            handed_over_to: pair
                .handed_over
                .lock()
                .ok()
                .and_then(|h| h.as_ref().map(|h| h.addr.clone())),
            disk_checks: pair.disk_checks.load(Ordering::Relaxed),
            disk_mismatches: pair.disk_mismatches.load(Ordering::Relaxed),
            last_disk_check: pair
                .last_disk_check
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default(),
            standby: None,
        }))
    })
}

/// The pair manager: accepts backups, runs their transfer, serves resync requests.
pub(crate) struct Manager {
    pub(crate) listener: Listener,
    pub(crate) link: Arc<Link>,
    pub(crate) core: SharedRecordCore,
    requests: mpsc::Receiver<Command>,
    pub(crate) vcpu: VcpuHandle,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) hash: u64,
    pub(crate) summary: String,
    pub(crate) pair: Arc<PairState>,
    pub(crate) ram_pages: u64,
    /// The primary's copy of a mirrored disk: it travels with the VM at an attach.
    pub(crate) mirror: Option<Mutex<Mirror>>,
    pub(crate) arbiter: Option<Arc<dyn Arbiter>>,
    pub(crate) owner: String,
    /// A verification of the mirrored disk waiting for the backup's answer.
    verifying: RefCell<Option<Verifying>>,
}

/// A verification of the mirrored disk in the stream, waiting for the backup's answer.
struct Verifying {
    check: DiskCheck,
    /// The backup's connection, which brings the answer.
    conn: Connection,
    reply: mpsc::Sender<serde_json::Value>,
    deadline: Instant,
}

impl Manager {
    /// The backup was lost and a lock decides: race for it. Winning leaves this side
    /// unprotected (its held output is released); losing, or not reaching the lock, fences it
    /// and stops the guest.
    fn arbitrate(&self) {
        let Some(arbiter) = &self.arbiter else {
            return;
        };
        let outcome = arbitrate::race(arbiter.as_ref(), self.link.epoch(), &self.owner)
            .map_err(|lost| lost.to_string());
        match outcome {
            Ok(e) => {
                self.link.won(e);
                self.copy_meta(|m| m.current(e));
            }
            Err(why) => {
                self.copy_meta(|m| m.stale(self.link.epoch(), &format!("fenced: {why}")));
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
            self.verify_overdue();
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
            if let Some(why) = self.link.take_drop_request() {
                self.link
                    .stats
                    .dropped_lagging
                    .fetch_add(1, Ordering::Relaxed);
                self.link.detach(&why);
                continue;
            }
            if let Some(conn) = self.link.connection() {
                loop {
                    match conn.try_recv() {
                        Ok(Some(Msg::ResyncRequest { reason })) => {
                            tracing::warn!(
                                "backup {} asks for a resync: {reason}",
                                conn.peer_addr()
                            );
                            if std::env::var_os("FTVMM_TEST_IGNORE_RESYNC").is_some() {
                                // Tests: a backup left waiting for its resync.
                                tracing::warn!("resync request ignored (FTVMM_TEST_IGNORE_RESYNC)");
                                continue;
                            }
                            if let Err(e) = self.resync() {
                                tracing::error!("resync failed: {e}");
                                self.link.detach(&format!("resync failed: {e}"));
                            }
                        }
                        Ok(Some(answer @ Msg::DiskVerified { .. })) => self.verified(answer),
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
            Command::VerifyDisk(reply) => match self.verify_disk() {
                Ok((check, conn)) => {
                    *self.verifying.borrow_mut() = Some(Verifying {
                        check,
                        conn,
                        reply,
                        deadline: Instant::now() + VERIFY_LIMIT,
                    });
                }
                Err(why) => {
                    let _ = reply.send(refusal(why));
                }
            },
            Command::Stop(reply) => {
                tracing::warn!("stopping the pair on request (ctl stop)");
                self.pair.stop_requested.store(true, Ordering::Release);
                let answer = match self.vcpu.request(VcpuEvent::Stop, VCPU_ANSWER) {
                    VcpuResponse::Stopped => serde_json::json!({ "stopping": true }),
                    other => refusal(format!("the vCPU did not stop: {other:?}")),
                };
                let _ = reply.send(answer);
            }
            Command::Switchover(plan, reply) => {
                let answer = match self.switchover(plan) {
                    Ok(done) => {
                        self.pair.switchovers.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut l) = self.pair.last_switchover.lock() {
                            *l = Some(done.clone());
                        }
                        serde_json::to_value(done).unwrap_or_else(refusal)
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

    /// Does `f` with the mirrored copy's sidecar, if the disk is mirrored.
    fn copy_meta(&self, f: impl FnOnce(&crate::sidecar::CopyMeta)) {
        if let Some(m) = &self.mirror {
            let meta = m.lock().unwrap_or_else(|e| e.into_inner()).meta.clone();
            f(&meta);
        }
    }

    /// `ctl verify-disk`: puts the digests of this side's mirrored copy into the stream at one
    /// position (a [`Record::DiskVerify`]), for the backup to compare its own copy with when
    /// its replay gets there. The digests are kept current by the guest's writes: the blocks
    /// written since the last verification are hashed while the guest runs, then those written
    /// meanwhile with the guest paused, so that they are exact at the record.
    fn verify_disk(&self) -> Result<(DiskCheck, Connection), String> {
        let Some(mirror) = &self.mirror else {
            return Err(
                "the disk is not mirrored (--disk-mode mirrored): nothing to compare".into(),
            );
        };
        let conn = match (self.link.mode(), self.link.connection()) {
            (Mode::Protected, Some(conn)) => conn,
            _ => {
                return Err("no backup is attached: there is no other copy to compare with".into())
            }
        };
        if self.verifying.borrow().is_some() {
            return Err("a verification is under way: wait for its answer".into());
        }
        let start = Instant::now();
        let mut mirror = mirror.lock().unwrap_or_else(|e| e.into_inner());
        let Mirror { image, digests, .. } = &mut *mirror;
        let mut hashed = digests
            .refresh(image)
            .map_err(|e| format!("reading this side's copy: {e}"))?;
        let id = self.pair.disk_check_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let pause = Instant::now();
        self.ask(VcpuEvent::Pause).map_err(|e| e.to_string())?;
        let written = (|| {
            hashed += digests
                .refresh(image)
                .map_err(|e| format!("reading this side's copy: {e}"))?;
            let current = digests.current();
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let seq = core
                .write_record(&Record::DiskVerify {
                    id,
                    digests: current.as_flattened().to_vec(),
                })
                .map_err(|e| e.to_string())?;
            core.flush().map_err(|e| e.to_string())?;
            Ok::<_, String>((seq, current))
        })();
        let resumed = self.ask(VcpuEvent::Resume);
        let pause_ms = pause.elapsed().as_secs_f64() * 1e3;
        let (seq, current) = written?;
        resumed.map_err(|e| e.to_string())?;
        let check = DiskCheck {
            id,
            position: seq,
            result: "pending".into(),
            blocks: current.len() as u64,
            digest: hex(&copy_digest(&current)),
            hashed_blocks: hashed,
            ms: start.elapsed().as_secs_f64() * 1e3,
            pause_ms: Some(pause_ms),
            ..DiskCheck::default()
        };
        tracing::info!(
            "verify-disk {id}: the copy's digests are in the log at position {seq} ({hashed} blocks hashed, {:.1} ms, the guest paused {pause_ms:.2} ms): waiting for the backup",
            check.ms
        );
        *self
            .pair
            .last_disk_check
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(check.clone());
        Ok((check, conn))
    }

    /// The backup's answer to a verification ([`Msg::DiskVerified`]).
    fn verified(&self, answer: Msg) {
        let Msg::DiskVerified {
            id,
            position,
            matched,
            differing,
            first_differing,
            hashed_blocks: _,
            micros,
        } = answer
        else {
            return;
        };
        let Some(mut v) = self.verifying.borrow_mut().take_if(|v| v.check.id == id) else {
            tracing::warn!("the backup answered verification {id}, which is not under way");
            return;
        };
        let c = &mut v.check;
        c.result = if matched { "match" } else { "mismatch" }.into();
        c.differing = differing;
        c.first_differing = first_differing;
        c.backup_ms = Some(micros as f64 / 1e3);
        if position != c.position {
            tracing::error!(
                "verify-disk {id}: the backup compared at position {position}, this side wrote {}",
                c.position
            );
        }
        self.pair.disk_checks.fetch_add(1, Ordering::Relaxed);
        if matched {
            tracing::info!(
                "verify-disk {id}: the copies are equal at position {position} ({} blocks)",
                c.blocks
            );
        } else {
            self.pair.disk_mismatches.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "verify-disk {id}: the backup's copy differs at position {position}: {differing} of {} blocks (the first: {:?}); it heals by attaching again",
                c.blocks,
                c.first_differing
            );
        }
        *self
            .pair
            .last_disk_check
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        let _ = v
            .reply
            .send(serde_json::to_value(&v.check).unwrap_or_else(refusal));
    }

    /// A verification whose backup did not answer in time, or left: refused.
    fn verify_overdue(&self) {
        let Some(conn) = self.verifying.borrow().as_ref().map(|v| v.conn.clone()) else {
            return;
        };
        let gone = self.link.connection().is_none();
        if gone {
            // The answer may have come just before the backup left (a mismatch: it attaches
            // again to heal its copy), and the connection still hands it out.
            while let Ok(Some(m)) = conn.try_recv() {
                if matches!(m, Msg::DiskVerified { .. }) {
                    self.verified(m);
                }
            }
        }
        let mut verifying = self.verifying.borrow_mut();
        if let Some(v) = verifying.take_if(|v| gone || Instant::now() > v.deadline) {
            let why = if gone {
                "the backup left before it answered"
            } else {
                "the backup did not answer in time"
            };
            tracing::warn!("verify-disk {}: {why}", v.check.id);
            let _ = v.reply.send(refusal(format!(
                "verification {} at log position {}: {why}",
                v.check.id, v.check.position
            )));
        }
    }

    /// A planned switchover (docs/FAILOVER.md): pause, drain the log and the held output,
    /// hand the stream's end to the backup, which takes the lock and goes live there; then
    /// this side's guest stops for good. If the backup does not confirm, the lock decides
    /// which side runs, as when a backup is lost.
    fn switchover(&self, plan: SwitchoverPlan) -> Result<SwitchoverReport, SwitchoverError> {
        let then = plan.then;
        let conn = match (self.link.mode(), self.link.connection()) {
            (Mode::Protected, Some(c)) => c,
            (mode, _) => {
                return Err(SwitchoverError::NoBackup(
                    format!("{mode:?}").to_lowercase(),
                ))
            }
        };
        let peer = conn.peer_addr();
        let converged = self.converge(&conn, plan.converge);
        let start = Instant::now();
        tracing::warn!(
            "switchover to {peer}: pausing the guest ({}after {:.0} ms converging, {:.1} ms of virtual time behind) and draining the log",
            if converged.reached { "" } else { "not converged " },
            converged.ms,
            converged.lag_ms,
        );
        let paused = self.ask(VcpuEvent::Pause);
        // Paused (or not to be), the guest runs at full speed again when it runs.
        self.link.converge(false);
        paused?;
        let drained = self.drain(&conn);
        let drain_ms = start.elapsed().as_secs_f64() * 1e3;
        if let Err(e) = drained {
            let _ = self.ask(VcpuEvent::Resume);
            return Err(SwitchoverError::Abandoned {
                peer: peer.to_string(),
                source: e,
            });
        }
        // The point of no return for this side's output: nothing leaves here any more.
        self.link.begin_handover();
        let epoch = self.link.epoch();
        let sent = self.link.stats.sent_seq.load(Ordering::Acquire);
        let confirmed = conn
            .send(Msg::Released { seq: sent })
            .and_then(|()| conn.send(Msg::Handover { epoch }))
            .map_err(|e| Handover::Channel(e.to_string()))
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
                self.copy_meta(|m| {
                    m.stale(
                        epoch,
                        &format!(
                            "handed the guest over to {addr}, which writes its own copy from here"
                        ),
                    )
                });
                let total_ms = start.elapsed().as_secs_f64() * 1e3;
                tracing::warn!(
                    "switchover done: {peer} is the primary now (accepting backups on {addr}); drained in {drain_ms:.0} ms, live {total_ms:.0} ms after the pause; this side {}",
                    match then { Then::Stop => "stops", Then::Backup => "becomes its backup" }
                );
                let _ = self.vcpu.request(VcpuEvent::Stop, VCPU_ANSWER);
                Ok(SwitchoverReport {
                    switchover: "done",
                    new_primary: addr,
                    then: then.as_str(),
                    epoch,
                    drain_ms,
                    pause_ms: total_ms,
                    converge_ms: converged.ms,
                    converged: converged.reached,
                    lag_at_pause_ms: converged.lag_ms,
                })
            }
            Err(e) => {
                let why = format!("the backup {peer} did not take the guest: {e}");
                self.link.handover_failed(&why);
                if self.link.mode() == Mode::Arbitrating {
                    self.arbitrate();
                }
                if self.link.mode() == Mode::Fenced {
                    self.copy_meta(|m| m.stale(epoch, &format!("fenced in a switchover: {why}")));
                    let fenced = SwitchoverError::Fenced { why };
                    *self.pair.fenced.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(fenced.to_string());
                    let _ = self.vcpu.request(VcpuEvent::Stop, VCPU_ANSWER);
                    return Err(fenced);
                }
                self.ask(VcpuEvent::Resume)?;
                Err(SwitchoverError::RunsOn { why })
            }
        }
    }

    /// Before a switchover's pause: runs the guest at half speed, every record sent at once,
    /// until an acknowledgement shows the backup had replayed everything sent more than
    /// `within` before it, or [`CONVERGE_LIMIT`] passed (the pause then waits for the rest), or
    /// the backup is gone (the drain says so). The caller ends it ([`Link::converge`]) once the
    /// guest is paused.
    fn converge(&self, conn: &Connection, within: Duration) -> Converged {
        let start = Instant::now();
        let lag = |link: &Link| link.lag_ns(conn.acked()) as f64 / 1e6;
        if within.is_zero() {
            return Converged {
                ms: 0.0,
                lag_ms: lag(&self.link),
                reached: false,
            };
        }
        self.link.converge(true);
        let mut reached = false;
        while start.elapsed() < CONVERGE_LIMIT
            && conn.is_alive()
            && self.link.mode() == Mode::Protected
        {
            let seen = conn.acked();
            let (_, executed, _) = conn.wait_ack(seen, Duration::from_millis(50));
            let now = Instant::now();
            if conn.acked() != seen
                && self
                    .link
                    .replayed_all_sent_before(executed, now.checked_sub(within).unwrap_or(now))
            {
                reached = true;
                break;
            }
        }
        Converged {
            ms: start.elapsed().as_secs_f64() * 1e3,
            lag_ms: lag(&self.link),
            reached,
        }
    }

    /// With the guest paused: every record out, every held output released (the backup has
    /// acknowledged the whole log).
    fn drain(&self, conn: &Connection) -> Result<(), Handover> {
        self.core
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush()?;
        let deadline = Instant::now() + SWITCHOVER_LIMIT;
        while self.link.stats.held.load(Ordering::Acquire) > 0 {
            if !conn.is_alive() || self.link.mode() != Mode::Protected {
                return Err(Handover::LostWhileDraining);
            }
            if Instant::now() > deadline {
                return Err(Handover::NotAcknowledged(SWITCHOVER_LIMIT.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    pub(crate) fn ask(&self, event: VcpuEvent) -> Result<VcpuResponse, PairError> {
        match self.vcpu.request(event, VCPU_ANSWER) {
            VcpuResponse::Refused(why) => Err(PairError::VcpuRefused(why)),
            VcpuResponse::Stopped => Err(PairError::GuestStopped),
            r => Ok(r),
        }
    }

    /// A full snapshot into the stream, for a backup that diverged.
    fn resync(&self) -> Result<(), PairError> {
        self.ask(VcpuEvent::Pause)?;
        let result = (|| {
            let snap = match self.ask(VcpuEvent::Snapshot { full: true })? {
                VcpuResponse::Snapshot(s) => s,
                other => return Err(PairError::UnexpectedAnswer(format!("{other:?}"))),
            };
            let exits = snap.digest.count();
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let (rip, time_ns, _) = core.base();
            core.write_record(&Record::Resync {
                rip,
                time_ns,
                exits,
                data: snap.encode()?,
            })?;
            Ok(core.flush()?)
        })();
        self.ask(VcpuEvent::Resume)?;
        self.pair.resyncs.fetch_add(1, Ordering::Relaxed);
        result
    }
}

/// How long a verification of the mirrored disk waits for the backup's answer.
const VERIFY_LIMIT: Duration = Duration::from_secs(90);

/// How long a switchover waits for the backup to acknowledge the log, and then to go live.
const SWITCHOVER_LIMIT: Duration = Duration::from_secs(30);

/// How long a switchover slows the guest for the backup to come close before it pauses it
/// anyway ([`SwitchoverPlan::converge`]).
pub const CONVERGE_LIMIT: Duration = Duration::from_secs(5);

/// How a switchover's convergence ended.
struct Converged {
    /// How long it took, ms.
    ms: f64,
    /// The backup's lag then (virtual time, as its last acknowledgement said), ms.
    lag_ms: f64,
    /// Whether the backup came as close as asked.
    reached: bool,
}

/// Waits for the backup's [`Msg::HandedOver`]; its refusal or its loss is an error.
fn wait_handed_over(conn: &Connection) -> Result<String, Handover> {
    let deadline = Instant::now() + SWITCHOVER_LIMIT;
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(Msg::HandedOver { listen })) => return Ok(listen),
            Ok(Some(Msg::Refused { reason })) => return Err(Handover::Declined(reason)),
            Ok(Some(Msg::Bye { reason })) => return Err(Handover::Left(reason)),
            Ok(_) => {}
            Err(e) => {
                return Err(Handover::Channel(
                    conn.failure().unwrap_or_else(|| e.to_string()),
                ))
            }
        }
    }
    Err(Handover::NotConfirmed(SWITCHOVER_LIMIT.as_secs()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_listen_address_is_reached_at_the_peer() {
        let peer: std::net::SocketAddr = "10.1.2.3:45678".parse().unwrap();
        assert_eq!(reachable("0.0.0.0:7000", peer), "10.1.2.3:7000");
        assert_eq!(reachable("10.9.9.9:7000", peer), "10.9.9.9:7000");
    }
}
