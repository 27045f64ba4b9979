//! The backup node: attaches to a running primary, receives its VM (the live state transfer,
//! [`crate::attach`]), then replays its event log a step behind it, checking every exit and
//! every output, and acknowledging what it has received and executed ([`crate::receiver`]). It
//! never emits output and never touches the shared disk: disk reads come in the log, disk
//! writes are kept until the primary reports them released. A divergence is reported and
//! healed with a full snapshot from the primary. When the primary is lost (or hands the guest
//! over) and this side wins the lock, it goes live where the log ends ([`crate::golive`]).

use crate::api::{status_only, StatusFn, SwappableApi};
use crate::arbitrate;
use crate::attach::{receive_vm, Received};
use crate::config::{BackupConfig, Host};
use crate::error::{NoTakeover, PairError};
use crate::golive::{self, GoLiveParts};
use crate::link::AckMode;
use crate::lock::{self, Arbiter};
use crate::primary::{open_lock, Services};
use crate::receiver::BackupLink;
use crate::status::{BackupLag, BackupLog, BackupStatus, ChannelFigures, Status};
use crate::{End, Finished};
use devices::disk::Disk;
use ft_core::disk::DiskCheck;
use ft_core::disk::DiskMode;
use ft_core::replay::{DiskVerifier, KeptWrites, Progress, Replayer};
use ft_core::takeover::{Decision, Refusal, Takeover};
use ft_core::{Boundary, BoundaryError};
use logging_channel::Msg;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::snapshot::Snapshot;
use vmm::vcpu::VcpuError;
use vmm::VmError;

