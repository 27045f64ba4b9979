//! The pair in one process, without KVM: a primary's real services (the pair manager, the
//! releaser, the link) over guest RAM that is a plain anonymous mapping, driven through the
//! real vCPU control channel by a [`ScriptedVcpu`]; a backup's real halves of the protocol
//! ([`crate::attach::join`], [`crate::attach::receive_transfer`], [`BackupLink`]) over a real
//! logging channel on loopback. What only a KVM vCPU does (running the guest, restoring vCPU
//! state) is scripted or left out; everything on the wire is the real thing.
//!
//! ```text
//!  test thread (the backup)            Primary::start
//!    Backup::attach ---- loopback ---->  Services: pair manager, releaser, Link
//!    Backup::follow (BackupLink)           |  VcpuHandle
//!    Cable::cut (a lost link)              v
//!                                        ScriptedVcpu (answers Pause, Snapshot, ...; logs them)
//! ```
//!
//! Waits poll a condition with a generous limit ([`wait_until`]); no sleep stands in for a
//! synchronisation.

mod arbitration;
mod attach;
mod resync;
mod switchover;

use crate::api::{ApiFn, Request, StatusFn};
use crate::attach::{join, receive_transfer, Transfer};
use crate::error::PairError;
use crate::link::{AckMode, Link, StreamSink};
use crate::lock::{Arbiter, FileLock};
use crate::primary::{ServiceParts, Services};
use crate::receiver::BackupLink;
use crate::Ending;
use devices::Persist;
use ft_core::live::{LiveBoundary, SerialSource};
use ft_core::log::{Header, LogReader, Record, VERSION};
use ft_core::record::Recorder;
use ft_core::replay::{KeptWrites, Progress};
use ft_core::ExitDigest;
use logging_channel::{ChannelConfig, Connection, Listener, Psk};
use std::collections::{BTreeSet, VecDeque};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm::control::{VcpuControl, VcpuEvent, VcpuResponse};
use vmm::memory::GuestMemoryMmap;
use vmm::platform::Platform;
use vmm::snapshot::{Pages, Snapshot, VcpuSnapshot};

/// Guest RAM of the test machines: 1024 pages.
pub(crate) const RAM: u64 = 4 << 20;
/// Pages the guest has written before a backup attaches (0..INITIAL_PAGES).
pub(crate) const INITIAL_PAGES: u64 = 700;
/// The machine's identity, as both sides compute it.
pub(crate) const HASH: u64 = 0x5eed_f00d;
/// The machine in words.
pub(crate) const SUMMARY: &str = "test machine, 4 MiB";
/// The instruction pointer every scripted snapshot carries.
pub(crate) const RIP: u64 = 0xfff0_1234;
/// The longest any wait of a test lasts before it fails (generous: a loaded host is slow).
pub(crate) const LIMIT: Duration = Duration::from_secs(20);

/// Waits until `cond` holds, or fails the test after [`LIMIT`], naming `what` it waited for.
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "waited {LIMIT:?} for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Both sides' channel settings: the peer-loss timeout is long, so that only a lost link the
/// test makes ([`Cable::cut`], a close) is a loss, never a slow host.
pub(crate) fn channel() -> ChannelConfig {
    let mut cfg = ChannelConfig::new(Psk::from_bytes(&[7u8; 32]).expect("a 32-byte key"));
    cfg.timeout = Duration::from_secs(10);
    cfg
}

/// Fresh zeroed guest RAM.
pub(crate) fn ram() -> GuestMemoryMmap {
    vmm::memory::create(RAM).expect("anonymous guest RAM")
}

/// The guest writes page `pfn`: new contents, different at every `generation`, never zero.
pub(crate) fn scribble(mem: &GuestMemoryMmap, pfn: u64, generation: u64) {
    let page: Vec<u8> = (0..4096u64)
        .map(|i| ((pfn.wrapping_mul(31) ^ generation.wrapping_mul(131) ^ i) as u8) | 1)
        .collect();
    vmm::transfer::write_pages(mem, &[(pfn, page)]).expect("a page inside guest RAM");
}

