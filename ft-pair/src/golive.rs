//! Going live: the boundary stack of a primary (a recorder over the live boundary, the output
//! rule's link, the disk through the rule), built the same way when a primary starts and when a
//! backup takes over, by a failure or by a planned switchover ([`takeover`]).

use crate::api::{StatusFn, SwappableApi};
use crate::config::{BackupConfig, Host, LiveConfig, PairConfig};
use crate::error::PairError;
use crate::link::{HeldDisk, Link, StreamSink};
use crate::lock::Arbiter;
use crate::mirror::{DirtyBlocks, Mirror, TrackedDisk};
use crate::primary::{ServiceParts, Services, TakeoverRecord};
use crate::receiver::BackupLink;
use crate::sidecar::CopyMeta;
use devices::disk::{Disk, ImageFile};
use ft_core::disk::BlockDigests;
use ft_core::disk::DiskMode;
use ft_core::live::{LiveBoundary, NetPort, NetQueue};
use ft_core::log::{Header, VERSION};
use ft_core::output::Output;
use ft_core::record::Recorder;
use ft_core::replay::KeptWrites;
use ft_core::takeover::{GoLive, LiveSide, SwitchPoint};
use ft_core::Boundary;
use logging_channel::{Connection, Listener, Msg};
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the live side starts.
pub(crate) enum Start {
    /// A primary from its boot (or its `--restore`): the clock is the host's from now.
    Boot,
    /// A backup that went live where its log ended.
    Takeover {
        /// The recording's RTC epoch (the old primary's).
        rtc_epoch: i64,
        point: SwitchPoint,
        /// Host time that passed on the old primary after the log's last time, as far as this
        /// side can tell: the live clock resumes that much past it (see [`resume_gap`]).
        gap: Duration,
    },
}

/// What the stack is built from.
pub(crate) struct StackParts<'a> {
    pub(crate) cfg: &'a PairConfig,
    pub(crate) live: &'a LiveConfig,
    pub(crate) machine: &'a vmm::VmConfig,
    pub(crate) host: &'a dyn Host,
    pub(crate) hash: u64,
    pub(crate) summary: &'a str,
    /// The pair's epoch in the lock, if there is a lock.
    pub(crate) epoch: Option<u64>,
    /// The NIC's receive queue, if the machine has a NIC.
    pub(crate) net_rx: Option<Arc<NetQueue>>,
    pub(crate) start: Start,
}

/// A primary's boundary stack.
pub(crate) struct Stack {
    pub(crate) recorder: Recorder<LiveBoundary>,
    pub(crate) link: Arc<Link>,
    /// The disk as the guest sees it (through the output rule).
    pub(crate) held: Option<Box<dyn Disk>>,
    /// A second handle on the image, for the thread that releases held writes.
    pub(crate) release_image: Option<ImageFile>,
    /// A mirrored disk's copy, for attaches.
    pub(crate) mirror: Option<Mirror>,
}

/// Builds a primary's boundary stack: the live side reads the host, its serial output and its
/// frames go through the output rule, its records to the attached backup's stream.
pub(crate) fn build(p: StackParts<'_>) -> Result<Stack, PairError> {
    let mut live =
        LiveBoundary::with_clock(p.host.serial_input()?, Box::new(io::sink()), p.live.clock)
            .with_kick_bound(p.live.checkpoint_bound);
    let rtc_epoch = match &p.start {
        Start::Boot => live.rtc_epoch()?,
        Start::Takeover { rtc_epoch, .. } => *rtc_epoch,
    };
    let header = Header {
        version: VERSION,
        config_hash: p.hash,
        config_summary: p.summary.to_string(),
        rtc_epoch,
        mechanisms: match &p.start {
            // Chosen when the VM was built (the probe runs once per process).
            Start::Boot => Some(vmm::vm::mechanisms(p.machine)?),
            Start::Takeover { .. } => vmm::vm::mechanisms(p.machine).ok(),
        },
    };
    let link = Link::new(header, p.cfg.ack, p.cfg.max_lag, p.epoch);
    link.drop_lagging_after(p.cfg.drop_lagging_after);
    link.set_batch_policy(p.cfg.batch);
    // The live side's writers lead nowhere: outputs reach the world through the link, which
    // the recorder hands each one to with its record's number (the output rule).
    if let Some(rx) = p.net_rx {
        live = live.with_net(NetPort {
            rx,
            tx: Box::new(io::sink()),
        });
    }
    match &p.start {
        Start::Boot => {
            if let Some(marker) = &p.live.input_after {
                live = live.input_after(marker);
            }
        }
        Start::Takeover { point, gap, .. } => live.restored(
            point
                .time_ns
                .saturating_add(u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX)),
        ),
    }
    let mut recorder = Recorder::new(live, Box::new(StreamSink::new(link.clone())), rtc_epoch)?
        .with_gate(link.clone())
        .with_disk_mode(p.cfg.disk);
    if let Start::Takeover { point, .. } = &p.start {
        recorder.continue_from(point.rip, point.time_ns);
    }
    let (held, release_image, mirror) = match p.cfg.disk {
        DiskMode::Shared => held_image(p.machine, &link)?,
        DiskMode::Mirrored => mirrored_image(p.machine, p.epoch.unwrap_or(0))?,
    };
    Ok(Stack {
        recorder,
        link,
        held,
        release_image,
        mirror,
    })
}