/// The disk the VM is built with before the replayer (which serves it) exists.
#[derive(Clone)]
pub(crate) struct SlotDisk {
    pub(crate) slot: Arc<Mutex<Option<Box<dyn Disk>>>>,
    pub(crate) size: u64,
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

/// The environment variable through which a backup that attaches again to heal its copy
/// ([`End::Reattach`]) tells its next run why.
pub const HEALING_ENV: &str = "FTVMM_HEALING";

#[derive(Default)]
struct BackupCounters {
    divergences: AtomicU64,
    resyncs: AtomicU64,
    attach_ms: AtomicU64,
    attach_disk_blocks: AtomicU64,
    disk_checks: AtomicU64,
    disk_mismatches: AtomicU64,
    last_disk_check: Mutex<Option<DiskCheck>>,
    healing: Mutex<Option<String>>,
}
/// Runs a backup until its guest stops (as a backup, or as the primary it became); the caller
/// reports the run and decides the exit status.
pub fn run(cfg: &BackupConfig, host: Arc<dyn Host>) -> Result<Finished, PairError> {
    let config = &cfg.machine;
    let addr = cfg.primary.clone();
    cfg.pair.check()?;
    let mirrored = cfg.pair.disk == DiskMode::Mirrored;
    let (hash, summary) = crate::config::identity(config, cfg.pair.disk)?;
    let Received {
        conn,
        mut vm,
        slot,
        disk_size,
        copy,
        epoch,
        attach_ms,
        disk_blocks,
        meta,
        ack,
    } = receive_vm(
        &addr,
        cfg.pair.channel.clone(),
        config,
        hash,
        &summary,
        cfg.live.checkpoint_delta,
        cfg.pair.disk,
    )?;
    let counters = Arc::new(BackupCounters::default());
    counters.attach_ms.store(attach_ms, Ordering::Relaxed);
    if let Some(why) = std::env::var(HEALING_ENV).ok().filter(|w| !w.is_empty()) {
        tracing::warn!(
            "backup: attached again to heal this side's copy ({disk_blocks} disk blocks written into it); it had diverged: {why}"
        );
        *counters.healing.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
    counters
        .attach_disk_blocks
        .store(disk_blocks, Ordering::Relaxed);

    let progress = Arc::new(Progress::default());
    let kept = Arc::new(Mutex::new(KeptWrites::default()));
    if let Some(to) = host.serial_released() {
        kept.lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_released_serial(to);
    }
    let (link, _threads) = BackupLink::start(conn.clone(), progress.clone(), kept.clone())
        .map_err(PairError::io("cannot start the log receiver"))?;
    link.set_ack_timer(cfg.pair.ack_timer);
    let mut replayer =
        Replayer::with_progress(link.reader(), Box::new(io::sink()), progress.clone()).map_err(
            |e| PairError::Primary {
                addr: addr.clone(),
                what: format!("the log stream: {e}"),
            },
        )?;
    replayer.check_config(hash, &summary)?;
    replayer.keep_writes(kept.clone());
    if mirrored {
        replayer.mirror_disk();
    }
    if let Some(copy) = &copy {
        let reader = copy.try_clone().map_err(PairError::io(
            "a second handle on this side's copy of the disk",
        ))?;
        replayer.verify_disk(DiskVerifier {
            reader,
            report: disk_check_report(link.clone(), counters.clone()),
        });
    }
    if let Some(n) = std::env::var("FTVMM_TEST_DIVERGE_AT_EXIT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        replayer.force_divergence_at(n);
    }
    let rtc_epoch = replayer.header().rtc_epoch;

    // Arbitration: when the stream ends because the primary is lost, race for the lock.
    let arbiter: Option<Arc<dyn Arbiter>> = open_lock(cfg.pair.lock.as_deref())?.map(Arc::from);
    // Where this side accepts backups once it is live, for standbys to find in the lock.
    let owner = lock::owner_record("backup", cfg.listen.as_deref());
    let decision = Arc::new(Decision::default());
    let lost_at = Arc::new(Mutex::new(None::<(Instant, String, Duration)>));
    // The divergence this backup waits for a resync after, if any: while there is one, a lost
    // primary is not raced for (this side cannot go live).
    let diverged: Arc<Mutex<Option<String>>> = Arc::default();
    {
        let (link, decision, arbiter, owner, lost_at, diverged, progress) = (
            link.clone(),
            decision.clone(),
            arbiter.clone(),
            owner.clone(),
            lost_at.clone(),
            diverged.clone(),
            progress.clone(),
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
                            reason: why.to_string(),
                        });
                    }
                    decision.set(outcome.map_err(refusal));
                    return;
                }
                if let Some((why, silence)) = link.lost() {
                    *lost_at.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), why.clone(), silence));
                    let divergence = diverged.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let outcome = match divergence {
                        Some(divergence) => match may_go_live_diverged(ack, &link, &progress) {
                            Ok(because) => {
                                tracing::warn!(
                                    "the primary is lost while this backup waited for a resync \
                                     after a divergence ({divergence}); it may go on from the \
                                     last state it verified: {because}"
                                );
                                race(arbiter.as_deref(), epoch, &owner, &why, false)
                            }
                            Err(because) => Err(NoTakeover::Diverged {
                                why,
                                divergence,
                                because,
                            }),
                        },
                        None => race(arbiter.as_deref(), epoch, &owner, &why, false),
                    };
                    decision.set(outcome.map_err(refusal));
                    return;
                }
                if let Some(why) = link.ended() {
                    decision.set(Err(refusal(NoTakeover::Ended(why))));
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            })
            .map_err(PairError::io("cannot start the arbiter thread"))?;
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
    let go_live = golive::takeover(GoLiveParts {
        cfg: cfg.clone(),
        host: host.clone(),
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
    let mut boundary = Takeover::new(replayer, decision.clone(), go_live);
    if !mirrored {
        // A divergence is waited out where it was found, so that if the primary is lost
        // meanwhile this side can still go live from exactly there (see `may_go_live_diverged`).
        let (counters, diverged, link) = (counters.clone(), diverged.clone(), link.clone());
        boundary.resync_in_place(Box::new(move |e| {
            counters.divergences.fetch_add(1, Ordering::Relaxed);
            // First: from here a lost primary is raced for only if no released output stands
            // in the way.
            *diverged.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            tracing::error!("{e}: asking the primary for a resync");
            link.request_resync(&e.to_string());
        }));
    }
    // A mirrored disk's copy is this side's: the replay writes it as it goes (and reads it).
    let copy = copy.map(|c| Box::new(c) as Box<dyn Disk>);
    *slot.slot.lock().unwrap_or_else(|e| e.into_inner()) = boundary.disk(copy, disk_size);

    vmm::kick::stop_on_signals().map_err(PairError::io("cannot install signal handlers"))?;
    let served = host.serve(api.api(), dynamic_status)?;
    let result = loop {
        let result = vm.run(&mut boundary, &control);
        match result {
            Err(VmError::Vcpu(VcpuError::Boundary(e @ BoundaryError::Divergence { .. })))
            | Err(VmError::Boundary(e @ BoundaryError::Divergence { .. }))
                if !boundary.is_live() =>
            {
                if let Some(data) = boundary.take_resync() {
                    // Waited out in place: the resync's snapshot came.
                    let snap = Snapshot::decode(&data)?;
                    vm.restore(&snap)?;
                    *diverged.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    counters.resyncs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "resynchronised with the primary at exit {} (after: {e})",
                        snap.digest.count()
                    );
                    continue;
                }
                counters.divergences.fetch_add(1, Ordering::Relaxed);
                // First: from here a lost primary is not raced for.
                *diverged.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                if mirrored {
                    // A resync carries RAM and devices, not the disk, and this copy stopped
                    // taking writes where the replay diverged: a new attach, whose digests
                    // find the blocks that differ, makes it current again. The primary's
                    // guest runs on meanwhile, unprotected until this side is back.
                    control.finish();
                    let reason = e.to_string();
                    tracing::warn!(
                        "backup: {reason}; healing this side's copy of the disk: leaving the primary and attaching again (the attach sends the blocks that differ)"
                    );
                    if let Some(m) = &meta {
                        m.stale(epoch, &format!("its replay diverged: {reason}"));
                    }
                    link.connection().close(&format!(
                        "diverged, attaching again to heal its copy: {reason}"
                    ));
                    return Ok(Finished {
                        vm,
                        result: Ok(vmm::vcpu::Stop::EndOfLog),
                        end: End::Reattach {
                            primary: addr.clone(),
                            reason,
                        },
                    });
                }
                tracing::error!("{e}: asking the primary for a resync");
                link.request_resync(&e.to_string());
                let data = match boundary.with_replayer(|r| r.skip_to_resync()) {
                    Ok(d) => d,
                    Err(e2) => {
                        control.finish();
                        let why = link.ended().unwrap_or_default();
                        let reason = format!(
                            "backup: {why} (replay stopped: {e}; then {e2}); a backup that diverged cannot take over and does not race for the lock: stopping"
                        );
                        return Ok(Finished {
                            vm,
                            result: Ok(vmm::vcpu::Stop::EndOfLog),
                            end: End::PrimaryLost { reason },
                        });
                    }
                };
                let snap = Snapshot::decode(&data)?;
                vm.restore(&snap)?;
                *diverged.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
        drop(served);
        return Ok(Finished {
            vm,
            result,
            end: End::Primary(ending),
        });
    }
    let end = match &result {
        Err(VmError::Vcpu(VcpuError::Boundary(BoundaryError::Fenced { why })))
        | Err(VmError::Boundary(BoundaryError::Fenced { why })) => {
            if fenced(decision.get(), link.lost().is_some()) {
                End::Fenced { why: why.clone() }
            } else {
                End::PrimaryLost {
                    reason: format!("backup: this backup does not take over: {why}"),
                }
            }
        }
        other => {
            if other.is_ok() {
                tracing::info!("the primary's guest stopped; the backup stops with it");
            }
            End::Backup
        }
    };
    // A backup that stops without its primary's clean stop may be behind the side that is
    // live (the winner of the lock, or a primary still running): its copy is stale.
    if let (Some(m), End::Fenced { why: reason } | End::PrimaryLost { reason }) = (&meta, &end) {
        m.stale(
            epoch,
            &format!("this backup stopped without taking over: {reason}"),
        );
    }
    let result = match end {
        End::Backup => result,
        _ => Ok(vmm::vcpu::Stop::EndOfLog),
    };
    Ok(Finished { vm, result, end })
}

/// Whether a backup whose replay diverged, and whose primary was lost before the resync came,
/// may still go live from the last state it verified without contradicting an output the
/// world has seen: why it may, or why not.
///
/// Its state up to the divergence is the primary's (every record before it was replayed and
/// checked); what the primary did after it, this side cannot reproduce. So it may go live when
/// no output after that point can have left the primary: under `--ack executed` the primary
/// released only outputs this side had replayed and checked (the replay counts nothing as
/// executed from the divergence on); under `--ack received` it released those of frames this
/// side held, so only if no frame carrying an output reached this side past the last record
/// it verified.
fn may_go_live_diverged(
    ack: AckMode,
    link: &BackupLink,
    progress: &Progress,
) -> Result<String, String> {
    let verified = progress.executed.load(Ordering::Acquire);
    match ack {
        AckMode::Executed => Ok(format!(
            "under --ack executed the primary released only outputs this backup had replayed \
             and checked (records below {verified})"
        )),
        AckMode::Received => {
            let output_end = link.output_end();
            if output_end <= verified {
                Ok(format!(
                    "no output past the last record it verified ({verified}) reached it, so none \
                     can have left the primary (--ack received)"
                ))
            } else {
                Err(format!(
                    "under --ack received the primary may have released outputs of records it \
                     held but never verified (up to record {output_end}, verified below \
                     {verified}); going live could contradict them"
                ))
            }
        }
    }
}

/// Whether a backup that may not go live was fenced (exit 5) rather than left without its
/// primary (exit 4): it lost the race for the lock after losing its primary, or won it and
/// could not go live. No lock, a switchover declined, a stream the primary closed: not fenced.
fn fenced(decision: Option<Result<u64, Refusal>>, primary_lost: bool) -> bool {
    match decision {
        Some(Err(refusal)) => matches!(
            refusal.downcast_ref::<NoTakeover>(),
            Some(NoTakeover::Lost { planned: false, .. })
        ),
        Some(Ok(_)) => primary_lost,
        None => false,
    }
}

/// The arbitration's answer as the takeover boundary keeps it.
fn refusal(e: NoTakeover) -> Refusal {
    Arc::new(e)
}

/// Races for the lock from `epoch`.
fn race(
    arbiter: Option<&dyn Arbiter>,
    epoch: u64,
    owner: &str,
    why: &str,
    planned: bool,
) -> Result<u64, NoTakeover> {
    let Some(arbiter) = arbiter else {
        return Err(NoTakeover::NoLock {
            why: why.to_string(),
        });
    };
    match arbitrate::race(arbiter, epoch, owner) {
        Ok(e) => {
            tracing::warn!("{why}: won the lock {} at epoch {e}", arbiter.spec());
            Ok(e)
        }
        Err(lost) => Err(NoTakeover::Lost {
            why: why.to_string(),
            lost,
            planned,
        }),
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
) -> Result<u64, NoTakeover> {
    if theirs != epoch {
        tracing::warn!("the primary hands over at epoch {theirs}, this backup attached at {epoch}");
    }
    match arbiter {
        Some(_) => race(arbiter, theirs, owner, "planned switchover", true),
        None => Ok(theirs),
    }
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
        Status::Backup(Box::new(BackupStatus {
            role: "backup",
            host: vmm::host::status(),
            peer: primary.clone(),
            protected: link.ended().is_none(),
            log: BackupLog {
                received,
                executed,
                released: link.released(),
                buffered_bytes: link.buffered(),
            },
            lag: BackupLag {
                records: received.saturating_sub(executed),
                exits_replayed: progress.exits.load(Ordering::Relaxed),
                vtime_ns: progress.vtime_ns.load(Ordering::Relaxed),
            },
            kept_writes: writes,
            kept_output_bytes: write_bytes,
            channel: ChannelFigures::of(&stats),
            divergences: counters.divergences.load(Ordering::Relaxed),
            resyncs: counters.resyncs.load(Ordering::Relaxed),
            attach_ms: counters.attach_ms.load(Ordering::Relaxed),
            ended: link.ended(),
            epoch,
            attach_disk_blocks: counters.attach_disk_blocks.load(Ordering::Relaxed),
            healing: counters
                .healing
                .lock()
                .map(|h| h.clone())
                .unwrap_or_default(),
            disk_checks: counters.disk_checks.load(Ordering::Relaxed),
            disk_mismatches: counters.disk_mismatches.load(Ordering::Relaxed),
            last_disk_check: counters
                .last_disk_check
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default(),
            standby: None,
        }))
    })
}

/// Where a backup's comparison of its mirrored copy with the primary's goes: its status, its
/// log, and the primary (which answers `ctl verify-disk` with it).
fn disk_check_report(
    link: Arc<BackupLink>,
    counters: Arc<BackupCounters>,
) -> Box<dyn FnMut(&DiskCheck) + Send> {
    Box::new(move |check| {
        counters.disk_checks.fetch_add(1, Ordering::Relaxed);
        if check.matched() {
            tracing::info!(
                "verify-disk {}: this side's copy equals the primary's at position {} (exit {}; {} blocks hashed, {:.1} ms)",
                check.id,
                check.position,
                check.exits.unwrap_or_default(),
                check.hashed_blocks,
                check.ms
            );
        } else {
            counters.disk_mismatches.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "verify-disk {}: this side's copy differs from the primary's at position {} (exit {}): {} of {} blocks, the first {:?}",
                check.id,
                check.position,
                check.exits.unwrap_or_default(),
                check.differing,
                check.blocks,
                check.first_differing
            );
        }
        *counters
            .last_disk_check
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(check.clone());
        let sent = link.connection().send(Msg::DiskVerified {
            id: check.id,
            position: check.position,
            matched: check.matched(),
            differing: check.differing,
            first_differing: check.first_differing.clone(),
            hashed_blocks: check.hashed_blocks,
            micros: (check.ms * 1e3) as u64,
        });
        if let Err(e) = sent {
            tracing::warn!(
                "cannot tell the primary verification {}'s outcome: {e}",
                check.id
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arbitrate::Lost;

    fn taken(planned: bool) -> NoTakeover {
        NoTakeover::Lost {
            why: "the primary is lost: silence".into(),
            lost: Lost::Taken {
                spec: "file:/l".into(),
                owner: "primary@a:1".into(),
                epoch: 2,
            },
            planned,
        }
    }

    #[test]
    fn only_a_lost_race_after_a_loss_fences_a_backup() {
        assert!(fenced(Some(Err(refusal(taken(false)))), true));
        // A switchover it declined, no lock, a stream the primary closed: its primary is gone.
        assert!(!fenced(Some(Err(refusal(taken(true)))), false));
        let no_lock = NoTakeover::NoLock { why: "lost".into() };
        assert!(!fenced(Some(Err(refusal(no_lock))), true));
        let ended = NoTakeover::Ended("the primary closed the channel: bye".into());
        assert!(!fenced(Some(Err(refusal(ended))), false));
        // It won the lock and could not go live: fenced after a loss, not after a handover.
        assert!(fenced(Some(Ok(3)), true));
        assert!(!fenced(Some(Ok(3)), false));
    }

    #[test]
    fn the_reasons_read_as_before() {
        assert_eq!(
            taken(false).to_string(),
            "the primary is lost: silence; lost the lock file:/l to primary@a:1 at epoch 2"
        );
        assert_eq!(
            NoTakeover::NoLock { why: "x".into() }.to_string(),
            "x; without --lock a backup never takes over (it could not rule out a live primary)"
        );
    }
}
