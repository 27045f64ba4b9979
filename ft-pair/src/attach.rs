//! Attaching a backup to a running primary: both halves of the handshake and the live state
//! transfer (docs/ARCHITECTURE.md, "Attaching a backup"; docs/PROTOCOL.md).
//!
//! ```text
//!  backup                                  primary (pair manager)
//!  connect, Hello{version, config} ------>  greet: version, one backup at a time, same machine
//!                                  <------  Welcome (or Refused{reason})
//!  zeroed RAM  <-- Transfer(Pages) round 1..n (dirty tracking on, the guest runs)
//!  restore     <-- Transfer(Final{snapshot, epoch}) (the guest paused)
//!  replay      <-- Log: header, Base, ...   (the guest resumes)
//! ```

use crate::backup::SlotDisk;
use crate::error::PairError;
use crate::golive::open_image;
use crate::link::AckMode;
use crate::mirror::{digests, write_blocks, BLOCKS_PER_MESSAGE};
use crate::primary::Manager;
use crate::sidecar::CopyMeta;
use devices::disk::{Disk, ImageFile};
use ft_core::disk::DiskMode;
use ft_core::live::{LiveBoundary, SerialSource};
use ft_core::log::Record;
use logging_channel::{connect, ChannelConfig, Connection, Msg, PROTOCOL_VERSION};
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::control::{VcpuEvent, VcpuResponse};
use vmm::memory::GuestMemoryMmap;
use vmm::snapshot::Snapshot;
use vmm::transfer::{read_pages, write_pages, TransferMsg, PAGES_PER_MESSAGE};
use vmm::{Vm, VmConfig};

/// How long the control thread waits for the vCPU to answer a request.
pub(crate) const VCPU_ANSWER: Duration = Duration::from_secs(10);
/// Pre-copy stops when a round leaves no more than this many pages dirty...
const LAST_ROUND_PAGES: usize = 256;
/// ...or after this many rounds.
const MAX_ROUNDS: u32 = 12;

/// What one attach measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AttachReport {
    /// The backup's address.
    pub peer: String,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Bytes of the transfer.
    pub bytes: u64,
    /// Pages sent.
    pub pages: u64,
    /// Blocks of a mirrored disk sent (`crate::mirror::BLOCK` bytes each).
    pub disk_blocks: u64,
    /// Blocks of a mirrored disk not sent: the backup's copy held them already.
    pub disk_blocks_same: u64,
    /// From the backup's hello to the resumed guest, ms.
    pub total_ms: f64,
    /// How long the guest was paused, ms.
    pub pause_ms: f64,
}

