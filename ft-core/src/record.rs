//! The recorder: a live run that logs every input and every check replay needs.
//!
//! Where the records go is a [`RecordSink`]: a log file (`--record`), or the logging channel to
//! a backup ([`crate::primary`]). The disk the recorder hands the guest ([`RecordingDisk`]) logs
//! into the same stream, in order with everything else.

use crate::boundary::{
    Attention, Boundary, BoundaryError, Input, OutputKind, Point, RunEnd, WaitRequest,
};
use crate::disk::DiskMode;
use crate::exit::{ExitDigest, SyncExit};
use crate::log::{exit_record, pack_disk_data, InputRec, PointRec, Record, RecordSink};
use crate::output::{Output, OutputGate};
use devices::disk::Disk;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What the records are relative to, and where they go. Shared with the recording disk.
pub struct RecordCore {
    sink: Box<dyn RecordSink>,
    last_rip: u64,
    last_time: u64,
    exits: u64,
    counters: Arc<RecordCounters>,
    /// Where outputs go once their record is written, when a rule holds them.
    gate: Option<Arc<dyn OutputGate>>,
}

/// Figures of a recording that other threads read without taking the core's lock (the vCPU
/// thread may hold it for long, blocked on a full log buffer).
#[derive(Debug, Default)]
pub struct RecordCounters {
    /// Checkpoints written.
    pub checkpoints: AtomicU64,
    /// Their bytes, as the VMM encoded them.
    pub checkpoint_bytes: AtomicU64,
}

impl RecordCore {
    /// The recording's counters, to read from any thread.
    pub fn counters(&self) -> Arc<RecordCounters> {
        self.counters.clone()
    }

    fn write(&mut self, rec: &Record) -> Result<u64, BoundaryError> {
        Ok(self.sink.record(rec)?)
    }

    /// Writes the record of an output; returns where to hand the output, if a rule holds
    /// outputs: the gate, with the record's sequence number.
    fn write_output(&mut self, rec: &Record) -> Result<Option<Gated>, BoundaryError> {
        let seq = self.sink.record_output(rec)?;
        Ok(self.gate.clone().map(|gate| Gated { gate, seq }))
    }

    /// RIP of the last exit, the last virtual time given out, and the exits so far: what a
    /// stream starting here is relative to ([`Record::Base`]).
    pub fn base(&self) -> (u64, u64, u64) {
        (self.last_rip, self.last_time, self.exits)
    }

    /// Writes a record outside the vCPU loop's calls (a stream's base, a resync snapshot),
    /// while the vCPU is paused.
    pub fn write_record(&mut self, rec: &Record) -> Result<u64, BoundaryError> {
        self.write(rec)
    }

    /// Pushes buffered records out.
    pub fn flush(&mut self) -> Result<(), BoundaryError> {
        Ok(self.sink.flush()?)
    }

    /// The vCPU was kicked ([`RecordSink::tick`]).
    fn tick(&mut self) -> Result<(), BoundaryError> {
        Ok(self.sink.tick()?)
    }
}

/// An output's way through the gate: the record that produced it is written as `seq`.
struct Gated {
    gate: Arc<dyn OutputGate>,
    seq: u64,
}

impl Gated {
    fn hold(self, out: Output) {
        self.gate.hold(self.seq, out);
    }
}

/// A handle on a recorder's log, for the disk and for the VMM's control thread.
pub type SharedRecordCore = Arc<Mutex<RecordCore>>;

fn lock(core: &SharedRecordCore) -> MutexGuard<'_, RecordCore> {
    // A panic while holding the lock cannot leave the core half-updated in a way that matters
    // more than the panic itself; keep going with what is there.
    core.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wraps a live boundary and logs everything that crosses it.
pub struct Recorder<B: Boundary> {
    inner: B,
    core: SharedRecordCore,
    rtc_epoch: i64,
    disk_mode: DiskMode,
}

impl<B: Boundary> Recorder<B> {
    /// Records into `sink`, which has already written its header; `rtc_epoch` is the one the
    /// header carries (the live boundary's, read once).
    pub fn new(inner: B, sink: Box<dyn RecordSink>, rtc_epoch: i64) -> Result<Self, BoundaryError> {
        Ok(Recorder {
            inner,
            core: Arc::new(Mutex::new(RecordCore {
                sink,
                last_rip: 0,
                last_time: 0,
                exits: 0,
                counters: Arc::default(),
                gate: None,
            })),
            rtc_epoch,
            disk_mode: DiskMode::Shared,
        })
    }

