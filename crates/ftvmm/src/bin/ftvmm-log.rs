//! `ftvmm-log LOG`: prints an event log as text, one record a line, with the exit ordinal and
//! absolute RIP and virtual time, so that two logs can be compared with `diff`. The time counts
//! from the log's start (0 at boot; a recording that began from a snapshot counts from there).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use ft_core::log::{decode_exit, LogReader, LogTime, Record};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: ftvmm-log LOG");
        return ExitCode::from(2);
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ftvmm-log: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let (mut reader, header) = match LogReader::new(std::io::BufReader::new(file)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ftvmm-log: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let _ = writeln!(out, "header: {:?}", header);
    let (mut exits, mut rip, mut time) = (0u64, 0u64, LogTime::default());
    loop {
        let record = match reader.read_record() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                let _ = out.flush();
                eprintln!("ftvmm-log: {path}: {e}");
                return ExitCode::from(2);
            }
        };
        time.follow(&record);
        let line = match record {
            Record::Exit {
                kind, rip_delta, ..
            }
            | Record::ExitAtTime {
                kind, rip_delta, ..
            } => {
                let at_time = matches!(record, Record::ExitAtTime { .. });
                let line = match decode_exit(&record, rip, time.0) {
                    Some(exit) if at_time => format!("exit {exits}: {exit} (data: the time)"),
                    Some(exit) => format!("exit {exits}: {exit}"),
                    None => format!("exit {exits}: unknown kind {kind}"),
                };
                rip = rip.wrapping_add(rip_delta as u64);
                exits += 1;
                line
            }
            Record::Clock { .. } => format!("  clock {}", time.0),
            Record::Poll { point, input } => format!("  poll {point:?} {input:?}"),
            Record::Wake { input } => format!("  wake {input:?}"),
            Record::Interrupt { vector } => format!("  interrupt {vector:#x}"),
            Record::Output { kind, len, crc } => {
                format!("  output kind {kind} len {len} crc {crc:08x}")
            }
            Record::Checkpoint { data } => format!("  checkpoint {} bytes", data.len()),
            Record::End { exits, digest } => format!("end exits={exits} digest={digest:016x}"),
            Record::DiskRead { offset, data } => {
                format!("  disk read at {offset} ({} bytes packed)", data.len())
            }
            Record::DiskWrite { offset, len, crc } => {
                format!("  disk write at {offset} len {len} crc {crc:08x}")
            }
            Record::DiskFlush => "  disk flush".to_string(),
            Record::DiskReadLocal { offset, len, crc } => {
                format!("  disk read at {offset} len {len} crc {crc:08x} (mirrored)")
            }
            Record::DiskVerify { id, digests } => {
                format!("disk verify {id}: {} block digests", digests.len() / 16)
            }
            Record::Base {
                rip: r,
                time_ns,
                exits: n,
            } => {
                (rip, exits) = (r, n);
                format!("base rip={r:#x} time={time_ns} exits={n}")
            }
            Record::Resync {
                rip: r,
                time_ns,
                exits: n,
                data,
            } => {
                (rip, exits) = (r, n);
                format!(
                    "resync rip={r:#x} time={time_ns} exits={n} ({} bytes)",
                    data.len()
                )
            }
        };
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    let _ = out.flush();
    ExitCode::SUCCESS
}
