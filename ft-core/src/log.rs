//! The event log: what a recording holds and what the logging channel will carry.
//!
//! ```text
//! log     := magic header-frame record-frame*
//! magic   := "FTVMMLOG"                          8 bytes
//! frame   := len payload crc
//! len     := varint (LEB128, at most 5 bytes)    length of payload, at most MAX_FRAME
//! payload := postcard(Header) | postcard(Record)
//! crc     := u32, little-endian                  CRC32C (Castagnoli) of payload
//! ```
//!
//! Payloads are encoded with postcard 1.x (integers as LEB128 varints, signed ones zigzagged,
//! enums as a varint discriminant then the fields in order, byte strings as a varint length then
//! the bytes). docs/PROTOCOL.md gives every record byte by byte.
//!
//! Records follow the order in which the VMM calls the boundary, so a record's position in the
//! instruction stream is implicit: it happened after the synchronous exits logged before it.

use crate::exit::{ExitKind, SyncExit};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use thiserror::Error;

/// The first 8 bytes of every log.
pub const MAGIC: [u8; 8] = *b"FTVMMLOG";
/// The format version this build writes (2 added the disk, base and resync records; 3 changed
/// the checkpoint data: snapshot format 5, pages encoded against a page cache, and added the
/// interrupt-window exits; 4 added the mechanisms to the header; 5 added `DiskReadLocal`; 6
/// added `DiskVerify`; 7 added `ExitAtTime`); it reads versions 1 to 7 (the checkpoints of
/// older logs do not decode: snapshots are tied to the build).
pub const VERSION: u16 = 7;
/// The largest frame payload (a full checkpoint of a 3 GiB guest fits in a few frames' worth of
/// pages; checkpoints are split by the writer if they are larger).
pub const MAX_FRAME: u32 = 1 << 30;
/// The most a reader allocates ahead of the bytes it has actually received.
const READ_CHUNK: usize = 64 << 10;

/// What a replay must match to be meaningful: the same machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Format version.
    pub version: u16,
    /// A hash of the machine configuration (kernel, initrd and disk contents' identity, command
    /// line, memory size, profile); replay refuses a log whose hash differs from its own.
    pub config_hash: u64,
    /// A human-readable summary of the configuration, for the error message.
    pub config_summary: String,
    /// The RTC's wall-clock epoch at boot (an input).
    pub rtc_epoch: i64,
    /// The host-dependent mechanisms the recording used (None before version 4): a replay
    /// uses the same ones, or refuses on a host that cannot give them.
    pub mechanisms: Option<Mechanisms>,
}

/// The header as versions 1 to 3 wrote it.
#[derive(Deserialize)]
struct HeaderV3 {
    version: u16,
    config_hash: u64,
    config_summary: String,
    rtc_epoch: i64,
}

/// The host-dependent mechanisms of a run, which decide what its positions are: every side of
/// a recording (the recorder, a replay, a backup) must use the same ones. Chosen from what the
/// host's KVM can do (`vmm::host`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mechanisms {
    /// The compatibility paths for a KVM that cannot run some guest instructions itself
    /// (emulation completions, SYSCALL): each completion is a synchronous exit.
    pub compat: bool,
    /// Interrupt-window exits are positions: a pending interrupt asks KVM for one.
    pub irq_window: bool,
    /// Hardware breakpoints in guest kernel code (interrupt-window sites, `--guest-tsc
    /// breakpoints`): each hit is a synchronous exit.
    pub breakpoints: bool,
}

impl std::fmt::Display for Mechanisms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "compat {}, irq windows {}, breakpoints {}",
            on(self.compat),
            on(self.irq_window),
            on(self.breakpoints)
        )
    }
}

/// Where inputs were taken (see [`crate::boundary::Point`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointRec {
    /// After a synchronous exit.
    Exit,
    /// At a kick.
    Kick,
}

