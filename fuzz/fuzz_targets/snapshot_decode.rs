//! The snapshot decoder on arbitrary bytes: size prefix, LZ4 block, postcard. The same body
//! arrives in a snapshot file (after its header and CRC) and in a log's `Checkpoint` record,
//! which a backup receives from its peer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::Snapshot;

fuzz_target!(|data: &[u8]| {
    let _ = Snapshot::decode(data);
});