/// A mirrored disk's copy on this side: the disk the guest sees (writes go to the image at
/// once, their blocks tracked while a backup attaches) and the attach's handle on it.
fn mirrored_image(config: &vmm::VmConfig, epoch: u64) -> Result<DiskSide, PairError> {
    let Some(path) = &config.disk else {
        return Ok((None, None, None));
    };
    let img = open_image(path)?;
    let for_attach = img
        .try_clone()
        .map_err(PairError::io(format!("disk image {}", path.display())))?;
    let dirty = Arc::new(DirtyBlocks::new(img.size()));
    let digests = Arc::new(BlockDigests::new(img.size()));
    // This side is live on its copy from here: current at this epoch (a primary starting, or
    // a backup that went live at the epoch it won).
    let meta = Arc::new(CopyMeta::open(path, &crate::lock::owner_name("primary")));
    meta.current(epoch);
    Ok((
        Some(Box::new(TrackedDisk::new(
            img,
            dirty.clone(),
            digests.clone(),
        ))),
        None,
        Some(Mirror {
            image: for_attach,
            dirty,
            digests,
            meta,
        }),
    ))
}

/// Opens the disk image (or this side's copy) at `path` for reading and writing.
pub(crate) fn open_image(path: &std::path::Path) -> Result<ImageFile, PairError> {
    ImageFile::open(path).map_err(PairError::io(format!(
        "cannot open disk image {}",
        path.display()
    )))
}

/// The disk as the guest sees it, a second handle on the image for the thread that releases
/// held writes (a shared image), and the attach's handle on a mirrored copy.
type DiskSide = (Option<Box<dyn Disk>>, Option<ImageFile>, Option<Mirror>);

/// A shared image: the guest's writes go through the output rule.
fn held_image(config: &vmm::VmConfig, link: &Arc<Link>) -> Result<DiskSide, PairError> {
    match &config.disk {
        Some(path) => {
            let img = open_image(path)?;
            let for_release = img
                .try_clone()
                .map_err(PairError::io(format!("disk image {}", path.display())))?;
            Ok((
                Some(Box::new(HeldDisk::new(link.clone(), img))),
                Some(for_release),
                None,
            ))
        }
        None => Ok((None, None, None)),
    }
}

/// What going live needs (moved into the closure the takeover boundary calls once).
pub(crate) struct GoLiveParts {
    pub(crate) cfg: BackupConfig,
    pub(crate) host: Arc<dyn Host>,
    pub(crate) hash: u64,
    pub(crate) summary: String,
    pub(crate) rtc_epoch: i64,
    pub(crate) kept: Arc<Mutex<KeptWrites>>,
    pub(crate) arbiter: Option<Arc<dyn Arbiter>>,
    pub(crate) owner: String,
    pub(crate) vcpu: vmm::control::VcpuHandle,
    pub(crate) mem: vmm::memory::GuestMemoryMmap,
    pub(crate) services: Arc<Mutex<Option<Services>>>,
    pub(crate) status: Arc<Mutex<StatusFn>>,
    pub(crate) api: SwappableApi,
    /// The channel to the old primary, and whether it handed the guest over (then it waits
    /// for [`Msg::HandedOver`] on it).
    pub(crate) old_link: Arc<BackupLink>,
    pub(crate) old_primary: String,
    pub(crate) lost_at: Arc<Mutex<Option<(Instant, String, Duration)>>>,
}