/// A non-deterministic input as logged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputRec {
    /// Virtual time moved forward by this many nanoseconds.
    TimeDelta(u64),
    /// Serial bytes received.
    Serial(#[serde(with = "serde_bytes")] Vec<u8>),
    /// An Ethernet frame received by the NIC.
    Net(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// One record of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A synchronous exit. `rip_delta` is RIP minus the previous exit's RIP (wrapping).
    Exit {
        /// [`ExitKind`] as its byte.
        kind: u8,
        /// Port or address.
        addr: u64,
        /// Data.
        data: u64,
        /// Access size.
        len: u8,
        /// RIP relative to the previous exit's.
        rip_delta: i64,
    },
    /// A device read the clock: virtual time moved forward by `delta` ns (0 if it did not).
    Clock {
        /// Nanoseconds since the last time the log moved the clock.
        delta: u64,
    },
    /// Inputs delivered by a poll.
    Poll {
        /// The kind of point the poll ran at (after a synchronous exit, or at a kick); replay
        /// delivers the input at the same kind of point.
        point: PointRec,
        /// The input delivered there.
        input: InputRec,
    },
    /// The input that woke a halted guest.
    Wake {
        /// The input the halted guest waited for: a step of virtual time, serial bytes or a
        /// network frame.
        input: InputRec,
    },
    /// An interrupt injected.
    Interrupt {
        /// The vector.
        vector: u8,
    },
    /// Output to the world: its kind, length and CRC32C.
    Output {
        /// 0 = serial.
        kind: u8,
        /// Bytes.
        len: u32,
        /// CRC32C of the bytes.
        crc: u32,
    },
    /// A checkpoint the replay applies instead of executing up to this point (opaque to the
    /// log: the VMM's snapshot encoding).
    Checkpoint {
        /// The snapshot.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The end of a recording: the recorder's exit count and digest.
    End {
        /// Synchronous exits.
        exits: u64,
        /// The exit digest.
        digest: u64,
    },
    /// The guest's disk read `offset`: the bytes it got, LZ4-compressed (a backup never reads a
    /// shared disk, so read data travels in the log).
    DiskRead {
        /// Byte offset on the disk.
        offset: u64,
        /// The data, LZ4 block format with its uncompressed size first (u32 little-endian).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The guest wrote `len` bytes at `offset`, with this CRC32C: an output.
    DiskWrite {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes written.
        len: u32,
        /// CRC32C of the bytes.
        crc: u32,
    },
    /// The guest asked for its writes so far to be made durable.
    DiskFlush,
    /// Where a log stream that does not start at boot starts: the values the deltas of the
    /// following records are relative to (a backup attached to a running primary).
    Base {
        /// RIP of the last synchronous exit before the stream.
        rip: u64,
        /// Virtual time the recorder last gave out, ns.
        time_ns: u64,
        /// Synchronous exits before the stream.
        exits: u64,
    },
    /// A full snapshot that a backup which diverged restores to carry on from here; the deltas
    /// of the records after it are relative to `rip` and `time_ns`, as after [`Record::Base`].
    Resync {
        /// RIP of the last synchronous exit.
        rip: u64,
        /// Virtual time the recorder last gave out, ns.
        time_ns: u64,
        /// Synchronous exits so far.
        exits: u64,
        /// The full snapshot (the VMM's encoding).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The guest's disk read `len` bytes at `offset` of a mirrored disk
    /// ([`crate::disk::DiskMode::Mirrored`]): each side reads its own copy, so only the CRC32C
    /// of what the primary read travels, and a backup whose copy reads otherwise diverges there.
    DiskReadLocal {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes read.
        len: u32,
        /// CRC32C of the bytes the primary read.
        crc: u32,
    },
    /// Version 6, a mirrored disk: the primary's copy as it was at this point of the stream
    /// (`ftvmm ctl verify-disk`), one digest a block ([`crate::disk::BLOCK`] bytes, SHA-256's
    /// first 16 bytes). A backup compares its own copy when its replay reaches this record:
    /// a copy that differs diverges there. Not an event of the guest: replay skips it.
    DiskVerify {
        /// The verification's number.
        id: u64,
        /// The block digests, 16 bytes each, in block order.
        #[serde(with = "serde_bytes")]
        digests: Vec<u8>,
    },
    /// Version 7: a synchronous exit whose data is the virtual time the log gave out last (the
    /// guest kernel's `RDTSC`, completed by the VMM with the clock read logged just before it):
    /// an [`Record::Exit`] without its data, which the reader knows. [`exit_record`] writes it
    /// for a `Debug` exit whose data is that time, [`decode_exit`] gives the exit back.
    ExitAtTime {
        /// [`ExitKind`] as its byte.
        kind: u8,
        /// Port or address.
        addr: u64,
        /// Access size.
        len: u8,
        /// RIP relative to the previous exit's.
        rip_delta: i64,
    },
}

/// The largest disk read one record carries, uncompressed (virtio-blk moves at most 64 KiB at
/// a time; anything above this in a log is refused before decompressing).
pub const MAX_DISK_READ: usize = 1 << 20;

/// Compresses disk-read data for [`Record::DiskRead`].
pub fn pack_disk_data(data: &[u8]) -> Vec<u8> {
    lz4_flex::compress_prepend_size(data)
}

/// Decompresses [`Record::DiskRead`] data, refusing a claimed size above [`MAX_DISK_READ`].
pub fn unpack_disk_data(packed: &[u8]) -> Result<Vec<u8>, UnpackError> {
    unpack_lz4(packed, MAX_DISK_READ)
}

/// Why an LZ4 block with a size prefix ([`unpack_lz4`]) was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnpackError {
    /// Fewer than the four bytes of the size prefix.
    #[error("shorter than its size prefix")]
    NoSize,
    /// A claimed size above what the caller accepts.
    #[error("claims {claimed} bytes uncompressed, more than {max}")]
    TooLarge {
        /// What the prefix says.
        claimed: usize,
        /// The caller's limit.
        max: usize,
    },
    /// A claimed size LZ4 cannot expand the rest to.
    #[error("claims {claimed} bytes uncompressed from {compressed} compressed, more than LZ4 can expand to")]
    Impossible {
        /// What the prefix says.
        claimed: usize,
        /// The compressed bytes after the prefix.
        compressed: usize,
    },
    /// The block itself is corrupt.
    #[error("LZ4: {0}")]
    Lz4(String),
}

/// Decompresses an LZ4 block that starts with its uncompressed size (u32 little-endian), as
/// `lz4_flex::compress_prepend_size` makes it. Whatever sent it may be hostile: a claimed size
/// above `max`, or above what LZ4 can expand the rest to (255 times: one token byte, then
/// length bytes of 255), is refused before anything is allocated. The one check for snapshots,
/// transfer messages, log batches and disk-read data.
pub fn unpack_lz4(packed: &[u8], max: usize) -> Result<Vec<u8>, UnpackError> {
    lz4_size(packed, max)?;
    lz4_flex::decompress_size_prepended(packed).map_err(|e| UnpackError::Lz4(e.to_string()))
}

/// The uncompressed size an LZ4 block with a size prefix claims, once checked against `max`
/// and against what LZ4 can expand the rest to (a dictionary does not change that bound: a
/// match copies at most 255 bytes more per byte of the block).
fn lz4_size(packed: &[u8], max: usize) -> Result<usize, UnpackError> {
    let claimed = packed
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(UnpackError::NoSize)?;
    if claimed > max {
        return Err(UnpackError::TooLarge { claimed, max });
    }
    let compressed = packed.len() - 4;
    let most = compressed.saturating_mul(255).saturating_add(16);
    if claimed > most {
        return Err(UnpackError::Impossible {
            claimed,
            compressed,
        });
    }
    Ok(claimed)
}

/// A checkpoint whose snapshot another thread is still encoding ([`RecordSink::record_later`]):
/// the encoder sends the bytes, or why it could not, once.
pub struct PendingCheckpoint {
    rx: std::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    on_done: Option<Box<dyn FnOnce(usize) + Send>>,
}

impl PendingCheckpoint {
    /// The checkpoint the encoder behind `rx` will send.
    pub fn new(rx: std::sync::mpsc::Receiver<Result<Vec<u8>, String>>) -> PendingCheckpoint {
        PendingCheckpoint { rx, on_done: None }
    }

    /// Calls `f` with the encoded size once the bytes are in.
    pub fn on_done(mut self, f: impl FnOnce(usize) + Send + 'static) -> PendingCheckpoint {
        self.on_done = Some(Box::new(f));
        self
    }

    /// The bytes if the encoder is done, `None` if not yet.
    pub fn poll(&mut self) -> Option<Result<Vec<u8>, LogError>> {
        use std::sync::mpsc::TryRecvError;
        match self.rx.try_recv() {
            Ok(r) => Some(self.done(r)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(Self::gone())),
        }
    }

    /// The bytes, waiting for the encoder.
    pub fn wait(mut self) -> Result<Vec<u8>, LogError> {
        match self.rx.recv() {
            Ok(r) => self.done(r),
            Err(_) => Err(Self::gone()),
        }
    }

    fn done(&mut self, r: Result<Vec<u8>, String>) -> Result<Vec<u8>, LogError> {
        let bytes = r.map_err(|e| LogError::Encode(format!("a checkpoint: {e}")))?;
        if let Some(f) = self.on_done.take() {
            f(bytes.len());
        }
        Ok(bytes)
    }

    fn gone() -> LogError {
        LogError::Encode("a checkpoint's encoder ended without its bytes".into())
    }
}

/// Where a recorder's records go: a log file, or the logging channel to a backup. Each record
/// gets a sequence number: its frame's index in the stream (the header is frame 0).
pub trait RecordSink: Send {
    /// Appends a record; returns its sequence number.
    fn record(&mut self, record: &Record) -> Result<u64, LogError>;
    /// Appends a record that produced an output the output rule holds until the backup has
    /// it (the recorder says which records do: a disk write is one on a shared disk, not on a
    /// mirrored one); returns its sequence number. A sink that streams sends it soon and marks
    /// its batch as carrying an output.
    fn record_output(&mut self, record: &Record) -> Result<u64, LogError> {
        self.record(record)
    }
    /// Appends a [`Record::Checkpoint`] another thread is encoding; returns its sequence
    /// number. A sink that [`defers`](RecordSink::defers) holds the records after it until its
    /// bytes are in, and the vCPU runs on meanwhile; by default the sink waits for them here.
    fn record_later(&mut self, later: PendingCheckpoint) -> Result<u64, LogError> {
        let data = later.wait()?;
        self.record(&Record::Checkpoint { data })
    }
    /// Whether [`RecordSink::record_later`] lets the vCPU run on before the bytes are in.
    fn defers(&self) -> bool {
        false
    }
    /// Pushes out what is buffered (before the recorder may block for a long time); a
    /// checkpoint still being encoded is waited for.
    fn flush(&mut self) -> Result<(), LogError>;
    /// The vCPU was kicked (it ran a quantum without an exit): a sink that holds records back
    /// for company sends those that have waited long enough, so that a guest busy without
    /// exits does not keep them.
    fn tick(&mut self) -> Result<(), LogError> {
        Ok(())
    }
    /// Bytes written so far.
    fn bytes(&self) -> u64;
    /// Whether a replay is following this stream: it needs checkpoints where inputs are
    /// delivered at kicks. A file always has one; a primary only while a backup is attached.
    fn following(&self) -> bool {
        true
    }
}

impl<W: Write + Send> RecordSink for LogWriter<W> {
    fn record(&mut self, record: &Record) -> Result<u64, LogError> {
        self.write(record)?;
        Ok(self.frames - 1)
    }

    fn flush(&mut self) -> Result<(), LogError> {
        LogWriter::flush(self)
    }

    fn bytes(&self) -> u64 {
        LogWriter::bytes(self)
    }
}

/// Errors reading or writing a log.
#[derive(Debug, Error)]
pub enum LogError {
    /// Reading or writing the log's file or stream failed (the system's error).
    #[error("log I/O: {0}")]
    Io(#[from] io::Error),
    /// The first bytes are not the log magic: the file is not an ftvmm event log.
    #[error("not an ftvmm log (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("log format version {found}, this ftvmm reads version {VERSION}")]
    Version {
        /// What the log says.
        found: u16,
    },
    /// The log ends in the middle of a frame.
    #[error("log truncated in frame {frame} (at byte {offset})")]
    Truncated {
        /// Frame number (0 = header).
        frame: u64,
        /// Byte offset of the frame.
        offset: u64,
    },
    /// A frame whose CRC does not match: corrupted.
    #[error("log frame {frame} (at byte {offset}) is corrupt: CRC32C {found:08x}, expected {expected:08x}")]
    Crc {
        /// Frame number.
        frame: u64,
        /// Byte offset of the frame.
        offset: u64,
        /// CRC computed over the payload.
        found: u32,
        /// CRC stored in the frame.
        expected: u32,
    },
    /// A frame larger than any valid one.
    #[error("log frame {frame} (at byte {offset}) claims {len} bytes, more than the {MAX_FRAME} allowed")]
    TooLarge {
        /// Frame number.
        frame: u64,
        /// Byte offset.
        offset: u64,
        /// Claimed length.
        len: u64,
    },
    /// A frame whose payload does not decode.
    #[error("log frame {frame} (at byte {offset}) does not decode: {why}")]
    Decode {
        /// Frame number.
        frame: u64,
        /// Byte offset.
        offset: u64,
        /// postcard's error.
        why: String,
    },
    /// A record or header that does not encode (postcard's error).
    #[error("cannot encode a log record: {0}")]
    Encode(String),
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Encodes one frame around `payload`.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 9);
    write_varint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out
}

/// Encodes a record as a frame.
pub fn encode_record(record: &Record) -> Result<Vec<u8>, LogError> {
    let payload = postcard::to_stdvec(record).map_err(|e| LogError::Encode(e.to_string()))?;
    Ok(encode_frame(&payload))
}

/// The most a log batch may expand to: one frame of the largest size, and then some.
pub const MAX_BATCH: usize = MAX_FRAME as usize + (1 << 20);

/// How much of a stream's past each batch is compressed against: the last 64 KiB of the
/// stream's batch bytes (the frames without their CRCs, as [`BatchWriter`] lays them out), as
/// far back as an LZ4 match reaches.
pub const BATCH_WINDOW: usize = 64 << 10;

/// A run of whole frames of a stream, as the primary sends them to its backup (protocol
/// version 5, docs/PROTOCOL.md "Log batches"): each frame as its length and payload without the
/// CRC (the channel authenticates every byte), LZ4-compressed (block format, uncompressed size
/// first) with the stream's previous [`BATCH_WINDOW`] of such bytes as the dictionary; the
/// first one's sequence number, and whether any of them produces an output (the backup
/// acknowledges such a batch at once: the output waits for it). A [`BatchReader`] opens them,
/// in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Sequence number of the first frame.
    pub first_seq: u64,
    /// How many frames it holds.
    pub frames: u32,
    /// Whether a record in it produced an output the primary holds
    /// ([`RecordSink::record_output`]).
    pub carries_output: bool,
    /// The frames, compressed.
    pub packed: Vec<u8>,
}

/// The last [`BATCH_WINDOW`] bytes of a stream's batches, both ends alike: the dictionary of
/// the next batch.
#[derive(Debug, Default)]
struct Window {
    bytes: Vec<u8>,
}

impl Window {
    fn dict(&self) -> &[u8] {
        &self.bytes[self.bytes.len().saturating_sub(BATCH_WINDOW)..]
    }

    fn extend(&mut self, batch: &[u8]) {
        self.bytes.extend_from_slice(batch);
        // Trimmed now and then, not at every batch: the dictionary is the last BATCH_WINDOW
        // bytes whatever lies before them.
        if self.bytes.len() > 2 * BATCH_WINDOW {
            let cut = self.bytes.len() - BATCH_WINDOW;
            self.bytes.drain(..cut);
        }
    }
}

/// Why a received log batch was refused ([`BatchReader::unpack`]).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BatchError {
    /// The compressed block.
    #[error("{0}")]
    Unpack(#[from] UnpackError),
    /// Not the batch that follows the last one (the dictionary is the stream's past: batches
    /// open only in order).
    #[error("starts at frame {got}, the stream is at frame {expected}")]
    Sequence {
        /// The next frame of the stream.
        expected: u64,
        /// The batch's first frame.
        got: u64,
    },
    /// The frames inside do not add up.
    #[error("frame {frame} of the batch: {why}")]
    Frames {
        /// The frame's index in the batch.
        frame: u32,
        /// What is wrong.
        why: &'static str,
    },
}

/// Opens the batches of one stream on the backup, in order: keeps the stream's window (the
/// dictionary) and gives back the stream's log bytes, magic and header first in the first
/// batch, every frame with its CRC, for a [`LogReader`]. A new stream needs a new reader.
#[derive(Debug, Default)]
pub struct BatchReader {
    window: Window,
    next_seq: u64,
}

impl BatchReader {
    /// A reader for a new stream (its first batch starts at frame 0).
    pub fn new() -> BatchReader {
        BatchReader::default()
    }

    /// The frames `first_seq .. first_seq + frames` of a received batch (`packed` from the
    /// wire; the peer may be hostile: every size is checked before it is used, and nothing
    /// panics). On an error the stream cannot go on (its window is unknown from there).
    pub fn unpack(
        &mut self,
        first_seq: u64,
        frames: u32,
        packed: &[u8],
    ) -> Result<Vec<u8>, BatchError> {
        if first_seq != self.next_seq {
            return Err(BatchError::Sequence {
                expected: self.next_seq,
                got: first_seq,
            });
        }
        let claimed = lz4_size(packed, MAX_BATCH)?;
        let raw = lz4_flex::block::decompress_with_dict(&packed[4..], claimed, self.window.dict())
            .map_err(|e| UnpackError::Lz4(e.to_string()))?;
        if raw.len() != claimed {
            return Err(UnpackError::Lz4(format!(
                "{} bytes uncompressed, {claimed} claimed",
                raw.len()
            ))
            .into());
        }
        // Each frame is a byte at least: a claimed count beyond that fails below, unallocated.
        let most = (frames as usize).min(raw.len());
        let mut out = Vec::with_capacity(raw.len() + 4 * most + MAGIC.len());
        if first_seq == 0 {
            out.extend_from_slice(&MAGIC);
        }
        let mut rest = &raw[..];
        for frame in 0..frames {
            let bad = |why| BatchError::Frames { frame, why };
            let mut len = 0u64;
            let mut n = 0;
            loop {
                let b = *rest.get(n).ok_or_else(|| bad("ends inside its length"))?;
                len |= u64::from(b & 0x7f) << (7 * n);
                n += 1;
                if b & 0x80 == 0 {
                    break;
                }
                if n == 5 {
                    return Err(bad("a length of more than 5 bytes"));
                }
            }
            if len > u64::from(MAX_FRAME) {
                return Err(bad("longer than a frame may be"));
            }
            let payload = rest
                .get(n..n + len as usize)
                .ok_or_else(|| bad("ends inside its payload"))?;
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(payload);
            out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
            rest = &rest[n + len as usize..];
        }
        if !rest.is_empty() {
            return Err(BatchError::Frames {
                frame: frames,
                why: "bytes after the last frame",
            });
        }
        self.window.extend(&raw);
        self.next_seq += u64::from(frames);
        Ok(out)
    }
}

/// Builds the batches of one stream on the primary: numbers each record (the stream header is
/// frame 0), collects frames until [`BatchWriter::take`] and compresses each batch against the
/// stream's past. The one writer of the stream's framing besides [`LogWriter`].
#[derive(Debug, Default)]
pub struct BatchWriter {
    /// The batch's frames as they travel: length and payload, no CRC.
    bytes: Vec<u8>,
    /// Frames in the batch: the last `frames` before `next_seq`.
    frames: u32,
    next_seq: u64,
    carries_output: bool,
    window: Window,
}

impl BatchWriter {
    /// A new stream: its header (frame 0) begins its first batch (the receiver puts the magic
    /// before it), and its window starts empty.
    pub fn start(header: &Header) -> Result<BatchWriter, LogError> {
        let payload = postcard::to_stdvec(header).map_err(|e| LogError::Encode(e.to_string()))?;
        let mut bytes = Vec::with_capacity(payload.len() + 5);
        write_varint(&mut bytes, payload.len() as u64);
        bytes.extend_from_slice(&payload);
        Ok(BatchWriter {
            bytes,
            frames: 1,
            next_seq: 1,
            carries_output: false,
            window: Window::default(),
        })
    }

    /// Appends `record` (`output`: it produced an output the primary holds); returns its
    /// sequence number and its frame's size in the log (CRC included).
    pub fn push(&mut self, record: &Record, output: bool) -> Result<(u64, usize), LogError> {
        let payload = postcard::to_stdvec(record).map_err(|e| LogError::Encode(e.to_string()))?;
        let before = self.bytes.len();
        write_varint(&mut self.bytes, payload.len() as u64);
        self.bytes.extend_from_slice(&payload);
        let frame = self.bytes.len() - before + 4;
        self.frames += 1;
        self.carries_output |= output;
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok((seq, frame))
    }

    /// Bytes waiting in the batch, uncompressed (the frames without their CRCs).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether no frame waits.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The frames so far as a batch to send, if there are any; the next batch starts empty and
    /// is compressed against this one (and what came before, up to [`BATCH_WINDOW`]): send
    /// every batch taken, in order.
    pub fn take(&mut self) -> Option<Batch> {
        if self.frames == 0 {
            return None;
        }
        let packed =
            lz4_flex::block::compress_prepend_size_with_dict(&self.bytes, self.window.dict());
        self.window.extend(&self.bytes);
        let batch = Batch {
            first_seq: self.next_seq - u64::from(self.frames),
            frames: self.frames,
            carries_output: self.carries_output,
            packed,
        };
        self.bytes.clear();
        self.frames = 0;
        self.carries_output = false;
        Some(batch)
    }
}

/// Writes a log.
pub struct LogWriter<W: Write> {
    out: W,
    frames: u64,
    bytes: u64,
}

impl<W: Write> LogWriter<W> {
    /// Writes the magic and the header.
    pub fn new(mut out: W, header: &Header) -> Result<Self, LogError> {
        out.write_all(&MAGIC)?;
        let payload = postcard::to_stdvec(header).map_err(|e| LogError::Encode(e.to_string()))?;
        let frame = encode_frame(&payload);
        out.write_all(&frame)?;
        Ok(LogWriter {
            out,
            frames: 1,
            bytes: 8 + frame.len() as u64,
        })
    }

    /// Appends a record.
    pub fn write(&mut self, record: &Record) -> Result<(), LogError> {
        let frame = encode_record(record)?;
        self.out.write_all(&frame)?;
        self.frames += 1;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    /// Flushes the writer.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush()?;
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Frames written so far (the header included).
    pub fn frames(&self) -> u64 {
        self.frames
    }
}

/// Reads a log, checking every frame.
pub struct LogReader<R: Read> {
    input: R,
    frame: u64,
    offset: u64,
}

impl<R: Read> LogReader<R> {
    /// Reads and checks the magic and the header.
    pub fn new(mut input: R) -> Result<(Self, Header), LogError> {
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => LogError::BadMagic,
            _ => LogError::Io(e),
        })?;
        if magic != MAGIC {
            return Err(LogError::BadMagic);
        }
        let mut reader = LogReader {
            input,
            frame: 0,
            offset: 8,
        };
        let payload = reader.next_payload()?.ok_or(LogError::Truncated {
            frame: 0,
            offset: 8,
        })?;
        let v4 = postcard::from_bytes::<Header>(&payload);
        let header: Header = v4
            .or_else(|e| {
                postcard::from_bytes::<HeaderV3>(&payload)
                    .map(|h| Header {
                        version: h.version,
                        config_hash: h.config_hash,
                        config_summary: h.config_summary,
                        rtc_epoch: h.rtc_epoch,
                        mechanisms: None,
                    })
                    .map_err(|_| e)
            })
            .map_err(|e| LogError::Decode {
                frame: 0,
                offset: 8,
                why: e.to_string(),
            })?;
        if !(1..=VERSION).contains(&header.version) {
            return Err(LogError::Version {
                found: header.version,
            });
        }
        Ok((reader, header))
    }

    /// The next frame's payload; `None` at a clean end of the log.
    fn next_payload(&mut self) -> Result<Option<Vec<u8>>, LogError> {
        let (frame, offset) = (self.frame, self.offset);
        let truncated = || LogError::Truncated { frame, offset };
        let mut len: u64 = 0;
        let mut consumed = 0u64;
        for shift in (0..35).step_by(7) {
            let mut b = [0u8; 1];
            match self.input.read(&mut b) {
                Ok(0) if shift == 0 => return Ok(None),
                Ok(0) => return Err(truncated()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            consumed += 1;
            len |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                break;
            }
            if shift == 28 {
                return Err(LogError::TooLarge { frame, offset, len });
            }
        }
        if len > u64::from(MAX_FRAME) {
            return Err(LogError::TooLarge { frame, offset, len });
        }
        // The claimed length comes from the writer, which may be a peer on the network: it
        // bounds the read, but the buffer grows only as bytes actually arrive, so a frame that
        // claims a gigabyte and ends after ten bytes costs ten bytes.
        let mut payload = Vec::with_capacity((len as usize).min(READ_CHUNK));
        let got = (&mut self.input)
            .take(len)
            .read_to_end(&mut payload)
            .map_err(LogError::Io)?;
        if got as u64 != len {
            return Err(truncated());
        }
        let mut crc = [0u8; 4];
        self.input
            .read_exact(&mut crc)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => truncated(),
                _ => LogError::Io(e),
            })?;
        let expected = u32::from_le_bytes(crc);
        let found = crc32c::crc32c(&payload);
        if found != expected {
            return Err(LogError::Crc {
                frame,
                offset,
                found,
                expected,
            });
        }
        self.frame += 1;
        self.offset += consumed + len + 4;
        Ok(Some(payload))
    }

    /// The next record; `None` at a clean end of the log.
    pub fn read_record(&mut self) -> Result<Option<Record>, LogError> {
        let (frame, offset) = (self.frame, self.offset);
        match self.next_payload()? {
            None => Ok(None),
            Some(p) => postcard::from_bytes(&p)
                .map(Some)
                .map_err(|e| LogError::Decode {
                    frame,
                    offset,
                    why: e.to_string(),
                }),
        }
    }

    /// The number of the next frame (the header is frame 0).
    pub fn frame(&self) -> u64 {
        self.frame
    }

    /// The byte offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// The record of a synchronous exit, relative to the previous exit's RIP and to `time`, the
/// virtual time the log gave out last: a `Debug` exit whose data is that time (the guest's
/// `RDTSC`) is an [`Record::ExitAtTime`], which leaves the data out; any other an
/// [`Record::Exit`].
pub fn exit_record(exit: &SyncExit, prev_rip: u64, time: u64) -> Record {
    let rip_delta = exit.rip.wrapping_sub(prev_rip) as i64;
    if exit.kind == ExitKind::Debug && exit.data == time {
        return Record::ExitAtTime {
            kind: exit.kind as u8,
            addr: exit.addr,
            len: exit.len,
            rip_delta,
        };
    }
    Record::Exit {
        kind: exit.kind as u8,
        addr: exit.addr,
        data: exit.data,
        len: exit.len,
        rip_delta,
    }
}

/// The synchronous exit an `Exit` or `ExitAtTime` record stands for, given the previous exit's
/// RIP and the virtual time the log gave out last: the inverse of [`exit_record`]. `None` for
/// any other record, or an exit of unknown kind.
pub fn decode_exit(record: &Record, prev_rip: u64, time: u64) -> Option<SyncExit> {
    let (kind, addr, data, len, rip_delta) = match *record {
        Record::Exit {
            kind,
            addr,
            data,
            len,
            rip_delta,
        } => (kind, addr, data, len, rip_delta),
        Record::ExitAtTime {
            kind,
            addr,
            len,
            rip_delta,
        } => (kind, addr, time, len, rip_delta),
        _ => return None,
    };
    Some(SyncExit {
        kind: exit_kind(kind)?,
        addr,
        data,
        len,
        rip: prev_rip.wrapping_add(rip_delta as u64),
    })
}

/// Whether a record is a synchronous exit's ([`Record::Exit`] or [`Record::ExitAtTime`]), and
/// its kind's byte.
pub fn exit_kind_of(record: &Record) -> Option<u8> {
    match *record {
        Record::Exit { kind, .. } | Record::ExitAtTime { kind, .. } => Some(kind),
        _ => None,
    }
}

/// The virtual time a log's records give out, followed record by record as a replay follows it
/// (what [`Record::ExitAtTime`] is relative to): for a reader of a log that is not a replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogTime(pub u64);

impl LogTime {
    /// Moves past `record`; returns the time it gave out, if it gives one.
    pub fn follow(&mut self, record: &Record) -> Option<u64> {
        match record {
            Record::Clock { delta }
            | Record::Poll {
                input: InputRec::TimeDelta(delta),
                ..
            }
            | Record::Wake {
                input: InputRec::TimeDelta(delta),
            } => {
                self.0 = self.0.saturating_add(*delta);
                Some(self.0)
            }
            Record::Base { time_ns, .. } | Record::Resync { time_ns, .. } => {
                self.0 = *time_ns;
                Some(self.0)
            }
            _ => None,
        }
    }
}

/// The exit kind for its byte.
pub fn exit_kind(byte: u8) -> Option<ExitKind> {
    Some(match byte {
        1 => ExitKind::PioIn,
        2 => ExitKind::PioOut,
        3 => ExitKind::MmioRead,
        4 => ExitKind::MmioWrite,
        5 => ExitKind::Hlt,
        6 => ExitKind::IrqWindow,
        7 => ExitKind::Debug,
        8 => ExitKind::Emulated,
        _ => return None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header for tests.
    pub(crate) fn header() -> Header {
        Header {
            version: VERSION,
            config_hash: 0x1234,
            config_summary: "test".into(),
            rtc_epoch: 1_795_428_000,
            mechanisms: Some(Mechanisms {
                compat: false,
                irq_window: true,
                breakpoints: true,
            }),
        }
    }

    #[test]
    fn a_version_3_header_reads_without_mechanisms() {
        #[derive(Serialize)]
        struct V3 {
            version: u16,
            config_hash: u64,
            config_summary: String,
            rtc_epoch: i64,
        }
        let old = V3 {
            version: 3,
            config_hash: 0x1234,
            config_summary: "test".into(),
            rtc_epoch: 7,
        };
        let payload = postcard::to_stdvec(&old).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend(encode_frame(&payload));
        let (_, h) = LogReader::new(&bytes[..]).unwrap();
        assert_eq!((h.version, h.config_hash, h.rtc_epoch), (3, 0x1234, 7));
        assert_eq!(h.mechanisms, None);
    }

    fn records() -> Vec<Record> {
        vec![
            Record::Exit {
                kind: 2,
                addr: 0x3f8,
                data: 0x41,
                len: 1,
                rip_delta: -12,
            },
            Record::Clock { delta: 1_000_000 },
            Record::Poll {
                point: PointRec::Exit,
                input: InputRec::Serial(b"abc".to_vec()),
            },
            Record::Interrupt { vector: 0x20 },
            Record::Output {
                kind: 0,
                len: 3,
                crc: 7,
            },
            Record::End {
                exits: 1,
                digest: 99,
            },
        ]
    }

    fn encoded() -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
        for r in records() {
            w.write(&r).unwrap();
        }
        w.out
    }

    /// A stream sent as batches reads back as the same log a file holds, each batch says
    /// whether it carries an output, and the numbers `push` gave are the frames' indexes.
    #[test]
    fn batches_are_the_log_in_pieces() {
        let mut w = BatchWriter::start(&header()).unwrap();
        let mut seqs = Vec::new();
        let mut batches = Vec::new();
        for r in records() {
            // The test's outputs: the serial output record (a recorder says which records are).
            let produces = matches!(r, Record::Output { .. });
            seqs.push(w.push(&r, produces).unwrap().0);
            // Cut after each output, as the primary does, and once more in the middle.
            if produces || seqs.len() == 2 {
                batches.push(w.take().unwrap());
            }
        }
        batches.push(w.take().unwrap());
        assert_eq!(w.take(), None, "nothing is left after a take");
        assert_eq!(seqs, (1..=records().len() as u64).collect::<Vec<_>>());
        let carries: Vec<(u64, u32, bool)> = batches
            .iter()
            .map(|b| (b.first_seq, b.frames, b.carries_output))
            .collect();
        // Frame 0 (the header) and the first two records; then up to the output; then `End`.
        assert_eq!(carries, [(0, 3, false), (3, 3, true), (6, 1, false)]);
        let mut r = BatchReader::new();
        let bytes: Vec<u8> = batches
            .iter()
            .flat_map(|b| r.unpack(b.first_seq, b.frames, &b.packed).unwrap())
            .collect();
        assert_eq!(bytes, encoded());
        assert!(BatchReader::new()
            .unpack(0, 1, &[0xff, 0xff, 0xff, 0x7f, 0])
            .is_err());
    }

    /// An idle guest's tick, `n` times: the same exits with a few fields that move, as a
    /// Linux guest's timer tick logs them.
    fn ticks(n: u64) -> Vec<Record> {
        let mut out = Vec::new();
        for i in 0..n {
            let jitter = (i * 7_919 % 40_000) + 660_000;
            out.extend([
                Record::Exit {
                    kind: 2,
                    addr: 0x20,
                    data: 0x60,
                    len: 1,
                    rip_delta: 5,
                },
                Record::Clock { delta: jitter },
                Record::Exit {
                    kind: 7,
                    addr: 4,
                    data: 17_000_000_000 + i * 9_958_591,
                    len: 2,
                    rip_delta: 1_452_399,
                },
                Record::Exit {
                    kind: 5,
                    addr: 0,
                    data: 0,
                    len: 0,
                    rip_delta: 2_622_167,
                },
                Record::Wake {
                    input: InputRec::TimeDelta(10_000_000 - jitter),
                },
                Record::Interrupt { vector: 0x30 },
            ]);
        }
        out
    }

    /// Batches compressed against the stream's past (well past the window, so that it is
    /// trimmed on both ends) open back to the very log a file holds, and the past pays: later
    /// batches are a fifth smaller at least than compressed alone (an idle Linux guest's: a
    /// third, docs/PROTOCOL.md "Size").
    #[test]
    fn batches_compress_against_the_streams_past() {
        let records = ticks(3_000);
        let mut file = LogWriter::new(Vec::new(), &header()).unwrap();
        let mut w = BatchWriter::start(&header()).unwrap();
        let mut r = BatchReader::new();
        let (mut stream, mut alone, mut packed, mut raw_total) = (Vec::new(), 0, 0, 0);
        for (i, rec) in records.iter().enumerate() {
            file.write(rec).unwrap();
            w.push(rec, false).unwrap();
            if i % 30 == 29 {
                let raw = w.bytes.clone();
                raw_total += raw.len();
                let b = w.take().unwrap();
                stream.extend(r.unpack(b.first_seq, b.frames, &b.packed).unwrap());
                if i > 1_000 {
                    alone += lz4_flex::compress_prepend_size(&raw).len();
                    packed += b.packed.len();
                }
            }
        }
        if let Some(b) = w.take() {
            stream.extend(r.unpack(b.first_seq, b.frames, &b.packed).unwrap());
        }
        assert!(raw_total > 2 * BATCH_WINDOW, "the window is trimmed");
        assert_eq!(stream, file.out, "the same bytes as the log file");
        assert!(
            packed * 5 < alone * 4,
            "against the past {packed} bytes, alone {alone}"
        );
    }

    /// A hostile or broken peer's batch: a clear error, never a panic, never a claimed size
    /// allocated; and a batch out of order (whose dictionary this side does not have) refused.
    #[test]
    fn corrupt_batches_are_refused_without_panicking() {
        let mut w = BatchWriter::start(&header()).unwrap();
        let mut batches = Vec::new();
        for (i, rec) in ticks(40).iter().enumerate() {
            w.push(rec, false).unwrap();
            if i % 60 == 59 {
                batches.push(w.take().unwrap());
            }
        }
        let (first, second) = (&batches[0], &batches[1]);
        // Out of order: the second batch first.
        let e = BatchReader::new()
            .unpack(second.first_seq, second.frames, &second.packed)
            .unwrap_err();
        assert_eq!(
            e,
            BatchError::Sequence {
                expected: 0,
                got: second.first_seq
            }
        );
        assert!(e.to_string().contains("the stream is at frame 0"));
        let opened = |r: &mut BatchReader, b: &Batch, frames: u32, packed: &[u8]| {
            r.unpack(b.first_seq, frames, packed)
        };
        let mut ready = BatchReader::new();
        opened(&mut ready, first, first.frames, &first.packed).unwrap();
        // Every byte of the second batch flipped, every length cut: an error or (LZ4 has no
        // checksum: the channel's authentication is what catches an altered byte) frames that
        // still parse; never a panic.
        for i in 0..second.packed.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = second.packed.clone();
                bad[i] ^= flip;
                let mut r = BatchReader::new();
                opened(&mut r, first, first.frames, &first.packed).unwrap();
                let _ = opened(&mut r, second, second.frames, &bad);
            }
            let mut r = BatchReader::new();
            opened(&mut r, first, first.frames, &first.packed).unwrap();
            assert!(opened(&mut r, second, second.frames, &second.packed[..i]).is_err());
        }
        // A frame count that is not the batch's.
        for frames in [0, second.frames - 1, second.frames + 1, u32::MAX] {
            let mut r = BatchReader::new();
            opened(&mut r, first, first.frames, &first.packed).unwrap();
            let e = opened(&mut r, second, frames, &second.packed).unwrap_err();
            assert!(matches!(e, BatchError::Frames { .. }), "{e}");
        }
        // Sizes claimed beyond the limit or beyond LZ4's expansion: refused before allocating.
        let huge = [0xff, 0xff, 0xff, 0x7f, 0];
        assert!(matches!(
            BatchReader::new().unpack(0, 1, &huge),
            Err(BatchError::Unpack(UnpackError::TooLarge { .. }))
        ));
        let inflated = [0x00, 0x00, 0x10, 0x00, 0x1f];
        assert!(matches!(
            BatchReader::new().unpack(0, 1, &inflated),
            Err(BatchError::Unpack(UnpackError::Impossible { .. }))
        ));
        // A frame that claims more than a frame may hold, or more than the batch holds.
        for inner in [
            vec![0xff, 0xff, 0xff, 0xff, 0x0f],
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            vec![0x05, 1, 2],
        ] {
            let packed = lz4_flex::compress_prepend_size(&inner);
            let e = BatchReader::new().unpack(0, 1, &packed).unwrap_err();
            assert!(matches!(e, BatchError::Frames { frame: 0, .. }), "{e}");
        }
        // Garbage of every short length.
        for len in 0..64u8 {
            let junk: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ len).collect();
            let _ = BatchReader::new().unpack(0, 3, &junk);
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encoded();
        let (mut r, h) = LogReader::new(&bytes[..]).unwrap();
        assert_eq!(h, header());
        let mut got = Vec::new();
        while let Some(rec) = r.read_record().unwrap() {
            got.push(rec);
        }
        assert_eq!(got, records());
    }

    /// The example frame of docs/PROTOCOL.md, byte for byte.
    #[test]
    fn documented_example_frame() {
        let frame = encode_record(&Record::Exit {
            kind: 2,
            addr: 0x3f8,
            data: 0x41,
            len: 1,
            rip_delta: -12,
        })
        .unwrap();
        let payload = [0x00, 0x02, 0xf8, 0x07, 0x41, 0x01, 0x17];
        assert_eq!(frame[0], 7);
        assert_eq!(&frame[1..8], &payload);
        assert_eq!(&frame[8..], &crc32c::crc32c(&payload).to_le_bytes());
        assert_eq!(
            format!("{frame:02x?}"),
            "[07, 00, 02, f8, 07, 41, 01, 17, d7, 3b, be, c4]"
        );
    }

    #[test]
    fn decode_exit_inverts_exit_record() {
        let exit = SyncExit {
            kind: ExitKind::MmioRead,
            addr: 0xd000_0034,
            data: 0x100,
            len: 4,
            rip: 0xffff_ffff_8115_292f,
        };
        let prev = 0xffff_ffff_8115_3000;
        assert_eq!(
            decode_exit(&exit_record(&exit, prev, 7), prev, 7),
            Some(exit)
        );
        assert_eq!(decode_exit(&Record::Clock { delta: 1 }, prev, 7), None);
    }

    /// The guest's `RDTSC` (a `Debug` exit whose data is the virtual time the log gave out
    /// last) is logged without its data and comes back exact; any other exit, or a `Debug`
    /// exit with other data, keeps its data. Read at another time, an `ExitAtTime` gives
    /// another exit: a replay whose clock differs diverges there.
    #[test]
    fn an_exit_at_the_virtual_time_leaves_its_data_out() {
        let time = 20_403_800_411;
        let rdtsc = SyncExit {
            kind: ExitKind::Debug,
            addr: 4,
            data: time,
            len: 2,
            rip: 0xffff_ffff_8116_a363,
        };
        let prev = 0xffff_ffff_8100_79f4;
        let rec = exit_record(&rdtsc, prev, time);
        assert!(
            matches!(
                rec,
                Record::ExitAtTime {
                    kind: 7,
                    addr: 4,
                    len: 2,
                    ..
                }
            ),
            "{rec:?}"
        );
        assert_eq!(decode_exit(&rec, prev, time), Some(rdtsc));
        assert_eq!(exit_kind_of(&rec), Some(7));
        let full = exit_record(&rdtsc, prev, time + 1);
        assert!(matches!(full, Record::Exit { data, .. } if data == time));
        assert_eq!(decode_exit(&full, prev, 0), Some(rdtsc));
        let other = decode_exit(&rec, prev, time + 1).unwrap();
        assert_ne!(other, rdtsc);
        assert_eq!(other.data, time + 1);
        // A PIO write whose data happens to be the time is an `Exit`.
        let pio = SyncExit {
            kind: ExitKind::PioOut,
            addr: 0x80,
            data: 5,
            len: 1,
            rip: prev,
        };
        assert!(matches!(exit_record(&pio, prev, 5), Record::Exit { .. }));
        // Five bytes fewer than the exit with its data (a 35-bit time), as a frame.
        let short = encode_record(&rec).unwrap().len();
        let long = encode_record(&full).unwrap().len();
        assert_eq!(long - short, 5, "{short} against {long}");
        // An unknown kind does not decode.
        let bad = Record::ExitAtTime {
            kind: 99,
            addr: 0,
            len: 0,
            rip_delta: 0,
        };
        assert_eq!(decode_exit(&bad, prev, time), None);
    }

    /// The time an `ExitAtTime` is read at, as a reader that is not a replay follows it.
    #[test]
    fn log_time_follows_the_records_that_give_time_out() {
        let mut t = LogTime::default();
        assert_eq!(t.follow(&Record::Clock { delta: 5 }), Some(5));
        assert_eq!(
            t.follow(&Record::Wake {
                input: InputRec::TimeDelta(10)
            }),
            Some(15)
        );
        assert_eq!(t.follow(&Record::Interrupt { vector: 0x30 }), None);
        assert_eq!(
            t.follow(&Record::Poll {
                point: PointRec::Kick,
                input: InputRec::Serial(vec![1])
            }),
            None
        );
        assert_eq!(
            t.follow(&Record::Base {
                rip: 1,
                time_ns: 100,
                exits: 2
            }),
            Some(100)
        );
        assert_eq!(t.0, 100);
    }

    /// A version 6 log (no `ExitAtTime`) still reads; a log of a version after this build's is
    /// refused in one line that names both versions.
    #[test]
    fn older_versions_read_and_newer_ones_are_refused_clearly() {
        let mut h = header();
        h.version = 6;
        let mut w = LogWriter::new(Vec::new(), &h).unwrap();
        w.write(&records()[0]).unwrap();
        let (mut r, got) = LogReader::new(&w.out[..]).unwrap();
        assert_eq!(got.version, 6);
        assert_eq!(r.read_record().unwrap(), Some(records()[0].clone()));
        h.version = VERSION + 1;
        let w = LogWriter::new(Vec::new(), &h).unwrap();
        let e = LogReader::new(&w.out[..]).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "log format version {}, this ftvmm reads version {VERSION}",
                VERSION + 1
            )
        );
    }

    #[test]
    fn exit_records_are_small() {
        let frame = encode_record(&records()[0]).unwrap();
        assert!(frame.len() <= 12, "{} bytes: {frame:02x?}", frame.len());
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = encoded();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            let result = LogReader::new(&bad[..]).and_then(|(mut r, _)| {
                while r.read_record()?.is_some() {}
                Ok(())
            });
            assert!(result.is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_is_caught_at_every_length() {
        let bytes = encoded();
        let (mut full, _) = LogReader::new(&bytes[..]).unwrap();
        // A log cut exactly between frames reads cleanly: replay notices the missing `End`.
        let mut frame_ends = vec![full.offset];
        while full.read_record().unwrap().is_some() {
            frame_ends.push(full.offset);
        }
        for len in 0..bytes.len() {
            let result = LogReader::new(&bytes[..len]).and_then(|(mut r, _)| {
                while r.read_record()?.is_some() {}
                Ok(())
            });
            let clean_end = frame_ends.contains(&(len as u64));
            assert_eq!(result.is_ok(), clean_end, "truncated to {len} bytes");
        }
    }

    #[test]
    fn huge_length_is_rejected_without_allocating() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            LogReader::new(&bytes[..]),
            Err(LogError::TooLarge { .. })
        ));
    }

    /// A frame claiming a gigabyte but ending after a few bytes is reported as truncated, and
    /// the reader never reserved the claimed size.
    #[test]
    fn claimed_length_does_not_decide_the_allocation() {
        let mut bytes = encoded();
        bytes.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x02]); // 2^29 bytes claimed
        bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let (mut r, _) = LogReader::new(&bytes[..]).unwrap();
        while let Ok(Some(_)) = r.read_record() {}
        let (mut r, _) = LogReader::new(&bytes[..]).unwrap();
        let err = loop {
            match r.read_record() {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert!(matches!(err, Err(LogError::Truncated { .. })), "{err:?}");
    }

    #[test]
    fn garbage_is_not_a_log() {
        assert!(matches!(
            LogReader::new(&b"hello world"[..]),
            Err(LogError::BadMagic)
        ));
        assert!(matches!(LogReader::new(&b""[..]), Err(LogError::BadMagic)));
    }
}
