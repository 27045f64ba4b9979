//! The replayer: inputs come from a log, and everything the execution does is checked against
//! it. The first mismatch is a divergence, reported with the exit where it showed.

use crate::boundary::{Boundary, BoundaryError, Input, OutputKind, Point, WaitRequest};
use crate::exit::{ExitDigest, SyncExit};
use crate::log::{exit_kind, Header, InputRec, LogReader, PointRec, Record};
use crate::record::output_kind_byte;
use std::io::{Read, Write};

/// Replays a log.
pub struct Replayer<R: Read> {
    log: LogReader<R>,
    header: Header,
    next: Option<Record>,
    out: Box<dyn Write + Send>,
    last_rip: u64,
    last_time: u64,
    exits: u64,
}

fn describe(record: &Option<Record>, last_rip: u64) -> String {
    match record {
        None => "the end of the log".into(),
        Some(Record::Exit {
            kind,
            addr,
            data,
            len,
            rip_delta,
        }) => match exit_kind(*kind) {
            Some(k) => SyncExit {
                kind: k,
                addr: *addr,
                data: *data,
                len: *len,
                rip: last_rip.wrapping_add(*rip_delta as u64),
            }
            .to_string(),
            None => format!("an exit of unknown kind {kind}"),
        },
        Some(Record::Clock { .. }) => "a clock read".into(),
        Some(Record::Poll { point, input }) => format!("input {input:?} at a {point:?} point"),
        Some(Record::Wake { input }) => format!("a halt woken by {input:?}"),
        Some(Record::Interrupt { vector }) => format!("interrupt vector {vector:#x} injected"),
        Some(Record::Output { len, .. }) => format!("{len} bytes of output"),
        Some(Record::Checkpoint { .. }) => "a checkpoint".into(),
        Some(Record::End { exits, .. }) => format!("the end of the run after {exits} exits"),
    }
}

impl<R: Read> Replayer<R> {
    /// Opens a log for replay and writes replayed output to `out`.
    pub fn new(input: R, out: Box<dyn Write + Send>) -> Result<Self, BoundaryError> {
        let (mut log, header) = LogReader::new(input)?;
        let next = log.read_record()?;
        Ok(Replayer {
            log,
            header,
            next,
            out,
            last_rip: 0,
            last_time: 0,
            exits: 0,
        })
    }

    /// The log's header.
    pub fn header(&self) -> &Header {
        &self.header
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

    fn advance(&mut self) -> Result<Record, BoundaryError> {
        let rec = self
            .next
            .take()
            .ok_or(BoundaryError::LogEnded { exit: self.exits })?;
        self.next = self.log.read_record()?;
        Ok(rec)
    }

    fn diverge(&self, got: String) -> BoundaryError {
        BoundaryError::Divergence {
            exit: self.exits,
            expected: describe(&self.next, self.last_rip),
            got,
        }
    }

    fn input(&mut self, rec: InputRec) -> Input {
        match rec {
            InputRec::TimeDelta(d) => {
                self.last_time = self.last_time.saturating_add(d);
                Input::Time(self.last_time)
            }
            InputRec::Serial(bytes) => Input::SerialRx(bytes),
        }
    }
}

impl<R: Read> Boundary for Replayer<R> {
    fn rtc_epoch(&mut self) -> Result<i64, BoundaryError> {
        Ok(self.header.rtc_epoch)
    }

    fn exit(&mut self, exit: &SyncExit) -> Result<(), BoundaryError> {
        if matches!(self.next, Some(Record::End { .. })) {
            return Err(BoundaryError::EndOfLog);
        }
        let matches = match &self.next {
            Some(Record::Exit {
                kind,
                addr,
                data,
                len,
                rip_delta,
            }) => {
                *kind == exit.kind as u8
                    && *addr == exit.addr
                    && *data == exit.data
                    && *len == exit.len
                    && self.last_rip.wrapping_add(*rip_delta as u64) == exit.rip
            }
            _ => false,
        };
        if !matches {
            return Err(self.diverge(exit.to_string()));
        }
        self.advance()?;
        self.last_rip = exit.rip;
        self.exits += 1;
        Ok(())
    }

    fn read_clock(&mut self) -> Result<u64, BoundaryError> {
        match &self.next {
            Some(Record::Clock { delta }) => {
                self.last_time = self.last_time.saturating_add(*delta);
                self.advance()?;
                Ok(self.last_time)
            }
            _ => Err(self.diverge("a clock read".into())),
        }
    }

    fn poll(&mut self, point: Point, _req: &WaitRequest) -> Result<Option<Input>, BoundaryError> {
        let want = match point {
            Point::Exit => PointRec::Exit,
            Point::Kick => PointRec::Kick,
        };
        match &self.next {
            Some(Record::Poll { point: p, .. }) if *p == want => {}
            _ => return Ok(None),
        }
        match self.advance()? {
            Record::Poll { input, .. } => Ok(Some(self.input(input))),
            _ => unreachable!("checked above"),
        }
    }

    fn wait(&mut self, _req: &WaitRequest) -> Result<Input, BoundaryError> {
        if !matches!(self.next, Some(Record::Wake { .. })) {
            return Err(self.diverge("a halt waiting for input".into()));
        }
        match self.advance()? {
            Record::Wake { input } => Ok(self.input(input)),
            _ => unreachable!("checked above"),
        }
    }

    fn interrupt(&mut self, vector: u8) -> Result<(), BoundaryError> {
        if self.next != Some(Record::Interrupt { vector }) {
            return Err(self.diverge(format!("interrupt vector {vector:#x} injected")));
        }
        self.advance()?;
        Ok(())
    }

    fn output(&mut self, kind: OutputKind, bytes: &[u8]) -> Result<(), BoundaryError> {
        let want = Record::Output {
            kind: output_kind_byte(kind),
            len: bytes.len() as u32,
            crc: crc32c::crc32c(bytes),
        };
        if self.next.as_ref() != Some(&want) {
            return Err(self.diverge(format!(
                "{} bytes of output {:?}",
                bytes.len(),
                String::from_utf8_lossy(bytes)
            )));
        }
        self.advance()?;
        match kind {
            OutputKind::Serial => {
                self.out.write_all(bytes).map_err(BoundaryError::Output)?;
                self.out.flush().map_err(BoundaryError::Output)
            }
        }
    }

    fn kick_due(&mut self, _req: &WaitRequest) -> Result<bool, BoundaryError> {
        // Replay acts only where the log says: its own kicks are never points.
        Ok(false)
    }

    fn acts_at_kicks(&self) -> bool {
        false
    }

    fn pending_checkpoint(&mut self) -> Result<Option<Vec<u8>>, BoundaryError> {
        if !matches!(self.next, Some(Record::Checkpoint { .. })) {
            return Ok(None);
        }
        match self.advance()? {
            Record::Checkpoint { data } => Ok(Some(data)),
            _ => unreachable!("checked above"),
        }
    }

    fn finish(&mut self, digest: &ExitDigest) -> Result<(), BoundaryError> {
        let want = Record::End {
            exits: digest.count(),
            digest: digest.value(),
        };
        if self.next.as_ref() != Some(&want) {
            return Err(self.diverge(format!(
                "the end of the run after {} exits (digest {:016x})",
                digest.count(),
                digest.value()
            )));
        }
        self.advance()?;
        Ok(())
    }
}
