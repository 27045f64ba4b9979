//! Writes the seed corpora of the fuzz targets (`seeds/<target>/`).
//!
//! ```text
//! cargo +nightly run --example make_seeds -- OUT_DIR [--log LOG]... [--snapshot FILE]...
//! ```
//!
//! - `log_reader`: each event log given, cut to its first 16 KiB;
//! - `log_records`: each log's record payloads in that target's mode 1 (`n:u8 bytes`, or
//!   `0xff n:u16le bytes`), up to 16 KiB;
//! - `snapshot_decode`: each snapshot file's body (without its 14-byte header) and the first
//!   four `Checkpoint` records of each log;
//! - `channel_decode`: one message of every kind, and all of them in one stream fed byte by
//!   byte and in chunks of 7.
//!
//! Logs and snapshots come from real runs (they need /dev/kvm), e.g.
//! `ftvmm --role standalone --kernel images/out/test-guests/spin.elf --memory 16M
//! --serial file:/tmp/spin.out --serial-input none --record /tmp/spin.log
//! --snapshot-on-exit /tmp/spin.snap`.

use ft_core::log::{encode_record, LogReader, Record};
use logging_channel::{encode_message, Msg, PROTOCOL_VERSION};
use std::path::{Path, PathBuf};

const MAX_SEED: usize = 16 << 10;
const MAX_CHECKPOINTS: usize = 4;

fn write(dir: &Path, target: &str, name: &str, data: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("creating the seed directory");
    std::fs::write(dir.join(name), data).expect("writing a seed");
}

/// A record's payload: its frame without the length varint and the CRC.
fn payload(record: &Record) -> Vec<u8> {
    let frame = encode_record(record).expect("the seed records encode");
    let varint = frame.iter().position(|b| b & 0x80 == 0).unwrap_or(0) + 1;
    frame[varint..frame.len() - 4].to_vec()
}

fn log_seeds(out: &Path, path: &Path) {
    let data = std::fs::read(path).expect("reading a log");
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    write(out, "log_reader", &name, &data[..data.len().min(MAX_SEED)]);
    let (mut reader, header) = LogReader::new(&data[..]).expect("a valid log");
    assert_eq!(header.version, ft_core::log::VERSION, "{}: a log of another version", path.display());
    let mut packed = vec![1u8];
    let mut checkpoints = 0;
    while let Ok(Some(record)) = reader.read_record() {
        if let Record::Checkpoint { data } = &record {
            if checkpoints < MAX_CHECKPOINTS {
                if let Err(e) = vmm::snapshot::Snapshot::decode(data) {
                    panic!("{}: checkpoint {checkpoints}: {e}", path.display());
                }
                write(out, "snapshot_decode", &format!("{name}.checkpoint{checkpoints}"), data);
                checkpoints += 1;
            }
        }
        let p = payload(&record);
        if packed.len() + p.len() + 3 > MAX_SEED {
            continue;
        }
        if p.len() < 0xff {
            packed.push(p.len() as u8);
        } else if p.len() <= 0xffff {
            packed.push(0xff);
            packed.extend_from_slice(&(p.len() as u16).to_le_bytes());
        } else {
            continue;
        }
        packed.extend_from_slice(&p);
    }
    write(out, "log_records", &format!("{name}.records"), &packed);
}

fn snapshot_seed(out: &Path, path: &Path) {
    let data = std::fs::read(path).expect("reading a snapshot");
    assert!(data.len() > 14 && data[..8] == *b"FTVMMSNP", "not a snapshot file");
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let body = &data[14..];
    if let Err(e) = vmm::snapshot::Snapshot::decode(body) {
        panic!("{}: {e} (a snapshot of another version?)", path.display());
    }
    write(out, "snapshot_decode", &format!("{name}.body"), body);
}

fn channel_seeds(out: &Path) {
    let msgs = [
        ("hello", Msg::Hello {
            version: PROTOCOL_VERSION,
            config_hash: 0x0123_4567_89ab_cdef,
            config_summary: "kernel crc a6c72ee9, 16 MiB RAM".into(),
        }),
        ("welcome", Msg::Welcome { ack_executed: false }),
        ("refused", Msg::Refused { reason: "config differs".into() }),
        ("transfer", Msg::Transfer(vec![7; 300])),
        ("log", Msg::Log {
            first_seq: 5,
            frames: 1,
            carries_output: false,
            // The example frame of docs/PROTOCOL.md.
            bytes: vec![0x07, 0x00, 0x02, 0xf8, 0x07, 0x41, 0x01, 0x17, 0xd7, 0x3b, 0xbe, 0xc4],
        }),
        ("ack", Msg::Ack { received: 8, executed: 6, vtime_ns: 1_000_000 }),
        ("released", Msg::Released { seq: 6 }),
        ("resync", Msg::ResyncRequest { reason: "divergence".into() }),
        ("heartbeat", Msg::Heartbeat),
        ("bye", Msg::Bye { reason: "done".into() }),
    ];
    // The target's first byte is the chunk size minus one.
    let mut all = vec![0u8];
    for (name, msg) in &msgs {
        let encoded = encode_message(msg).expect("encoding a message");
        let mut seed = vec![255u8];
        seed.extend_from_slice(&encoded);
        write(out, "channel_decode", name, &seed);
        all.extend_from_slice(&encoded);
    }
    write(out, "channel_decode", "all-bytewise", &all);
    all[0] = 6;
    write(out, "channel_decode", "all-chunks7", &all);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().expect("usage: make_seeds OUT_DIR [--log LOG]... [--snapshot FILE]..."));
    channel_seeds(&out);
    while let Some(flag) = args.next() {
        let path = PathBuf::from(args.next().expect("a path after the flag"));
        match flag.as_str() {
            "--log" => log_seeds(&out, &path),
            "--snapshot" => snapshot_seed(&out, &path),
            other => panic!("unknown flag {other}"),
        }
    }
}
