//! The replayer: inputs come from a log, and everything the execution does is checked against
//! it. The first mismatch is a divergence, reported with the exit where it showed.
//!
//! The log is a file (`--role replay`) or the logging channel from a primary (the backup); the
//! replayer does not know which. It publishes how far it has got ([`Progress`]) so that a backup
//! can acknowledge what it has executed.

use crate::boundary::{Boundary, BoundaryError, Input, OutputKind, Point, RunEnd, WaitRequest};
use crate::disk::{
    copy_digest, differing, hex, BlockDigest, DiskCheck, PointDigest, FIRST_DIFFERING,
};
use crate::exit::{ExitDigest, SyncExit};
use crate::log::{decode_exit, unpack_disk_data, Header, InputRec, LogReader, PointRec, Record};
use crate::output::Output;
use crate::record::output_kind_byte;
use devices::disk::Disk;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How far a replay has got, published for the thread that acknowledges it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Frames of the stream consumed (the header is frame 0): every record with a sequence
    /// number below this has been replayed.
    pub executed: AtomicU64,
    /// The replayed guest's virtual time, ns.
    pub vtime_ns: AtomicU64,
    /// Synchronous exits replayed (since boot).
    pub exits: AtomicU64,
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Progress {
    /// Wakes whoever waits for progress.
    pub fn notify(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        *g += 1;
        self.changed.notify_all();
    }

    /// Waits until [`Progress::notify`] is called after generation `seen`, or `timeout`;
    /// returns the generation now.
    pub fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        if *g != seen {
            return *g;
        }
        let (g, _) = self
            .changed
            .wait_timeout(g, timeout)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// The outputs a backup has replayed, with their data, in order, kept until the primary reports
/// them released: what a backup that goes live emits again (at least once at the failover edge,
/// exactly once before it).
#[derive(Debug, Default)]
pub struct KeptWrites {
    outputs: VecDeque<(u64, Output)>,
    /// Where serial output goes once the primary has released it (a console's recent output).
    released_serial: ReleasedSerial,
    bytes: u64,
    writes: usize,
    /// The primary has released the outputs of every record below this: an output replayed
    /// after the marker arrived is not kept.
    released_below: u64,
}

impl KeptWrites {
    /// Keeps the disk write of record `seq`.
    pub fn keep(&mut self, seq: u64, offset: u64, data: Vec<u8>) {
        self.keep_output(seq, Output::DiskWrite { offset, data });
    }

    /// Keeps the output of record `seq`.
    pub fn keep_output(&mut self, seq: u64, out: Output) {
        if seq < self.released_below {
            self.released_serial.send(&out);
            return;
        }
        self.bytes += out.len();
        if matches!(out, Output::DiskWrite { .. }) {
            self.writes += 1;
        }
        self.outputs.push_back((seq, out));
    }

    /// Forgets the outputs of records below `seq`: the primary has released them.
    pub fn released(&mut self, seq: u64) {
        self.released_below = self.released_below.max(seq);
        while self.outputs.front().is_some_and(|w| w.0 < seq) {
            if let Some((_, o)) = self.outputs.pop_front() {
                self.released_serial.send(&o);
                self.bytes -= o.len();
                if matches!(o, Output::DiskWrite { .. }) {
                    self.writes -= 1;
                }
            }
        }
    }

    /// Hands the serial output the primary released, as it learns of it, to `to` (what the
    /// guest's console showed there, for this side's console once it goes live).
    pub fn on_released_serial(&mut self, to: SerialTap) {
        self.released_serial = ReleasedSerial(Some(to));
    }

    /// The outputs not known to be released, oldest first, with their record's sequence number.
    pub fn unreleased(&self) -> impl Iterator<Item = &(u64, Output)> {
        self.outputs.iter()
    }

    /// Takes every kept output, oldest first.
    pub fn take(&mut self) -> Vec<(u64, Output)> {
        self.bytes = 0;
        self.writes = 0;
        self.outputs.drain(..).collect()
    }

    /// How many disk writes, and how many bytes of output in all, are kept.
    pub fn len_bytes(&self) -> (usize, u64) {
        (self.writes, self.bytes)
    }
}

/// Where a backup's released serial output goes ([`KeptWrites::on_released_serial`]).
pub type SerialTap = Box<dyn FnMut(&[u8]) + Send>;

/// The receiver of [`KeptWrites::on_released_serial`], if any.
#[derive(Default)]
struct ReleasedSerial(Option<SerialTap>);

impl ReleasedSerial {
    fn send(&mut self, out: &Output) {
        if let (Some(to), Output::Serial(bytes)) = (self.0.as_mut(), out) {
            to(bytes);
        }
    }
}

impl std::fmt::Debug for ReleasedSerial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// The replay state, shared between the boundary and the disk it hands out.
struct Core<R: Read> {
    log: LogReader<R>,
    next: Option<Record>,
    /// Sequence number of `next` (frames consumed before it).
    next_seq: u64,
    last_rip: u64,
    last_time: u64,
    exits: u64,
    /// A divergence found by the disk, reported at the next boundary call.
    pending: Option<BoundaryError>,
    progress: Arc<Progress>,
    kept: Option<Arc<Mutex<KeptWrites>>>,
    diverge_at: Option<u64>,
    /// The log broke off in a frame that does not read (corrupt, truncated): reported where the
    /// replay needs the record that was not there.
    broken: Option<crate::log::LogError>,
    /// A log that ends without its `End` record is cut short (a file: the recorder died or the
    /// file was truncated at a frame boundary), not a stream whose writer may still be there.
    require_end: bool,
    /// The disk is this side's own copy ([`crate::disk::DiskMode::Mirrored`]): the replayed writes go to
    /// the image the VMM hands over, and reads logged by their CRC are served from it.
    mirrored: bool,
    /// That copy, once the VMM handed it over ([`Boundary::disk`]).
    image: Option<Box<dyn Disk>>,
    /// Compares the copy with the primary's at each [`Record::DiskVerify`].
    verifier: Option<Arc<Mutex<DiskVerifier>>>,
    /// The comparison under way: the copy at its point, hashed by its thread and by the
    /// replayed writes before they overwrite a block.
    point: Option<Arc<PointDigest>>,
    /// A comparison's thread found the copy different: the divergence to report.
    verdict: Arc<Mutex<Option<BoundaryError>>>,
    /// The replay diverged: nothing more counts as executed (`progress.executed` stays where
    /// the replay was last verified) until a resync's snapshot replaces the state.
    frozen: bool,
    /// The record taken last is an output (or a disk write): the acknowledger is woken once it
    /// is verified, for `--ack executed`.
    taken_output: bool,
    /// A [`Record::DiskVerify`] taken off the stream, compared before anything after it is
    /// replayed (the effects of the record before it are then in the copy).
    due: Option<DueCheck>,
}

/// A verification the stream asked for: its record's sequence number, its number, the
/// primary's block digests.
struct DueCheck {
    seq: u64,
    id: u64,
    digests: Vec<u8>,
}

/// A backup's half of `ftvmm ctl verify-disk` (a mirrored disk): a handle on its copy to hash
/// it with, and where each comparison's outcome goes.
pub struct DiskVerifier {
    /// This side's copy, for the thread that hashes it (its own handle on it).
    pub reader: devices::disk::ImageFile,
    /// Told each comparison's outcome (on the thread that hashed the copy), before a mismatch
    /// diverges.
    pub report: Box<dyn FnMut(&DiskCheck) + Send>,
}

fn describe(record: &Option<Record>, last_rip: u64, time: u64) -> String {
    match record {
        None => "the end of the log".into(),
        Some(rec @ (Record::Exit { kind, .. } | Record::ExitAtTime { kind, .. })) => {
            match decode_exit(rec, last_rip, time) {
                Some(exit) => exit.to_string(),
                None => format!("an exit of unknown kind {kind}"),
            }
        }
        Some(Record::Clock { .. }) => "a clock read".into(),
        Some(Record::Poll { point, input }) => format!("input {input:?} at a {point:?} point"),
        Some(Record::Wake { input }) => format!("a halt woken by {input:?}"),
        Some(Record::Interrupt { vector }) => format!("interrupt vector {vector:#x} injected"),
        Some(Record::Output { len, .. }) => format!("{len} bytes of output"),
        Some(Record::Checkpoint { .. }) => "a checkpoint".into(),
        Some(Record::End { exits, .. }) => format!("the end of the run after {exits} exits"),
        Some(Record::DiskRead { offset, .. }) => format!("a disk read at byte {offset}"),
        Some(Record::DiskWrite { offset, len, .. }) => {
            format!("a disk write of {len} bytes at byte {offset}")
        }
        Some(Record::DiskFlush) => "a disk flush".into(),
        Some(Record::DiskReadLocal { offset, len, .. }) => {
            format!("a disk read of {len} bytes at byte {offset} (mirrored)")
        }
        Some(Record::Base { .. }) => "the base of a stream".into(),
        Some(Record::Resync { .. }) => "a resync snapshot".into(),
        Some(Record::DiskVerify { .. }) => "a verification of the disk".into(),
    }
}

impl<R: Read> Core<R> {
    fn advance(&mut self) -> Result<Record, BoundaryError> {
        let rec = self
            .next
            .take()
            .ok_or(BoundaryError::LogEnded { exit: self.exits })?;
        self.next_seq += 1;
        // The records before this one are verified (each boundary call checks what it took
        // before it returns); this one counts once its call returns well ([`Replayer::verified`]),
        // so that `--ack executed` never releases an output the replay did not reproduce.
        if !self.frozen {
            self.progress
                .executed
                .store(self.next_seq - 1, Ordering::Release);
        }
        self.taken_output = matches!(rec, Record::Output { .. } | Record::DiskWrite { .. });
        // The record taken is replayed whatever comes next: a stream that breaks off after it
        // (a truncated frame) ends here, and the next call sees the end.
        self.read_next(matches!(rec, Record::End { .. }));
        self.take_markers();
        Ok(rec)
    }

    /// A verification of the disk is not an event of the guest: it is taken off the stream
    /// here and done before anything after it is replayed.
    fn take_markers(&mut self) {
        while matches!(self.next, Some(Record::DiskVerify { .. })) {
            let Some(Record::DiskVerify { id, digests }) = self.next.take() else {
                break;
            };
            self.due = Some(DueCheck {
                seq: self.next_seq,
                id,
                digests,
            });
            self.next_seq += 1;
            self.read_next(false);
        }
    }

    fn read_next(&mut self, at_end: bool) {
        self.next = match self.log.read_record() {
            Ok(None) if self.require_end && !at_end => {
                self.broken = Some(crate::log::LogError::Truncated {
                    frame: self.log.frame(),
                    offset: self.log.offset(),
                });
                None
            }
            Ok(r) => r,
            Err(e) => {
                self.broken = Some(e);
                None
            }
        };
    }

    /// Starts the comparison of this side's copy with the primary's if the stream asked for
    /// it (a [`Record::DiskVerify`] came before the next record): the copy as it is now is
    /// hashed by a thread of its own while the replay goes on ([`PointDigest`]: a replayed
    /// write hashes the blocks it overwrites first). A copy that differs is a divergence, left
    /// for the replay to find at its next boundary call.
    fn run_due(&mut self) {
        if let Some(e) = self
            .verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            self.pending.get_or_insert(e);
        }
        let Some(due) = self.due.take() else {
            return;
        };
        let (Some(image), Some(verifier)) = (self.image.as_mut(), self.verifier.clone()) else {
            return; // not a mirrored copy: nothing to compare
        };
        // A comparison still hashing: its blocks not hashed yet are as they were at its point
        // (writes since hashed them first), so it is finished here.
        if let Some(old) = self.point.take() {
            for b in 0..old.blocks() {
                let _ = old.hash(image.as_mut(), b);
            }
        }
        let point = Arc::new(PointDigest::new(image.size()));
        self.point = Some(point.clone());
        let (exits, verdict) = (self.exits, self.verdict.clone());
        let spawned = std::thread::Builder::new()
            .name("verify-disk".into())
            .spawn(move || compare(&point, &verifier, due, exits, &verdict));
        if let Err(e) = spawned {
            tracing::error!("cannot start the thread that verifies the disk: {e}");
        }
    }

    /// A disk request that is not the one the log holds next: the divergence is reported at the
    /// next boundary call; the device gets an I/O error meanwhile.
    fn disk_divergence(&mut self, got: String) -> io::Error {
        let e = self.diverge(got);
        self.pending.get_or_insert(e);
        io::Error::other("replay diverged")
    }

    fn diverge(&mut self, got: String) -> BoundaryError {
        self.frozen = true;
        // At the end of a log that broke off in a bad frame, the bad frame is the error.
        if self.next.is_none() {
            if let Some(e) = self.broken.take() {
                return BoundaryError::Log(e);
            }
        }
        BoundaryError::Divergence {
            exit: self.exits,
            expected: describe(&self.next, self.last_rip, self.last_time),
            got,
        }
    }

    /// A recording stopped here (SIGTERM, `ctl stop`, a primary stopped on request): whatever
    /// the guest asks for next lies beyond its end. The run ends cleanly at the exit count
    /// where the recording ended.
    fn ended_here(&self) -> Result<(), BoundaryError> {
        match self.next {
            Some(Record::End { exits, .. }) if exits == self.exits => Err(BoundaryError::EndOfLog),
            _ => Ok(()),
        }
    }

    fn check_pending(&mut self) -> Result<(), BoundaryError> {
        self.run_due();
        match self.pending.take() {
            Some(e) => {
                self.frozen = true;
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn set_time(&mut self, t: u64) {
        self.last_time = t;
        self.progress.vtime_ns.store(t, Ordering::Relaxed);
    }

    fn input(&mut self, rec: InputRec) -> Input {
        match rec {
            InputRec::TimeDelta(d) => {
                let t = self.last_time.saturating_add(d);
                self.set_time(t);
                Input::Time(self.last_time)
            }
            InputRec::Serial(bytes) => Input::SerialRx(bytes),
            InputRec::Net(frame) => Input::NetRx(frame),
        }
    }

    /// Takes a [`Record::Base`] at the head of the stream.
    fn take_base(&mut self) -> Result<(), BoundaryError> {
        if let Some(Record::Base {
            rip,
            time_ns,
            exits,
        }) = self.next
        {
            // The time first: an acknowledgement of the base must not pair it with time 0.
            self.set_time(time_ns);
            self.advance()?;
            self.last_rip = rip;
            self.exits = exits;
        }
        Ok(())
    }
}

/// Hashes this side's copy at a verification's point (the thread of [`Core::run_due`]),
/// compares it with the primary's digests, reports the outcome and leaves a mismatch as a
/// divergence in `verdict`.
fn compare(
    point: &PointDigest,
    verifier: &Mutex<DiskVerifier>,
    due: DueCheck,
    exits: u64,
    verdict: &Mutex<Option<BoundaryError>>,
) {
    let start = std::time::Instant::now();
    let blocks = point.blocks() as u64;
    let reader = verifier
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .reader
        .try_clone();
    let read = reader.and_then(|mut reader| {
        for b in 0..point.blocks() {
            point.hash(&mut reader, b)?;
        }
        Ok(())
    });
    let mut check = DiskCheck {
        id: due.id,
        position: due.seq,
        exits: Some(exits),
        blocks,
        hashed_blocks: blocks,
        ..DiskCheck::default()
    };
    let theirs: Option<Vec<BlockDigest>> = (due.digests.len() as u64 == blocks * 16).then(|| {
        due.digests
            .chunks_exact(16)
            .map(|c| c.try_into().unwrap_or([0; 16]))
            .collect()
    });
    let ours = point.finished();
    if let Some(ours) = &ours {
        check.digest = hex(&copy_digest(ours));
    }
    let why = match (&theirs, &read, &ours) {
        (_, Err(e), _) => Some(format!("this side's copy could not be read: {e}")),
        (None, _, _) => Some(format!(
            "the primary's digests are {} bytes, this side's copy has {blocks} blocks of 16",
            due.digests.len()
        )),
        (_, _, None) => Some("this side's copy was not hashed whole".into()),
        (Some(theirs), Ok(()), Some(ours)) => {
            let diff = differing(ours, theirs);
            check.differing = diff.len() as u64;
            check.first_differing = diff.iter().take(FIRST_DIFFERING).copied().collect();
            (!diff.is_empty()).then(|| {
                format!(
                    "{} of {blocks} blocks differ from the primary's copy (the first: block {}, byte {})",
                    diff.len(),
                    diff[0],
                    diff[0] * crate::disk::BLOCK
                )
            })
        }
    };
    check.result = if why.is_none() { "match" } else { "mismatch" }.into();
    check.ms = start.elapsed().as_secs_f64() * 1e3;
    (verifier.lock().unwrap_or_else(|e| e.into_inner()).report)(&check);
    if let Some(why) = why {
        *verdict.lock().unwrap_or_else(|e| e.into_inner()) = Some(BoundaryError::Divergence {
            exit: exits,
            expected: format!(
                "this side's copy of the disk equal to the primary's at log position {} (verification {})",
                due.seq, due.id
            ),
            got: why,
        });
    }
}

/// Replays a log.
pub struct Replayer<R: Read + Send + 'static> {
    core: Arc<Mutex<Core<R>>>,
    header: Header,
    out: Box<dyn Write + Send>,
}

fn lock<R: Read>(core: &Arc<Mutex<Core<R>>>) -> MutexGuard<'_, Core<R>> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

impl<R: Read + Send + 'static> Replayer<R> {
    /// Opens a log for replay and writes replayed output to `out`.
    pub fn new(input: R, out: Box<dyn Write + Send>) -> Result<Self, BoundaryError> {
        Self::with_progress(input, out, Arc::new(Progress::default()))
    }

    /// The same, publishing how far it got in `progress`.
    pub fn with_progress(
        input: R,
        out: Box<dyn Write + Send>,
        progress: Arc<Progress>,
    ) -> Result<Self, BoundaryError> {
        let (mut log, header) = LogReader::new(input)?;
        progress.executed.store(1, Ordering::Release);
        let next = log.read_record()?;
        let mut core = Core {
            log,
            next,
            next_seq: 1,
            last_rip: 0,
            last_time: 0,
            exits: 0,
            pending: None,
            progress,
            kept: None,
            diverge_at: None,
            broken: None,
            require_end: false,
            mirrored: false,
            image: None,
            verifier: None,
            point: None,
            verdict: Arc::default(),
            due: None,
            frozen: false,
            taken_output: false,
        };
        core.take_markers();
        core.take_base()?;
        Ok(Replayer {
            core: Arc::new(Mutex::new(core)),
            header,
            out,
        })
    }

    /// The log is a file: it must end with its `End` record, and one that ends without it (even
    /// at a frame boundary) is reported as truncated where the replay needs what is missing.
    pub fn require_end_record(&mut self) {
        lock(&self.core).require_end = true;
    }

    /// The log's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// How far the replay has got.
    pub fn progress(&self) -> Arc<Progress> {
        lock(&self.core).progress.clone()
    }

    /// The disk is this side's own copy ([`crate::disk::DiskMode::Mirrored`], a backup of a pair that
    /// shares no storage): the image handed to [`Boundary::disk`] gets the replayed writes and
    /// serves the reads the log names by their CRC. Without this a replay never touches the
    /// image.
    pub fn mirror_disk(&mut self) {
        lock(&self.core).mirrored = true;
    }

    /// Compare this side's mirrored copy with the primary's at every [`Record::DiskVerify`]
    /// (without one, those records are skipped).
    pub fn verify_disk(&mut self, verifier: DiskVerifier) {
        lock(&self.core).verifier = Some(Arc::new(Mutex::new(verifier)));
    }

    /// Keep the data of replayed disk writes here (a backup) instead of dropping it.
    pub fn keep_writes(&mut self, kept: Arc<Mutex<KeptWrites>>) {
        lock(&self.core).kept = Some(kept);
    }

    /// Test hook: report a divergence at this exit ordinal, once, as if the execution differed.
    pub fn force_divergence_at(&mut self, exit: u64) {
        lock(&self.core).diverge_at = Some(exit);
    }

    /// The boundary call that took the last record returned well: that record is verified too
    /// (after a divergence, nothing is until a resync).
    pub fn verified(&mut self) {
        let mut core = lock(&self.core);
        if core.frozen {
            return;
        }
        core.progress
            .executed
            .store(core.next_seq, Ordering::Release);
        if std::mem::take(&mut core.taken_output) {
            core.progress.notify();
        }
    }

    /// Whether the replay diverged and waits for a resync: `progress.executed` stays at the
    /// last record it verified.
    pub fn diverged(&self) -> bool {
        lock(&self.core).frozen
    }

    /// Synchronous exits replayed so far (since boot).
    pub fn exits(&self) -> u64 {
        lock(&self.core).exits
    }

    /// Whether everything the log holds has been replayed (and the log has ended: the reader
    /// reported its end).
    pub fn at_end(&self) -> bool {
        lock(&self.core).next.is_none()
    }

    /// Where the replay stands, for a live run that carries on from here: the last exit's RIP,
    /// the last virtual time given out, the exits so far, and the next record's sequence number.
    pub fn position(&self) -> (u64, u64, u64, u64) {
        let c = lock(&self.core);
        (c.last_rip, c.last_time, c.exits, c.next_seq)
    }

    /// Drops a divergence the disk found at the end of the log (the run goes on live instead).
    pub fn clear_pending(&mut self) {
        lock(&self.core).pending = None;
    }

    /// Refuses a log recorded for another machine.
    pub fn check_config(&self, hash: u64, summary: &str) -> Result<(), BoundaryError> {
        if self.header.config_hash != hash {
            return Err(BoundaryError::ConfigMismatch {
                logged: self.header.config_summary.clone(),
                ours: summary.to_string(),
            });
        }
        Ok(())
    }

    /// After a divergence: drops records until the next [`Record::Resync`] and returns its
    /// snapshot; the records after it are replayed relative to it.
    pub fn skip_to_resync(&mut self) -> Result<Vec<u8>, BoundaryError> {
        let mut core = lock(&self.core);
        core.pending = None;
        loop {
            match core.advance()? {
                Record::Resync {
                    rip,
                    time_ns,
                    exits,
                    data,
                } => {
                    core.last_rip = rip;
                    core.set_time(time_ns);
                    core.exits = exits;
                    // The snapshot replaces the diverged state: the replay counts again, from
                    // the first call that returns well after the restore.
                    core.frozen = false;
                    core.progress.exits.store(exits, Ordering::Relaxed);
                    core.progress.notify();
                    return Ok(data);
                }
                _ => continue,
            }
        }
    }
}

impl<R: Read + Send + 'static> Boundary for Replayer<R> {
    fn rtc_epoch(&mut self) -> Result<i64, BoundaryError> {
        Ok(self.header.rtc_epoch)
    }

    fn exit(&mut self, exit: &SyncExit) -> Result<(), BoundaryError> {
        let mut core = lock(&self.core);
        core.check_pending()?;
        if matches!(core.next, Some(Record::End { .. })) {
            return Err(BoundaryError::EndOfLog);
        }
        if core.diverge_at == Some(core.exits) {
            core.diverge_at = None;
            return Err(core.diverge(format!(
                "{exit} (a divergence forced by the FTVMM_TEST_DIVERGE_AT_EXIT test hook)"
            )));
        }
        let logged = core
            .next
            .as_ref()
            .and_then(|r| decode_exit(r, core.last_rip, core.last_time));
        if logged.as_ref() != Some(exit) {
            return Err(core.diverge(exit.to_string()));
        }
        core.advance()?;
        core.last_rip = exit.rip;
        core.exits += 1;
        core.progress.exits.store(core.exits, Ordering::Relaxed);
        Ok(())
    }

    fn read_clock(&mut self) -> Result<u64, BoundaryError> {
        let mut core = lock(&self.core);
        core.check_pending()?;
        core.ended_here()?;
        match core.next {
            Some(Record::Clock { delta }) => {
                let t = core.last_time.saturating_add(delta);
                core.set_time(t);
                core.advance()?;
                Ok(core.last_time)
            }
            _ => Err(core.diverge("a clock read".into())),
        }
    }

    fn poll(&mut self, point: Point, _req: &WaitRequest) -> Result<Option<Input>, BoundaryError> {
        let mut core = lock(&self.core);
        core.check_pending()?;
        let want = match point {
            Point::Exit => PointRec::Exit,
            Point::Kick => PointRec::Kick,
        };
        match &core.next {
            Some(Record::Poll { point: p, .. }) if *p == want => {}
            _ => return Ok(None),
        }
        match core.advance()? {
            Record::Poll { input, .. } => Ok(Some(core.input(input))),
            _ => unreachable!("checked above"),
        }
    }

    fn wait(&mut self, _req: &WaitRequest) -> Result<Input, BoundaryError> {
        let mut core = lock(&self.core);
        core.check_pending()?;
        core.ended_here()?;
        if !matches!(core.next, Some(Record::Wake { .. })) {
            return Err(core.diverge("a halt waiting for input".into()));
        }
        match core.advance()? {
            Record::Wake { input } => Ok(core.input(input)),
            _ => unreachable!("checked above"),
        }
    }

    fn disk(&mut self, image: Option<Box<dyn Disk>>, size: u64) -> Option<Box<dyn Disk>> {
        // A replay touches the image only when it is this side's mirrored copy; otherwise reads
        // come from the log and writes are checked and kept.
        let mut core = lock(&self.core);
        if core.mirrored {
            core.image = image;
        }
        Some(Box::new(ReplayDisk {
            core: self.core.clone(),
            size,
        }))
    }

    fn interrupt(&mut self, vector: u8) -> Result<(), BoundaryError> {
        let mut core = lock(&self.core);
        core.check_pending()?;
        core.ended_here()?;
        if core.next != Some(Record::Interrupt { vector }) {
            return Err(core.diverge(format!("interrupt vector {vector:#x} injected")));
        }
        core.advance()?;
        Ok(())
    }

    fn output(&mut self, kind: OutputKind, bytes: &[u8]) -> Result<(), BoundaryError> {
        {
            let mut core = lock(&self.core);
            core.check_pending()?;
            core.ended_here()?;
            let want = Record::Output {
                kind: output_kind_byte(kind),
                len: bytes.len() as u32,
                crc: crc32c::crc32c(bytes),
            };
            if core.next.as_ref() != Some(&want) {
                return Err(core.diverge(format!(
                    "{} bytes of output {:?}",
                    bytes.len(),
                    String::from_utf8_lossy(bytes)
                )));
            }
            let seq = core.next_seq;
            core.advance()?;
            if let Some(kept) = &core.kept {
                let out = match kind {
                    OutputKind::Serial => Output::Serial(bytes.to_vec()),
                    OutputKind::Net => Output::Net(bytes.to_vec()),
                };
                kept.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .keep_output(seq, out);
                return Ok(());
            }
        }
        match kind {
            OutputKind::Serial => {
                self.out.write_all(bytes).map_err(BoundaryError::Output)?;
                self.out.flush().map_err(BoundaryError::Output)
            }
            // A replay from a file has no network to send to.
            OutputKind::Net => Ok(()),
        }
    }

    fn restored(&mut self, now_ns: u64) {
        // A recording that began from a snapshot (`--restore`): its first time deltas are
        // relative to the snapshot's virtual time, as the recorder's were.
        let mut core = lock(&self.core);
        let t = core.last_time.max(now_ns);
        core.set_time(t);
    }

    fn kick_due(
        &mut self,
        _req: &WaitRequest,
        _waiting: Option<std::time::Duration>,
    ) -> Result<bool, BoundaryError> {
        // Replay acts only where the log says: its own kicks are never points.
        Ok(false)
    }

    fn acts_at_kicks(&self) -> bool {
        false
    }

    fn pending_checkpoint(&mut self) -> Result<Option<Vec<u8>>, BoundaryError> {
        let mut core = lock(&self.core);
        core.check_pending()?;
        if !matches!(core.next, Some(Record::Checkpoint { .. })) {
            return Ok(None);
        }
        match core.advance()? {
            Record::Checkpoint { data } => Ok(Some(data)),
            _ => unreachable!("checked above"),
        }
    }

    fn finish(&mut self, digest: &ExitDigest, end: RunEnd) -> Result<(), BoundaryError> {
        let mut core = lock(&self.core);
        core.check_pending()?;
        if end == RunEnd::Vmm {
            return Ok(());
        }
        let want = Record::End {
            exits: digest.count(),
            digest: digest.value(),
        };
        if core.next.as_ref() != Some(&want) {
            return Err(core.diverge(format!(
                "the end of the run after {} exits (digest {:016x})",
                digest.count(),
                digest.value()
            )));
        }
        core.advance()?;
        Ok(())
    }
}

