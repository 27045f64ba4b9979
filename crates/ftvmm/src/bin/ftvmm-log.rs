//! `ftvmm-log LOG`: prints an event log as text, one record a line, with the exit ordinal and
//! absolute RIP and virtual time, so that two logs can be compared with `diff`.

use ft_core::log::{exit_kind, LogReader, Record};
use ft_core::SyncExit;
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
    let (mut exits, mut rip, mut time) = (0u64, 0u64, 0u64);
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
        let line = match record {
            Record::Exit {
                kind,
                addr,
                data,
                len,
                rip_delta,
            } => {
                rip = rip.wrapping_add(rip_delta as u64);
                exits += 1;
                match exit_kind(kind) {
                    Some(kind) => format!(
                        "exit {}: {}",
                        exits - 1,
                        SyncExit {
                            kind,
                            addr,
                            data,
                            len,
                            rip
                        }
                    ),
                    None => format!("exit {}: unknown kind {kind}", exits - 1),
                }
            }
            Record::Clock { delta } => {
                time += delta;
                format!("  clock {time}")
            }
            Record::Poll { point, input } => format!("  poll {point:?} {input:?}"),
            Record::Wake { input } => format!("  wake {input:?}"),
            Record::Interrupt { vector } => format!("  interrupt {vector:#x}"),
            Record::Output { kind, len, crc } => {
                format!("  output kind {kind} len {len} crc {crc:08x}")
            }
            Record::Checkpoint { data } => format!("  checkpoint {} bytes", data.len()),
            Record::End { exits, digest } => format!("end exits={exits} digest={digest:016x}"),
        };
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    let _ = out.flush();
    ExitCode::SUCCESS
}
