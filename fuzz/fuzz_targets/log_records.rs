//! Structure-aware: the event log reader past its CRCs. A valid magic and header frame come
//! first; then the input is cut into payloads, each wrapped in a frame with the right length
//! and CRC32C, so that the fuzzer spends its time in record decoding (postcard) instead of
//! guessing checksums. The input's first byte picks the mode:
//!
//! - odd: the rest is a list of payloads, each `n:u8 bytes[n]` (`n = 0xff`: `n:u16le bytes[n]`),
//!   each framed with a valid length and CRC (a truncated last one is framed as it is);
//! - even: the rest is appended raw after the header frame (frame lengths, truncation, CRC
//!   mismatches).
//!
//! A `DiskRead` record's data is then unpacked as replay does (`unpack_disk_data`: size
//! prefix, LZ4).
#![no_main]

use ft_core::log::{encode_frame, unpack_disk_data, Header, LogReader, LogWriter, Record, VERSION};
use libfuzzer_sys::fuzz_target;

fn prefix() -> Vec<u8> {
    let header = Header {
        version: VERSION,
        config_hash: 0x1234,
        config_summary: "fuzz".into(),
        rtc_epoch: 1_795_428_000,
        mechanisms: None,
    };
    let mut out = Vec::new();
    LogWriter::new(&mut out, &header).expect("writing to a Vec");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut log = prefix();
    if mode & 1 == 0 {
        log.extend_from_slice(rest);
    } else {
        while let Some((&n, tail)) = rest.split_first() {
            let (n, tail) = if n == 0xff && tail.len() >= 2 {
                (usize::from(u16::from_le_bytes([tail[0], tail[1]])), &tail[2..])
            } else {
                (usize::from(n), tail)
            };
            let (payload, tail) = tail.split_at(n.min(tail.len()));
            log.extend_from_slice(&encode_frame(payload));
            rest = tail;
        }
    }
    let (mut reader, _) = LogReader::new(&log[..]).expect("the prefix is a valid log");
    while let Ok(Some(record)) = reader.read_record() {
        if let Record::DiskRead { data, .. } = record {
            let _ = unpack_disk_data(&data);
        }
    }
});