    /// Records the disk as `mode` keeps it: with [`DiskMode::Mirrored`], reads are logged by
    /// their CRC32C only and writes go to the image at once (they are this side's state, not
    /// outputs the backup must hold first).
    pub fn with_disk_mode(mut self, mode: DiskMode) -> Self {
        self.disk_mode = mode;
        self
    }

    /// Hands every output to `gate` with the sequence number of the record that produced it,
    /// instead of to the wrapped boundary's writers (the primary's output rule). The wrapped
    /// boundary still sees serial output (a live one watches it for the input's marker) but
    /// its writers must lead nowhere; disk writes reach only the gate.
    pub fn with_gate(self, gate: Arc<dyn OutputGate>) -> Self {
        lock(&self.core).gate = Some(gate);
        self
    }

    /// The RTC epoch the recording's header must carry.
    pub fn rtc_epoch(&self) -> i64 {
        self.rtc_epoch
    }

    /// Carries on from where a replay ended: the deltas of the next records are relative to
    /// `rip` and `time_ns` (a backup that goes live; a later backup's stream starts from here).
    pub fn continue_from(&mut self, rip: u64, time_ns: u64) {
        let mut core = lock(&self.core);
        core.last_rip = rip;
        core.last_time = time_ns;
    }

    /// The shared log, for the VMM's control thread.
    pub fn core(&self) -> SharedRecordCore {
        self.core.clone()
    }

    /// Log bytes written so far.
    pub fn bytes(&self) -> u64 {
        lock(&self.core).sink.bytes()
    }

    fn input_rec(core: &mut RecordCore, input: &Input) -> InputRec {
        match input {
            Input::Time(t) => {
                let delta = t.saturating_sub(core.last_time);
                core.last_time = core.last_time.max(*t);
                InputRec::TimeDelta(delta)
            }
            Input::SerialRx(bytes) => InputRec::Serial(bytes.clone()),
            Input::NetRx(frame) => InputRec::Net(frame.clone()),
        }
    }
}

impl<B: Boundary> Boundary for Recorder<B> {
    fn rtc_epoch(&mut self) -> Result<i64, BoundaryError> {
        Ok(self.rtc_epoch)
    }

    fn exit(&mut self, exit: &SyncExit) -> Result<(), BoundaryError> {
        {
            let mut core = lock(&self.core);
            let rec = exit_record(exit, core.last_rip, core.last_time);
            core.write(&rec)?;
            core.last_rip = exit.rip;
            core.exits += 1;
        }
        self.inner.exit(exit)
    }

    fn read_clock(&mut self) -> Result<u64, BoundaryError> {
        let t = self.inner.read_clock()?;
        let mut core = lock(&self.core);
        let t = t.max(core.last_time);
        let delta = t - core.last_time;
        core.write(&Record::Clock { delta })?;
        core.last_time = t;
        Ok(t)
    }

    fn poll(&mut self, point: Point, req: &WaitRequest) -> Result<Option<Input>, BoundaryError> {
        if point == Point::Kick {
            lock(&self.core).tick()?;
        }
        let input = self.inner.poll(point, req)?;
        if let Some(i) = &input {
            let mut core = lock(&self.core);
            let rec = Self::input_rec(&mut core, i);
            core.write(&Record::Poll {
                point: match point {
                    Point::Exit => PointRec::Exit,
                    Point::Kick => PointRec::Kick,
                },
                input: rec,
            })?;
        }
        Ok(input)
    }

    fn wait(&mut self, req: &WaitRequest) -> Result<Input, BoundaryError> {
        // The log must be out before the recorder sleeps: a reader may be following.
        lock(&self.core).flush()?;
        let input = self.inner.wait(req)?;
        let mut core = lock(&self.core);
        let rec = Self::input_rec(&mut core, &input);
        core.write(&Record::Wake { input: rec })?;
        Ok(input)
    }

    fn set_attention(&mut self, flag: Attention) {
        self.inner.set_attention(flag);
    }

    fn disk(&mut self, image: Option<Box<dyn Disk>>, size: u64) -> Option<Box<dyn Disk>> {
        let image = self.inner.disk(image, size)?;
        Some(Box::new(RecordingDisk {
            image,
            core: self.core.clone(),
            mode: self.disk_mode,
        }))
    }

    fn interrupt(&mut self, vector: u8) -> Result<(), BoundaryError> {
        lock(&self.core).write(&Record::Interrupt { vector })?;
        self.inner.interrupt(vector)
    }