/// What the scripted guest writes while a transfer tracks its pages.
#[derive(Clone, Debug, Default)]
pub(crate) struct Script {
    /// Before each dirty-page harvest, the pages the guest writes (the harvest returns them);
    /// harvests past the list find nothing written.
    pub(crate) rounds: Vec<Vec<u64>>,
    /// The pages the guest writes between the last harvest and the first pause (they travel in
    /// the final snapshot).
    pub(crate) before_pause: Vec<u64>,
}

impl Script {
    /// A pre-copy of several rounds: 600, then 400 pages dirty (shrinking: another round),
    /// then 10 (few enough: the pause), and 5 written just before the pause.
    pub(crate) fn precopy() -> Script {
        Script {
            rounds: vec![
                (0..600).collect(),
                (100..500).collect(),
                (900..910).collect(),
            ],
            before_pause: vec![3, 950, 1023, 905, 0],
        }
    }
}

/// The vCPU thread of a primary, scripted: it answers control events as `Vm::serve` does
/// (a snapshot only while paused, dirty pages only while tracking, `Stop` ends it), its
/// "guest" writes RAM as the [`Script`] says, and it logs every event it was asked, in order.
pub(crate) struct ScriptedVcpu {
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The scripted vCPU's state, on its thread.
struct Scripted {
    mem: GuestMemoryMmap,
    rounds: VecDeque<Vec<u64>>,
    before_pause: Vec<u64>,
    paused: bool,
    /// Pages written since the last harvest, while the transfer tracks them.
    dirty: Option<BTreeSet<u64>>,
    generation: u64,
}

impl ScriptedVcpu {
    /// Starts answering on `control`, the guest's RAM being `mem`.
    pub(crate) fn start(control: VcpuControl, mem: GuestMemoryMmap, script: Script) -> Self {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut state = Scripted {
            mem,
            rounds: script.rounds.into(),
            before_pause: script.before_pause,
            paused: false,
            dirty: None,
            generation: 1,
        };
        let thread = {
            let (asked, stop) = (asked.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let Some((event, reply)) = control.next(Some(Duration::from_millis(20))) else {
                        continue;
                    };
                    asked.lock().unwrap().push(format!("{event:?}"));
                    let answer = state.serve(event);
                    let stopped = matches!(answer, VcpuResponse::Stopped);
                    let _ = reply.send(answer);
                    if stopped {
                        break;
                    }
                }
                control.finish();
            })
        };
        ScriptedVcpu {
            asked,
            stop,
            thread: Some(thread),
        }
    }

    /// The events asked so far, `Debug`-formatted (`Pause`, `Snapshot { full: false }`, ...).
    pub(crate) fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }

    /// The events asked from the `from`-th on.
    pub(crate) fn asked_since(&self, from: usize) -> Vec<String> {
        self.asked().split_off(from)
    }

    /// Waits until the events asked from the `from`-th on are `want`, and no more.
    pub(crate) fn wait_asked(&self, from: usize, want: &[&str]) {
        let start = Instant::now();
        loop {
            let got = self.asked_since(from);
            if got == want {
                return;
            }
            let prefix = want.starts_with(&got.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(
                prefix && start.elapsed() < LIMIT,
                "the vCPU was asked {got:?}, expected {want:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for ScriptedVcpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Scripted {
    fn write(&mut self, pfns: &[u64]) {
        self.generation += 1;
        for &pfn in pfns {
            scribble(&self.mem, pfn, self.generation);
            if let Some(d) = &mut self.dirty {
                d.insert(pfn);
            }
        }
    }

    fn snapshot(&self, full: bool, pages: Pages) -> Snapshot {
        Snapshot {
            full,
            vcpu: VcpuSnapshot::zeroed_at(RIP),
            platform: Platform::new(0, None, None, self.mem.clone()).state(),
            pages,
            digest: ExitDigest::new(),
            interrupt_flags: [0; 3],
            compat: None,
            halted: false,
            delta: None,
        }
    }

    fn serve(&mut self, event: VcpuEvent) -> VcpuResponse {
        match event {
            VcpuEvent::Pause => {
                let pages = std::mem::take(&mut self.before_pause);
                self.write(&pages);
                self.paused = true;
                VcpuResponse::Paused
            }
            VcpuEvent::Resume => {
                self.paused = false;
                VcpuResponse::Resumed
            }
            VcpuEvent::Snapshot { .. } if !self.paused => {
                VcpuResponse::Refused("a snapshot needs the vCPU paused first".into())
            }
            VcpuEvent::Snapshot { full: true } => match Pages::full(&self.mem) {
                Ok(pages) => VcpuResponse::Snapshot(Box::new(self.snapshot(true, pages))),
                Err(e) => VcpuResponse::Refused(e.to_string()),
            },
            VcpuEvent::Snapshot { full: false } => {
                // The transfer's final state: the pages written since its last harvest.
                let rest = self.dirty.as_mut().map(std::mem::take).unwrap_or_default();
                match Pages::from_pfns(&self.mem, rest) {
                    Ok(pages) => VcpuResponse::Snapshot(Box::new(self.snapshot(false, pages))),
                    Err(e) => VcpuResponse::Refused(e.to_string()),
                }
            }
            VcpuEvent::StartDirtyTracking => {
                self.dirty = Some(BTreeSet::new());
                VcpuResponse::Ok
            }
            VcpuEvent::DirtyPages => {
                if self.dirty.is_none() {
                    return VcpuResponse::Refused("no transfer is tracking pages".into());
                }
                // The guest runs until the harvest.
                let pages = self.rounds.pop_front().unwrap_or_default();
                self.write(&pages);
                let dirty = self.dirty.as_mut().map(std::mem::take).unwrap_or_default();
                VcpuResponse::DirtyPages(dirty.into_iter().collect())
            }
            VcpuEvent::StopDirtyTracking => {
                self.dirty = None;
                VcpuResponse::Ok
            }
            VcpuEvent::Stop => VcpuResponse::Stopped,
        }
    }
}

/// A lock file of its own for one test, removed after it.
pub(crate) struct TempLock(PathBuf);

impl TempLock {
    /// A lock file named after the test.
    pub(crate) fn new(name: &str) -> TempLock {
        let p = std::env::temp_dir().join(format!("ftvmm-pair-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        TempLock(p)
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// The lock, as either side opens it.
    pub(crate) fn open(&self) -> FileLock {
        FileLock::new(&self.0)
    }
}

impl Drop for TempLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The lock's owner name of the test's primary.
pub(crate) const PRIMARY: &str = "primary@test";
/// The lock's owner name of the test's backup.
pub(crate) const BACKUP: &str = "backup@test";

/// A primary's services in this process, over scripted RAM and a scripted vCPU.
pub(crate) struct Primary {
    /// Where it accepts backups.
    pub(crate) addr: String,
    /// Its link: the stream, the output rule, the mode and epoch.
    pub(crate) link: Arc<Link>,
    /// Its guest's RAM.
    pub(crate) mem: GuestMemoryMmap,
    /// Its vCPU.
    pub(crate) vcpu: ScriptedVcpu,
    /// The epoch it claimed the lock at, with a lock.
    pub(crate) epoch: Option<u64>,
    services: Option<Services>,
    api: ApiFn,
    status: StatusFn,
}

impl Primary {
    /// A primary running the guest of `script`, holding `lock` if there is one (claimed as
    /// [`PRIMARY`], as `primary::run` does before anything else).
    pub(crate) fn start(script: Script, lock: Option<&TempLock>) -> Primary {
        let mem = ram();
        for pfn in 0..INITIAL_PAGES {
            scribble(&mem, pfn, 0);
        }
        let arbiter: Option<Arc<dyn Arbiter>> = lock.map(|l| Arc::new(l.open()) as _);
        let epoch = arbiter
            .as_ref()
            .map(|a| a.claim(PRIMARY).expect("the primary claims the lock"));
        let header = Header {
            version: VERSION,
            config_hash: HASH,
            config_summary: SUMMARY.into(),
            rtc_epoch: 0,
            mechanisms: None,
        };
        let link = Link::new(header, AckMode::Received, Duration::from_secs(1), epoch);
        let recorder = Recorder::new(
            LiveBoundary::new(SerialSource::None, Box::new(std::io::sink())),
            Box::new(StreamSink::new(link.clone())),
            0,
        )
        .expect("a recorder")
        .with_gate(link.clone());
        let listener = Listener::bind("127.0.0.1:0", channel()).expect("a loopback listener");
        let addr = listener.local_addr().to_string();
        let (handle, control) = vmm::control::channel();
        let vcpu = ScriptedVcpu::start(control, mem.clone(), script);
        let services = Services::start(ServiceParts {
            listener,
            link: link.clone(),
            core: recorder.core(),
            vcpu: handle,
            mem: mem.clone(),
            hash: HASH,
            summary: SUMMARY.into(),
            ram_pages: RAM / 4096,
            serial: Box::new(std::io::sink()),
            net: None,
            release_image: None,
            mirror: None,
            arbiter,
            owner: PRIMARY.into(),
            history: Vec::new(),
        })
        .expect("the primary's services start");
        Primary {
            addr,
            link,
            mem,
            vcpu,
            epoch,
            api: services.api(),
            status: services.status(),
            services: Some(services),
        }
    }

    /// Its status document, as `ftvmm ctl status` prints it.
    pub(crate) fn status(&self) -> serde_json::Value {
        (self.status)().to_json()
    }

    /// A request on its API socket, answered on another thread (a switchover waits for the
    /// backup, which is the test's thread).
    pub(crate) fn request(&self, req: Request) -> JoinHandle<serde_json::Value> {
        let api = self.api.clone();
        std::thread::spawn(move || api(req))
    }

    /// Stops its services as `primary::run` does when the guest stopped cleanly.
    pub(crate) fn shutdown(mut self) -> Ending {
        self.services
            .take()
            .map(|s| s.shutdown(true))
            .expect("the services run")
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        if let Some(s) = self.services.take() {
            s.shutdown(true);
        }
    }
}

/// A backup's end of an attach, without a VM: the final state is applied to RAM as
/// `Vm::restore` applies it, the rest of it is kept for the test to look at.
pub(crate) struct Backup {
    /// The channel to the primary.
    pub(crate) conn: Connection,
    /// Its guest's RAM.
    pub(crate) mem: GuestMemoryMmap,
    /// What the transfer delivered (the final snapshot, the epoch).
    pub(crate) transfer: Transfer,
}

impl Backup {
    /// Attaches to the primary at `addr` as `receive_vm` does: hello, pre-copy rounds into
    /// zeroed RAM, the final state.
    pub(crate) fn attach(addr: &str) -> Result<Backup, PairError> {
        Self::attach_as(addr, HASH, SUMMARY)
    }

    /// The same, announcing the machine `hash` and `summary`.
    pub(crate) fn attach_as(addr: &str, hash: u64, summary: &str) -> Result<Backup, PairError> {
        let started = Instant::now();
        let (conn, _) = join(addr, channel(), hash, summary)?;
        let mem = ram();
        let transfer = receive_transfer(&conn, addr, &mem, None, started)?;
        transfer
            .snapshot
            .pages
            .apply(&mem, transfer.snapshot.full)?;
        Ok(Backup {
            conn,
            mem,
            transfer,
        })
    }

    /// Starts following the log stream, as a backup does after its attach.
    pub(crate) fn follow(self) -> Following {
        let progress = Arc::new(Progress::default());
        let kept = Arc::new(Mutex::new(KeptWrites::default()));
        let (link, _threads) =
            BackupLink::start(self.conn, progress, kept).expect("the receiver starts");
        let (tx, records) = mpsc::channel();
        let reader = link.reader();
        std::thread::spawn(move || {
            let Ok((mut log, header)) = LogReader::new(reader) else {
                return;
            };
            if tx.send(Streamed::Header(header)).is_err() {
                return;
            }
            while let Ok(Some(r)) = log.read_record() {
                if tx.send(Streamed::Record(r)).is_err() {
                    return;
                }
            }
        });
        Following {
            link,
            mem: self.mem,
            records,
        }
    }
}

enum Streamed {
    Header(Header),
    Record(Record),
}

/// A backup following the log stream (no replay: the test reads the records).
pub(crate) struct Following {
    /// The backup's end of the stream.
    pub(crate) link: Arc<BackupLink>,
    /// Its guest's RAM.
    pub(crate) mem: GuestMemoryMmap,
    records: mpsc::Receiver<Streamed>,
}

impl Following {
    fn next(&self) -> Streamed {
        self.records
            .recv_timeout(LIMIT)
            .expect("the stream goes on within the limit")
    }

    /// The stream's header (the first thing it carries).
    pub(crate) fn header(&self) -> Header {
        match self.next() {
            Streamed::Header(h) => h,
            Streamed::Record(r) => panic!("a record before the header: {r:?}"),
        }
    }

    /// The next record of the stream.
    pub(crate) fn record(&self) -> Record {
        match self.next() {
            Streamed::Record(r) => r,
            Streamed::Header(h) => panic!("a second header: {h:?}"),
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.link.stop("the test is over");
    }
}

/// A TCP relay between a backup and its primary that the test can cut: both sides then see
/// their connection drop without a `Bye`, as in a partition or a crash.
pub(crate) struct Cable {
    /// Where the backup connects instead of the primary.
    pub(crate) addr: String,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Cable {
    /// A relay to `target`, for one connection.
    pub(crate) fn to(target: &str) -> Cable {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("its address").to_string();
        let streams = Arc::new(Mutex::new(Vec::new()));
        let target = target.to_string();
        let held = streams.clone();
        std::thread::spawn(move || {
            let Ok((near, _)) = listener.accept() else {
                return;
            };
            let Ok(far) = TcpStream::connect(&target) else {
                return;
            };
            let (Ok(near2), Ok(far2)) = (near.try_clone(), far.try_clone()) else {
                return;
            };
            held.lock()
                .unwrap()
                .extend([&near, &far].into_iter().filter_map(|s| s.try_clone().ok()));
            for (mut from, mut to) in [(near, far), (far2, near2)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                });
            }
        });
        Cable { addr, streams }
    }

    /// Cuts the link: both ends drop at once.
    pub(crate) fn cut(&self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// What the vCPU is asked in an attach whose first harvest finds few pages dirty.
pub(crate) const QUICK_ATTACH: &[&str] = &[
    "StartDirtyTracking",
    "DirtyPages",
    "Pause",
    "Snapshot { full: false }",
    "Resume",
    "StopDirtyTracking",
];

/// A primary with a backup attached and following its stream (its header and base read).
pub(crate) struct Pair {
    pub(crate) primary: Primary,
    pub(crate) backup: Following,
    /// The backup's link to the primary, when the test cuts it.
    pub(crate) cable: Option<Cable>,
    /// The events the vCPU was asked in the attach.
    pub(crate) attached: usize,
}

impl Pair {
    /// Attaches a backup to a new primary holding `lock`, through a [`Cable`] if `cable`.
    pub(crate) fn start(lock: Option<&TempLock>, cable: bool) -> Pair {
        let primary = Primary::start(Script::default(), lock);
        let cable = cable.then(|| Cable::to(&primary.addr));
        let addr = cable.as_ref().map_or(&primary.addr, |c| &c.addr);
        let backup = Backup::attach(addr).expect("the backup attaches").follow();
        assert_eq!(backup.header().config_hash, HASH);
        assert!(matches!(backup.record(), Record::Base { .. }));
        primary.vcpu.wait_asked(0, QUICK_ATTACH);
        wait_until("the attach to count", || primary.status()["attaches"] == 1);
        Pair {
            primary,
            backup,
            cable,
            attached: QUICK_ATTACH.len(),
        }
    }
}