/// How far past the log's last time the live clock resumes after a failure: the host time
/// since the old primary's last message. The primary's guest clock followed the host's, and
/// it was running at least until that message (whose records' times are at most the log's last
/// time), so its clock had moved on at least this far when it was lost; the guest's clock now
/// goes on from there instead of falling behind by the silence before the detection. Time is
/// an input: any value not before the log's last time is one the guest could have read. None
/// after a planned switchover (the primary stopped at the log's end) or on the virtual clock
/// (idle time is skipped there by design).
fn resume_gap(p: &GoLiveParts) -> Duration {
    let failure = p.old_link.handover().is_none();
    if failure && p.cfg.live.clock == ft_core::live::Clock::Host {
        p.old_link.since_last_message()
    } else {
        Duration::ZERO
    }
}

/// Going live: emit again what the primary may not have released (disk writes re-issued,
/// serial bytes re-sent: at least once at the failover edge), then become a primary from the
/// point where the log ended, and accept a new backup.
pub(crate) fn takeover(p: GoLiveParts) -> GoLive {
    Box::new(move |point: SwitchPoint| go_live(p, point).map_err(Into::into))
}

/// Going live at `point` (see [`takeover`]).
fn go_live(p: GoLiveParts, point: SwitchPoint) -> Result<LiveSide, PairError> {
    {
        let machine = &p.cfg.machine;
        let mut serial = p.host.serial_output()?;
        let mut image = machine.disk.as_deref().map(open_image).transpose()?;
        // The NIC's host side on this host: opened only now (a backup never reads its tap).
        let net = p.host.net(machine)?;
        let mut tap_out = match &net {
            Some((tap, _)) => Some(tap.writer().map_err(PairError::io("tap"))?),
            None => None,
        };
        let kept = p.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (mut serial_bytes, mut writes, mut frames) = (0usize, 0usize, 0usize);
        for (_, out) in &kept {
            match out {
                Output::Serial(b) => {
                    serial_bytes += b.len();
                    serial
                        .write_all(b)
                        .map_err(PairError::io("serial output"))?;
                }
                Output::Net(frame) => {
                    frames += 1;
                    if let Some(t) = tap_out.as_mut() {
                        let _ = t.write_all(frame);
                    }
                }
                Output::DiskWrite { offset, data } => {
                    writes += 1;
                    if let Some(img) = image.as_mut() {
                        img.write_at(data, *offset)
                            .map_err(PairError::io("re-issuing a disk write"))?;
                    }
                }
                Output::DiskFlush => {}
            }
        }
        let _ = serial.flush();
        if let Some(img) = image.as_mut() {
            img.flush().map_err(PairError::io("disk flush"))?;
        }
        // Tell the network the guest is here now: switches learn its MAC on this host's port.
        if let (Some(t), Some(net)) = (tap_out.as_mut(), &machine.net) {
            match vmm::tap::guest_ip(&machine.cmdline) {
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

        let Stack {
            mut recorder,
            link,
            held,
            release_image,
            mirror,
        } = build(StackParts {
            cfg: &p.cfg.pair,
            live: &p.cfg.live,
            machine,
            host: p.host.as_ref(),
            hash: p.hash,
            summary: &p.summary,
            epoch: p.arbiter.as_ref().map(|_| point.epoch),
            net_rx: net.as_ref().map(|(_, queue)| queue.clone()),
            start: Start::Takeover {
                rtc_epoch: p.rtc_epoch,
                point,
                gap: resume_gap(&p),
            },
        })?;
        let size = machine
            .disk
            .as_ref()
            .and_then(|d| std::fs::metadata(d).ok())
            .map_or(0, |m| m.len());
        let disk = recorder.disk(held, size);
        let listen = p.cfg.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let listener = Listener::bind(&listen, p.cfg.pair.channel.clone())
            .map_err(PairError::channel(format!("cannot listen on {listen}")))?;
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
                protected_again_ms: None,
                lost_at: at,
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
            ram_pages: machine.memory_bytes / 4096,
            serial,
            net: tap_out.map(|t| Box::new(t) as Box<dyn Write + Send>),
            release_image,
            mirror,
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
    }
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