    fn output(&mut self, kind: OutputKind, bytes: &[u8]) -> Result<(), BoundaryError> {
        let gate = lock(&self.core).write_output(&Record::Output {
            kind: output_kind_byte(kind),
            len: bytes.len() as u32,
            crc: crc32c::crc32c(bytes),
        })?;
        self.inner.output(kind, bytes)?;
        if let Some(gated) = gate {
            gated.hold(match kind {
                OutputKind::Serial => Output::Serial(bytes.to_vec()),
                OutputKind::Net => Output::Net(bytes.to_vec()),
            });
        }
        Ok(())
    }

    fn kick_due(
        &mut self,
        req: &WaitRequest,
        waiting: Option<std::time::Duration>,
    ) -> Result<bool, BoundaryError> {
        self.inner.kick_due(req, waiting)
    }

    fn acts_at_kicks(&self) -> bool {
        self.inner.acts_at_kicks()
    }

    fn wants_checkpoints(&self) -> bool {
        lock(&self.core).sink.following()
    }

    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), BoundaryError> {
        let mut core = lock(&self.core);
        core.write(&Record::Checkpoint {
            data: snapshot.to_vec(),
        })?;
        core.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        core.counters
            .checkpoint_bytes
            .fetch_add(snapshot.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn defers_checkpoints(&self) -> bool {
        lock(&self.core).sink.defers()
    }

    fn checkpoint_later(
        &mut self,
        later: crate::log::PendingCheckpoint,
    ) -> Result<(), BoundaryError> {
        let mut core = lock(&self.core);
        let counters = core.counters.clone();
        core.sink.record_later(later.on_done(move |len| {
            counters
                .checkpoint_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
        }))?;
        core.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn restored(&mut self, now_ns: u64) {
        self.inner.restored(now_ns);
        let mut core = lock(&self.core);
        core.last_time = core.last_time.max(now_ns);
    }

    fn finish(&mut self, digest: &ExitDigest, end: RunEnd) -> Result<(), BoundaryError> {
        {
            let mut core = lock(&self.core);
            core.write(&Record::End {
                exits: digest.count(),
                digest: digest.value(),
            })?;
            core.flush()?;
        }
        self.inner.finish(digest, end)
    }
}

/// The disk of a recorded run: every read is logged with its data, every write and flush with
/// a digest, in order with the other records; the data goes to and comes from the image the
/// live side provided.
pub struct RecordingDisk {
    image: Box<dyn Disk>,
    core: SharedRecordCore,
    mode: DiskMode,
}

fn log_error(e: BoundaryError) -> io::Error {
    io::Error::other(e.to_string())
}

impl Disk for RecordingDisk {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read_at(buf, offset)?;
        let record = match self.mode {
            DiskMode::Shared => Record::DiskRead {
                offset,
                data: pack_disk_data(buf),
            },
            DiskMode::Mirrored => Record::DiskReadLocal {
                offset,
                len: buf.len() as u32,
                crc: crc32c::crc32c(buf),
            },
        };
        lock(&self.core).write(&record).map_err(log_error)?;
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        // The record first: a held write is tagged with the record that produced it.
        let gate = self.write_disk_record(&Record::DiskWrite {
            offset,
            len: buf.len() as u32,
            crc: crc32c::crc32c(buf),
        })?;
        match gate {
            Some(gated) => {
                let data = buf.to_vec();
                gated.hold(Output::DiskWrite { offset, data });
                Ok(())
            }
            None => self.image.write_at(buf, offset),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.write_disk_record(&Record::DiskFlush)? {
            Some(gated) => {
                gated.hold(Output::DiskFlush);
                Ok(())
            }
            None => self.image.flush(),
        }
    }
}

impl RecordingDisk {
    /// Logs a disk write or flush; returns where to hand it if the output rule holds it. On a
    /// shared disk it is an output (held when a gate is set); on a mirrored disk it is this
    /// side's state, logged for the backup to check its replay against and done at once.
    fn write_disk_record(&self, rec: &Record) -> io::Result<Option<Gated>> {
        let mut core = lock(&self.core);
        match self.mode {
            DiskMode::Shared => core.write_output(rec),
            DiskMode::Mirrored => core.write(rec).map(|_| None),
        }
        .map_err(log_error)
    }
}

/// The byte of an output kind in the log.
pub fn output_kind_byte(kind: OutputKind) -> u8 {
    match kind {
        OutputKind::Serial => 0,
        OutputKind::Net => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::{LiveBoundary, SerialSource};
    use crate::log::LogWriter;

    /// A gate that keeps what it is given.
    #[derive(Default)]
    struct Kept(Mutex<Vec<(u64, Output)>>);

    impl OutputGate for Kept {
        fn hold(&self, seq: u64, out: Output) {
            self.0.lock().unwrap().push((seq, out));
        }
    }

    /// A disk that must not be written: under a gate, writes reach only the gate.
    struct ReadOnly;

    impl Disk for ReadOnly {
        fn size(&self) -> u64 {
            4096
        }
        fn read_at(&mut self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
            buf.fill(7);
            Ok(())
        }
        fn write_at(&mut self, _buf: &[u8], _offset: u64) -> io::Result<()> {
            panic!("a gated write reached the image")
        }
        fn flush(&mut self) -> io::Result<()> {
            panic!("a gated flush reached the image")
        }
    }

    /// Every output reaches the gate under the number the log gave the record that produced
    /// it, serial, network and disk alike, and in the order the guest made them.
    #[test]
    fn outputs_reach_the_gate_under_their_records_numbers() {
        let sink = LogWriter::new(Vec::new(), &crate::log::tests::header()).unwrap();
        let live = LiveBoundary::new(SerialSource::None, Box::new(io::sink()));
        let gate = Arc::new(Kept::default());
        let mut rec = Recorder::new(live, Box::new(sink), 0)
            .unwrap()
            .with_gate(gate.clone());
        let mut disk = rec.disk(Some(Box::new(ReadOnly)), 4096).unwrap();
        rec.interrupt(32).unwrap(); // frame 1
        rec.output(OutputKind::Serial, b"hi").unwrap(); // 2
        let mut buf = [0u8; 512];
        disk.read_at(&mut buf, 0).unwrap(); // 3: an input, not an output
        assert_eq!(buf, [7; 512]);
        disk.write_at(&[1; 512], 512).unwrap(); // 4
        rec.output(OutputKind::Net, &[9, 9]).unwrap(); // 5
        disk.flush().unwrap(); // 6
        let got = gate.0.lock().unwrap().clone();
        assert_eq!(
            got,
            [
                (2, Output::Serial(b"hi".to_vec())),
                (
                    4,
                    Output::DiskWrite {
                        offset: 512,
                        data: vec![1; 512]
                    }
                ),
                (5, Output::Net(vec![9, 9])),
                (6, Output::DiskFlush),
            ]
        );
    }

    /// A sink that notes which records came as outputs.
    #[derive(Default)]
    struct Noted(Arc<Mutex<Vec<(Record, bool)>>>);

    impl RecordSink for Noted {
        fn record(&mut self, record: &Record) -> Result<u64, crate::log::LogError> {
            self.0.lock().unwrap().push((record.clone(), false));
            Ok(0)
        }
        fn record_output(&mut self, record: &Record) -> Result<u64, crate::log::LogError> {
            self.0.lock().unwrap().push((record.clone(), true));
            Ok(0)
        }
        fn flush(&mut self) -> Result<(), crate::log::LogError> {
            Ok(())
        }
        fn bytes(&self) -> u64 {
            0
        }
    }

    /// The recorder says which records are outputs: serial output always, a disk write and a
    /// flush on a shared disk only (on a mirrored one they are this side's state).
    #[test]
    fn the_recorder_says_which_records_are_outputs() {
        for (mode, disk_is_output) in [(DiskMode::Shared, true), (DiskMode::Mirrored, false)] {
            let noted = Noted::default();
            let seen = noted.0.clone();
            let live = LiveBoundary::new(SerialSource::None, Box::new(io::sink()));
            let mut rec = Recorder::new(live, Box::new(noted), 0)
                .unwrap()
                .with_disk_mode(mode);
            let mut disk = rec.disk(Some(Box::new(Sink4k)), 4096).unwrap();
            rec.output(OutputKind::Serial, b"x").unwrap();
            disk.write_at(&[1; 512], 0).unwrap();
            disk.flush().unwrap();
            let mut buf = [0u8; 512];
            disk.read_at(&mut buf, 0).unwrap();
            let flags: Vec<bool> = seen.lock().unwrap().iter().map(|(_, o)| *o).collect();
            assert_eq!(
                flags,
                [true, disk_is_output, disk_is_output, false],
                "{mode}"
            );
        }
    }

    /// A disk that takes everything.
    struct Sink4k;

    impl Disk for Sink4k {
        fn size(&self) -> u64 {
            4096
        }
        fn read_at(&mut self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&mut self, _buf: &[u8], _offset: u64) -> io::Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