// The primary's half: the pair manager greets a connection and transfers the VM.
impl Manager {
    /// A new connection: check it, then attach it or refuse it.
    pub(crate) fn greet(&self, conn: Connection) {
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
        let ack_executed = self.link.ack_mode() == AckMode::Executed;
        if let Err(e) = conn.send(Msg::Welcome { ack_executed }) {
            tracing::warn!("backup {peer}: {e}");
            return;
        }
        match self.attach(&conn) {
            Ok(report) => {
                let disk = if self.mirror.is_some() {
                    format!(
                        ", {} disk blocks sent ({} the backup had)",
                        report.disk_blocks, report.disk_blocks_same
                    )
                } else {
                    String::new()
                };
                tracing::warn!(
                    "backup {peer} attached: {} rounds, {:.1} MiB in {:.0} ms{disk}, pause {:.1} ms: PROTECTED",
                    report.rounds,
                    report.bytes as f64 / (1 << 20) as f64,
                    report.total_ms,
                    report.pause_ms
                );
                self.pair.attaches.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut a) = self.pair.last_attach.lock() {
                    *a = Some(report);
                }
                self.protected_again();
            }
            Err(e) => {
                tracing::error!("attaching backup {peer} failed: {e}: still UNPROTECTED");
                let _ = self.vcpu.request(VcpuEvent::StopDirtyTracking, VCPU_ANSWER);
                self.track_disk(false);
                conn.close(&e.to_string());
            }
        }
    }

    /// The first attach after this side took over ends the takeover's unprotected time: the
    /// takeover's record keeps how long it lasted.
    fn protected_again(&self) {
        let mut history = self.pair.history.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = history
            .last_mut()
            .filter(|t| t.protected_again_ms.is_none())
        {
            let ms = last.lost_at.elapsed().as_secs_f64() * 1e3;
            last.protected_again_ms = Some(ms);
            tracing::warn!(
                "protected again {ms:.0} ms after the takeover at epoch {} (the old primary's stream ended then)",
                last.epoch
            );
        }
    }

    fn send_pages(
        &self,
        conn: &Connection,
        round: u32,
        pfns: &[u64],
        report: &mut AttachReport,
    ) -> Result<(), PairError> {
        for chunk in pfns.chunks(PAGES_PER_MESSAGE) {
            let pages = read_pages(&self.mem, chunk, round == 1);
            if pages.is_empty() {
                continue;
            }
            report.pages += pages.len() as u64;
            let msg = TransferMsg::Pages { round, pages }.encode()?;
            report.bytes += msg.len() as u64;
            conn.send(Msg::Transfer(msg))?;
        }
        Ok(())
    }

    /// Sends blocks of a mirrored disk (round 0: in the final pause).
    fn send_blocks(
        &self,
        conn: &Connection,
        round: u32,
        blocks: &[u64],
        theirs: &[[u8; 16]],
        report: &mut AttachReport,
    ) -> Result<(), PairError> {
        let Some(mirror) = &self.mirror else {
            return Ok(());
        };
        let mut mirror = mirror.lock().unwrap_or_else(|e| e.into_inner());
        for chunk in blocks.chunks(BLOCKS_PER_MESSAGE) {
            let blocks = mirror
                .read_changed(chunk, theirs)
                .map_err(PairError::io("reading the mirrored disk for the backup"))?;
            report.disk_blocks_same += (chunk.len() - blocks.len()) as u64;
            if blocks.is_empty() {
                continue;
            }
            report.disk_blocks += blocks.len() as u64;
            let msg = TransferMsg::DiskBlocks { round, blocks }.encode()?;
            report.bytes += msg.len() as u64;
            conn.send(Msg::Transfer(msg))?;
        }
        Ok(())
    }

    /// The backup's digests of its copy's blocks (a mirrored disk: the first message after the
    /// welcome), checked against this side's copy's size.
    fn receive_digests(&self, conn: &Connection) -> Result<Vec<[u8; 16]>, PairError> {
        let Some(mirror) = &self.mirror else {
            return Ok(Vec::new());
        };
        let blocks = mirror
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dirty
            .blocks();
        // Generous: the backup reads its whole copy first.
        let msg = conn
            .recv_timeout(Duration::from_secs(600))?
            .ok_or_else(|| PairError::BackupBroke("no digests of its copy in 600 s".into()))?;
        let Msg::Transfer(data) = msg else {
            return Err(PairError::BackupBroke(format!(
                "expected the digests of its copy, got {msg:?}"
            )));
        };
        match TransferMsg::decode(&data) {
            Ok(TransferMsg::DiskDigests { digests }) if digests.len() as u64 == blocks => {
                Ok(digests)
            }
            Ok(TransferMsg::DiskDigests { digests }) => Err(PairError::BackupBroke(format!(
                "digests of {} blocks for a copy of {blocks}",
                digests.len()
            ))),
            Ok(_) => Err(PairError::BackupBroke(
                "expected the digests of its copy".into(),
            )),
            Err(e) => Err(PairError::BackupBroke(e.to_string())),
        }
    }

    /// The blocks of the mirrored disk written since the last harvest (none without one).
    fn dirty_blocks(&self) -> Vec<u64> {
        self.mirror.as_ref().map_or_else(Vec::new, |m| {
            m.lock().unwrap_or_else(|e| e.into_inner()).dirty.take()
        })
    }

    /// Starts or stops tracking the mirrored disk's writes.
    fn track_disk(&self, on: bool) {
        if let Some(m) = &self.mirror {
            let m = m.lock().unwrap_or_else(|e| e.into_inner());
            if on {
                m.dirty.start();
            } else {
                m.dirty.stop();
            }
        }
    }

    /// Live state transfer to a new backup (ARCHITECTURE.md, "Attaching a backup").
    fn attach(&self, conn: &Connection) -> Result<AttachReport, PairError> {
        let start = Instant::now();
        let mut report = AttachReport {
            peer: conn.peer_addr().to_string(),
            ..AttachReport::default()
        };
        let progress = Progress::new(conn.peer_addr().to_string());
        self.ask(VcpuEvent::StartDirtyTracking)?;
        self.track_disk(true);
        // A mirrored disk: what the backup's copy holds, block by block (tracking is on, so a
        // block written from here on is sent again whatever its digest said).
        let theirs = self.receive_digests(conn)?;
        // Round 1: all of RAM (zero pages skipped: the backup starts from zeroed RAM), and
        // every block of a mirrored disk whose digest is not the backup's.
        let all: Vec<u64> = (0..self.ram_pages).collect();
        let mut round = 1;
        self.send_pages(conn, round, &all, &mut report)?;
        if let Some(m) = &self.mirror {
            let blocks = m.lock().unwrap_or_else(|e| e.into_inner()).dirty.blocks();
            let all: Vec<u64> = (0..blocks).collect();
            self.send_blocks(conn, round, &all, &theirs, &mut report)?;
        }
        progress.round(round, &report, start, 0);
        let mut prev = usize::MAX;
        loop {
            let dirty = match self.ask(VcpuEvent::DirtyPages)? {
                VcpuResponse::DirtyPages(p) => p,
                other => return Err(PairError::UnexpectedAnswer(format!("{other:?}"))),
            };
            // Stop when few pages are left, when the set stops shrinking, or after a bound;
            // what is left goes in the pause.
            if dirty.len() <= LAST_ROUND_PAGES
                || dirty.len() * 10 >= prev.saturating_mul(9)
                || round >= MAX_ROUNDS
            {
                // The pages of this harvest go in the final snapshot: give them back.
                return self.finish_attach(conn, dirty, report, start, &progress);
            }
            prev = dirty.len();
            round += 1;
            self.send_pages(conn, round, &dirty, &mut report)?;
            let blocks = self.dirty_blocks();
            self.send_blocks(conn, round, &blocks, &[], &mut report)?;
            progress.round(round, &report, start, dirty.len());
            if !conn.is_alive() {
                return Err(PairError::BackupLost(
                    conn.failure().unwrap_or_else(|| "connection lost".into()),
                ));
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
    ) -> Result<AttachReport, PairError> {
        report.rounds = progress.rounds();
        let pause = Instant::now();
        self.ask(VcpuEvent::Pause)?;
        let result = (|| {
            let mut snap = match self.ask(VcpuEvent::Snapshot { full: false })? {
                VcpuResponse::Snapshot(s) => s,
                other => return Err(PairError::UnexpectedAnswer(format!("{other:?}"))),
            };
            // A mirrored disk's last written blocks, before the state that follows them, and
            // the history the backup's copy now shares.
            let blocks = self.dirty_blocks();
            self.send_blocks(conn, 0, &blocks, &[], &mut report)?;
            if let Some(m) = &self.mirror {
                let generation = m
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .meta
                    .generation();
                let msg = TransferMsg::DiskGeneration { generation }.encode()?;
                report.bytes += msg.len() as u64;
                conn.send(Msg::Transfer(msg))?;
            }
            // The last harvest's pages were taken out of the transfer set: add them.
            let extra = read_pages(&self.mem, &leftover, false);
            report.pages += (snap.pages.pages.len() + extra.len()) as u64;
            snap.pages.pages.extend(extra);
            let exits = snap.digest.count();
            let msg = TransferMsg::Final {
                snapshot: snap.encode()?,
                epoch: self.link.epoch(),
            }
            .encode()?;
            report.bytes += msg.len() as u64;
            conn.send(Msg::Transfer(msg))?;
            // The log stream starts here: its header, then the base of the deltas after it.
            self.link.attach(conn.clone());
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let (rip, time_ns, _) = core.base();
            core.write_record(&Record::Base {
                rip,
                time_ns,
                exits,
            })?;
            core.flush()?;
            Ok(())
        })();
        let resumed = self.ask(VcpuEvent::Resume);
        report.pause_ms = pause.elapsed().as_secs_f64() * 1e3;
        report.total_ms = start.elapsed().as_secs_f64() * 1e3;
        let _ = self.ask(VcpuEvent::StopDirtyTracking);
        self.track_disk(false);
        progress.done(&report);
        if let Err(e) = result {
            self.link.detach(&e.to_string());
            return Err(e);
        }
        resumed?;
        Ok(report)
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

/// The backup's half, up to the point where the log stream starts: the VM as the primary had
/// it at the attach, restored, with its disk still to be served.
pub(crate) struct Received {
    pub(crate) conn: Connection,
    pub(crate) vm: Vm,
    pub(crate) slot: SlotDisk,
    pub(crate) disk_size: u64,
    /// This side's copy of a mirrored disk, brought up to date by the transfer (the replay
    /// writes it from here on).
    pub(crate) copy: Option<ImageFile>,
    /// The pair's epoch the primary attached this backup at.
    pub(crate) epoch: u64,
    pub(crate) attach_ms: u64,
    /// Blocks of the mirrored copy the transfer wrote.
    pub(crate) disk_blocks: u64,
    /// The mirrored copy's sidecar.
    pub(crate) meta: Option<Arc<CopyMeta>>,
    /// When the primary releases an output (its `--ack`, from its Welcome).
    pub(crate) ack: AckMode,
}

/// Attaches to the primary at `addr` and receives its VM: hello ([`join`]), then the pre-copy
/// rounds into zeroed RAM and the final snapshot ([`receive_transfer`]), restored.
pub(crate) fn receive_vm(
    addr: &str,
    channel: ChannelConfig,
    config: &VmConfig,
    hash: u64,
    summary: &str,
    checkpoint_delta: bool,
    disk_mode: DiskMode,
) -> Result<Received, PairError> {
    let started = Instant::now();
    let (conn, ack) = join(addr, channel, hash, summary)?;
    tracing::info!("attached to primary {addr}: receiving its VM");

    // The VM is built before the stream exists; its disk is served by the replayer later.
    let disk_size = match &config.disk {
        Some(p) => std::fs::metadata(p)
            .map_err(PairError::io(format!("disk image {}", p.display())))?
            .len(),
        None => 0,
    };
    let slot = SlotDisk {
        slot: Arc::new(Mutex::new(None)),
        size: disk_size,
    };
    let mut placeholder = LiveBoundary::new(SerialSource::None, Box::new(std::io::sink()));
    let mut vm = Vm::new(
        config,
        &mut placeholder,
        false,
        Some(Box::new(slot.clone())),
    )?;
    vm.set_checkpoint_delta(checkpoint_delta);
    vm.zero_memory()?;
    // A mirrored disk's copy on this side: the primary learns what it holds, and sends the
    // blocks that differ.
    let mut copy = match (&config.disk, disk_mode) {
        (Some(p), DiskMode::Mirrored) => Some(open_image(p)?),
        _ => None,
    };
    // The copy is half-written until the transfer ends: stale until then.
    let meta = match (&config.disk, disk_mode) {
        (Some(p), DiskMode::Mirrored) => {
            let meta = Arc::new(CopyMeta::open(p, &crate::lock::owner_name("backup")));
            meta.stale(meta.epoch(), "an attach is bringing it up to date");
            Some(meta)
        }
        _ => None,
    };
    if let Some(copy) = copy.as_mut() {
        let digests =
            digests(copy).map_err(PairError::io("reading this side's copy of the disk"))?;
        let msg = TransferMsg::DiskDigests { digests }.encode()?;
        conn.send(Msg::Transfer(msg))
            .map_err(PairError::channel(format!("primary {addr}")))?;
    }
    let Transfer {
        snapshot,
        epoch,
        pages,
        bytes,
        disk_blocks,
        generation,
    } = receive_transfer(&conn, addr, &vm.memory(), copy.as_mut(), started)?;
    if let Some(copy) = copy.as_mut() {
        copy.flush()
            .map_err(PairError::io("flushing the received disk copy"))?;
    }
    if let Some(meta) = &meta {
        if let Some(g) = &generation {
            meta.adopt(g);
        }
        meta.current(epoch);
    }
    vm.restore(&snapshot)?;
    drop(snapshot);
    vmm::memory::trim_heap();
    let attach_ms = started.elapsed().as_millis() as u64;
    let disk = if copy.is_some() {
        format!(", {disk_blocks} disk blocks written into this side's copy")
    } else {
        String::new()
    };
    tracing::warn!(
        "backup of {addr}: VM received ({pages} pages{disk}, {:.1} MiB in {attach_ms} ms); replaying",
        bytes as f64 / (1 << 20) as f64
    );
    Ok(Received {
        conn,
        vm,
        slot,
        disk_size,
        copy,
        epoch,
        attach_ms,
        disk_blocks,
        meta,
        ack,
    })
}

/// The backup's hello: connects to the primary at `addr` and announces this side's protocol
/// version and machine; the connection once the primary welcomed it (with the primary's ack
/// mode), or its refusal.
pub(crate) fn join(
    addr: &str,
    channel: ChannelConfig,
    hash: u64,
    summary: &str,
) -> Result<(Connection, AckMode), PairError> {
    let conn =
        connect(addr, channel).map_err(PairError::channel(format!("cannot attach to {addr}")))?;
    conn.send(Msg::Hello {
        version: PROTOCOL_VERSION,
        config_hash: hash,
        config_summary: summary.to_string(),
    })
    .map_err(PairError::channel(format!("primary {addr}")))?;
    match conn.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(Msg::Welcome { ack_executed })) => Ok((
            conn,
            if ack_executed {
                AckMode::Executed
            } else {
                AckMode::Received
            },
        )),
        Ok(Some(Msg::Refused { reason })) => Err(PairError::Refused {
            addr: addr.to_string(),
            reason,
        }),
        Ok(other) => Err(unexpected(addr, format!("unexpected {other:?}"))),
        Err(e) => Err(PairError::channel(format!("primary {addr}"))(e)),
    }
}

/// What a transfer delivered besides the pages it wrote into RAM.
pub(crate) struct Transfer {
    /// The final state (the last pages, vCPU, devices, clock), for the VM to restore.
    pub(crate) snapshot: Snapshot,
    /// The pair's epoch the primary attached this backup at.
    pub(crate) epoch: u64,
    /// Pages received in the pre-copy rounds.
    pub(crate) pages: u64,
    /// Bytes of the transfer.
    pub(crate) bytes: u64,
    /// Blocks of a mirrored disk written.
    pub(crate) disk_blocks: u64,
    /// The generation of the primary's mirrored copy.
    pub(crate) generation: Option<String>,
}

/// The transfer after the welcome: the pre-copy rounds written into `mem` (zeroed RAM), up to
/// the final state, decoded but not restored (that is the VM's: [`Vm::restore`]).
pub(crate) fn receive_transfer(
    conn: &Connection,
    addr: &str,
    mem: &GuestMemoryMmap,
    mut disk: Option<&mut ImageFile>,
    started: Instant,
) -> Result<Transfer, PairError> {
    let (mut pages, mut bytes, mut round) = (0u64, 0u64, 0u32);
    let mut disk_blocks = 0u64;
    let mut generation = None;
    let tty = std::io::stderr().is_terminal();
    let (final_state, epoch) = loop {
        let msg = conn
            .recv_timeout(Duration::from_secs(60))
            .map_err(PairError::channel(format!(
                "primary {addr} during the transfer"
            )))?
            .ok_or_else(|| unexpected(addr, "the transfer stalled".into()))?;
        let Msg::Transfer(data) = msg else {
            return Err(unexpected(
                addr,
                format!("unexpected {msg:?} during the transfer"),
            ));
        };
        bytes += data.len() as u64;
        match TransferMsg::decode(&data).map_err(|e| unexpected(addr, e.to_string()))? {
            TransferMsg::Pages { pages: p, round: r } => {
                pages += p.len() as u64;
                write_pages(mem, &p).map_err(|e| unexpected(addr, e.to_string()))?;
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
            TransferMsg::DiskBlocks { blocks, .. } => {
                let Some(copy) = disk.as_deref_mut() else {
                    return Err(unexpected(
                        addr,
                        "disk blocks, but this side's disk is not mirrored".into(),
                    ));
                };
                write_blocks(copy, &blocks).map_err(|e| unexpected(addr, e.to_string()))?;
                disk_blocks += blocks.len() as u64;
            }
            TransferMsg::DiskDigests { .. } => {
                return Err(unexpected(
                    addr,
                    "digests of a disk: the backup sends those".into(),
                ));
            }
            TransferMsg::DiskGeneration { generation: g } => {
                if disk.is_none() {
                    return Err(unexpected(
                        addr,
                        "a disk's generation, but this side's disk is not mirrored".into(),
                    ));
                }
                generation = Some(g);
            }
            TransferMsg::Final { snapshot, epoch } => {
                if tty {
                    eprintln!();
                }
                break (snapshot, epoch);
            }
        }
    };
    Ok(Transfer {
        snapshot: Snapshot::decode(&final_state)?,
        epoch,
        pages,
        bytes,
        disk_blocks,
        generation,
    })
}

/// The primary did what the protocol does not allow there.
fn unexpected(addr: &str, what: String) -> PairError {
    PairError::Primary {
        addr: addr.to_string(),
        what,
    }
}
