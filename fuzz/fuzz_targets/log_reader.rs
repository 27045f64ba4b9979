//! The event log reader on arbitrary bytes: magic, header frame, then every record frame until
//! a clean end or an error. This is what a backup does with the byte stream a peer sends.
#![no_main]

use ft_core::log::LogReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((mut reader, _header)) = LogReader::new(data) {
        while let Ok(Some(_record)) = reader.read_record() {}
    }
});