/// The disk of a replay: reads are served from the log, writes are checked against it (and
/// kept, on a backup). A mismatch is a divergence, reported at the next boundary call (the
/// device sees an I/O error meanwhile, which no longer matters).
struct ReplayDisk<R: Read> {
    core: Arc<Mutex<Core<R>>>,
    size: u64,
}

impl<R: Read> Core<R> {
    /// Before a disk request: a verification due is done first, and a divergence it (or an
    /// earlier request) found fails the request.
    fn disk_ready(&mut self) -> io::Result<()> {
        self.run_due();
        match self.pending {
            Some(_) => Err(io::Error::other("replay diverged")),
            None => Ok(()),
        }
    }
}

impl<R: Read + Send> Disk for ReplayDisk<R> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut core = lock(&self.core);
        core.disk_ready()?;
        let core = &mut *core;
        if let (
            Some(image),
            Some(Record::DiskReadLocal {
                offset: o,
                len,
                crc,
            }),
        ) = (core.image.as_mut(), &core.next)
        {
            if *o == offset && *len as usize == buf.len() {
                let crc = *crc;
                image.read_at(buf, offset)?;
                let here = crc32c::crc32c(buf);
                if here != crc {
                    return Err(core.disk_divergence(format!(
                        "a disk read of {} bytes at byte {offset} that differs from the \
                         primary's copy (CRC32C {here:08x} here, {crc:08x} there)",
                        buf.len()
                    )));
                }
                core.advance()
                    .map_err(|e| io::Error::other(e.to_string()))?;
                return Ok(());
            }
        }
        let data = match &core.next {
            Some(Record::DiskRead { offset: o, data }) if *o == offset => {
                unpack_disk_data(data).ok()
            }
            _ => None,
        };
        match data {
            Some(d) if d.len() == buf.len() => {
                buf.copy_from_slice(&d);
                core.advance()
                    .map_err(|e| io::Error::other(e.to_string()))?;
                Ok(())
            }
            Some(_) | None => Err(core.disk_divergence(format!(
                "a disk read of {} bytes at byte {offset}",
                buf.len()
            ))),
        }
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut core = lock(&self.core);
        core.disk_ready()?;
        let want = Record::DiskWrite {
            offset,
            len: buf.len() as u32,
            crc: crc32c::crc32c(buf),
        };
        if core.next.as_ref() != Some(&want) {
            return Err(core.disk_divergence(format!(
                "a disk write of {} bytes at byte {offset}",
                buf.len()
            )));
        }
        let seq = core.next_seq;
        core.advance()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let core = &mut *core;
        if let Some(image) = core.image.as_mut() {
            // This side's copy: the write is state, applied as replayed (a comparison under
            // way first hashes what it overwrites).
            if let Some(point) = &core.point {
                point.before_write(image.as_mut(), offset, buf.len() as u64)?;
            }
            return image.write_at(buf, offset);
        }
        if let Some(kept) = &core.kept {
            kept.lock()
                .unwrap_or_else(|e| e.into_inner())
                .keep(seq, offset, buf.to_vec());
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut core = lock(&self.core);
        core.disk_ready()?;
        if core.next != Some(Record::DiskFlush) {
            return Err(core.disk_divergence("a disk flush".into()));
        }
        let seq = core.next_seq;
        core.advance()
            .map_err(|e| io::Error::other(e.to_string()))?;
        if let Some(image) = core.image.as_mut() {
            return image.flush();
        }
        if let Some(kept) = &core.kept {
            kept.lock()
                .unwrap_or_else(|e| e.into_inner())
                .keep_output(seq, Output::DiskFlush);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_the_primary_released_are_not_kept() {
        let mut kept = KeptWrites::default();
        kept.keep_output(3, Output::Serial(b"abc".to_vec()));
        kept.keep(5, 512, vec![1; 512]);
        kept.released(5);
        assert_eq!(kept.len_bytes(), (1, 512));
        // Replayed after the primary's marker arrived: already out, nothing to re-emit.
        kept.keep_output(4, Output::Serial(b"late".to_vec()));
        assert_eq!(kept.len_bytes(), (1, 512));
        kept.keep_output(6, Output::Serial(b"new".to_vec()));
        let seqs: Vec<u64> = kept.take().into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [5, 6]);
    }

    #[test]
    fn released_serial_output_goes_to_the_console_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let to = seen.clone();
        let mut kept = KeptWrites::default();
        kept.on_released_serial(Box::new(move |b| to.lock().unwrap().extend_from_slice(b)));
        kept.keep_output(1, Output::Serial(b"ab".to_vec()));
        kept.keep(2, 0, vec![0; 512]);
        kept.keep_output(3, Output::Serial(b"cd".to_vec()));
        kept.released(3);
        assert_eq!(&*seen.lock().unwrap(), b"ab");
        // Released before it was replayed: straight through.
        kept.keep_output(2, Output::Serial(b"xy".to_vec()));
        kept.released(4);
        assert_eq!(&*seen.lock().unwrap(), b"abxycd");
        // Not released: kept, for going live, and not shown.
        kept.keep_output(5, Output::Serial(b"ef".to_vec()));
        assert_eq!(&*seen.lock().unwrap(), b"abxycd");
        assert_eq!(kept.take().len(), 1);
    }

    /// Replays `DiskVerify { id: 1, digests }` then two clock reads against a mirrored copy
    /// holding `copy` (a file): the second clock read's answer (the comparison runs on a thread
    /// of its own from the first), and what the verifier was told.
    fn verify(copy: Vec<u8>, digests: Vec<u8>) -> (Result<u64, BoundaryError>, Vec<DiskCheck>) {
        use crate::log::LogWriter;
        use devices::disk::ImageFile;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let header = crate::log::tests::header();
        let mut bytes = Vec::new();
        {
            let mut log = LogWriter::new(&mut bytes, &header).unwrap();
            log.write(&Record::DiskVerify { id: 1, digests }).unwrap();
            log.write(&Record::Clock { delta: 5 }).unwrap();
            log.write(&Record::Clock { delta: 6 }).unwrap();
            log.flush().unwrap();
        }
        let path = std::env::temp_dir().join(format!(
            "ftvmm-verify-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, &copy).unwrap();
        let mut r = Replayer::new(io::Cursor::new(bytes), Box::new(io::sink())).unwrap();
        r.mirror_disk();
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        r.verify_disk(DiskVerifier {
            reader: ImageFile::open(&path).unwrap(),
            report: Box::new(move |c| t.lock().unwrap().push(c.clone())),
        });
        let image = ImageFile::open(&path).unwrap();
        let _disk = r.disk(Some(Box::new(image)), copy.len() as u64);
        assert_eq!(r.read_clock().unwrap(), 5);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while told.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let got = r.read_clock();
        let told = told.lock().unwrap().clone();
        std::fs::remove_file(&path).unwrap();
        (got, told)
    }

    #[test]
    fn a_disk_verification_compares_the_copy_where_the_stream_asked() {
        use crate::disk::{block_digest, BLOCK};
        let copy: Vec<u8> = (0..2 * BLOCK + 10).map(|i| (i % 253) as u8).collect();
        let digests: Vec<u8> = copy.chunks(BLOCK as usize).flat_map(block_digest).collect();
        // Equal: the replay goes on, past the record, with the clock read after it.
        let (got, told) = verify(copy.clone(), digests.clone());
        assert_eq!(got.unwrap(), 11);
        assert_eq!(told.len(), 1);
        assert!(told[0].matched(), "{:?}", told[0]);
        assert_eq!((told[0].position, told[0].blocks), (1, 3));
        // One byte differs in block 1: a divergence that names it.
        let mut altered = copy.clone();
        altered[BLOCK as usize + 7] ^= 1;
        let (got, told) = verify(altered, digests.clone());
        let e = got.unwrap_err().to_string();
        assert!(
            e.contains("1 of 3 blocks differ") && e.contains("block 1,"),
            "{e}"
        );
        assert_eq!(told[0].first_differing, [1]);
        assert_eq!(told[0].result, "mismatch");
        // Digests that cannot be this copy's (bad input from the peer): a divergence too.
        for bad in [vec![1, 2, 3], digests[..32].to_vec(), Vec::new()] {
            let (got, told) = verify(copy.clone(), bad.clone());
            let e = got.unwrap_err().to_string();
            assert!(
                e.contains(&format!("digests are {} bytes", bad.len())),
                "{e}"
            );
            assert_eq!(told[0].result, "mismatch");
        }
    }
}
