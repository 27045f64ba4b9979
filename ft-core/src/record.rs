//! The recorder: a live run that logs every input and every check replay needs.

use crate::boundary::{Boundary, BoundaryError, Input, OutputKind, Point, WaitRequest};
use crate::exit::{ExitDigest, SyncExit};
use crate::log::{exit_record, Header, InputRec, LogWriter, PointRec, Record, VERSION};
use std::io::Write;

/// Wraps a live boundary and logs everything that crosses it.
pub struct Recorder<B: Boundary, W: Write> {
    inner: B,
    log: LogWriter<W>,
    rtc_epoch: i64,
    last_rip: u64,
    last_time: u64,
    exits: u64,
}

impl<B: Boundary, W: Write> Recorder<B, W> {
    /// Starts a log on `out` for a machine described by `config_hash` and `config_summary`.
    pub fn new(
        mut inner: B,
        out: W,
        config_hash: u64,
        config_summary: String,
    ) -> Result<Self, BoundaryError> {
        let rtc_epoch = inner.rtc_epoch()?;
        let header = Header {
            version: VERSION,
            config_hash,
            config_summary,
            rtc_epoch,
        };
        Ok(Recorder {
            inner,
            log: LogWriter::new(out, &header)?,
            rtc_epoch,
            last_rip: 0,
            last_time: 0,
            exits: 0,
        })
    }

    /// Log bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.log.bytes()
    }

    fn input_rec(&mut self, input: &Input) -> InputRec {
        match input {
            Input::Time(t) => {
                let delta = t.saturating_sub(self.last_time);
                self.last_time = self.last_time.max(*t);
                InputRec::TimeDelta(delta)
            }
            Input::SerialRx(bytes) => InputRec::Serial(bytes.clone()),
        }
    }
}

impl<B: Boundary, W: Write> Boundary for Recorder<B, W> {
    fn rtc_epoch(&mut self) -> Result<i64, BoundaryError> {
        Ok(self.rtc_epoch)
    }

    fn exit(&mut self, exit: &SyncExit) -> Result<(), BoundaryError> {
        self.log.write(&exit_record(exit, self.last_rip))?;
        self.last_rip = exit.rip;
        self.exits += 1;
        self.inner.exit(exit)
    }

    fn read_clock(&mut self) -> Result<u64, BoundaryError> {
        let t = self.inner.read_clock()?.max(self.last_time);
        self.log.write(&Record::Clock {
            delta: t - self.last_time,
        })?;
        self.last_time = t;
        Ok(t)
    }

    fn poll(&mut self, point: Point, req: &WaitRequest) -> Result<Option<Input>, BoundaryError> {
        let input = self.inner.poll(point, req)?;
        if let Some(i) = &input {
            let rec = self.input_rec(i);
            self.log.write(&Record::Poll {
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
        // The log must reach the disk before the recorder sleeps: a reader may be following.
        self.log.flush()?;
        let input = self.inner.wait(req)?;
        let rec = self.input_rec(&input);
        self.log.write(&Record::Wake { input: rec })?;
        Ok(input)
    }

    fn interrupt(&mut self, vector: u8) -> Result<(), BoundaryError> {
        self.log.write(&Record::Interrupt { vector })?;
        self.inner.interrupt(vector)
    }

    fn output(&mut self, kind: OutputKind, bytes: &[u8]) -> Result<(), BoundaryError> {
        self.log.write(&Record::Output {
            kind: output_kind_byte(kind),
            len: bytes.len() as u32,
            crc: crc32c::crc32c(bytes),
        })?;
        self.inner.output(kind, bytes)
    }

    fn kick_due(&mut self, req: &WaitRequest) -> Result<bool, BoundaryError> {
        self.inner.kick_due(req)
    }

    fn acts_at_kicks(&self) -> bool {
        self.inner.acts_at_kicks()
    }

    fn wants_checkpoints(&self) -> bool {
        true
    }

    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<(), BoundaryError> {
        self.log.write(&Record::Checkpoint {
            data: snapshot.to_vec(),
        })?;
        Ok(())
    }

    fn finish(&mut self, digest: &ExitDigest) -> Result<(), BoundaryError> {
        self.log.write(&Record::End {
            exits: digest.count(),
            digest: digest.value(),
        })?;
        self.log.flush()?;
        self.inner.finish(digest)
    }
}

/// The byte of an output kind in the log.
pub fn output_kind_byte(kind: OutputKind) -> u8 {
    match kind {
        OutputKind::Serial => 0,
    }
}
