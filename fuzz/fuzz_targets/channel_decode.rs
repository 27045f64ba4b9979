//! The logging channel's plaintext message decoder (`len:u32le postcard(Msg)`, after Noise
//! decryption) on arbitrary bytes, and the same bytes arriving in pieces.
//!
//! The input's first byte is a chunk size (1-256); the rest is the plaintext stream. It is
//! decoded twice: all at once, and as the network task sees it, appended chunk by chunk with a
//! decode after each. Both must agree: the same messages in the same order and the same bytes
//! left over, or both an error. The buffer never grows by decoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use logging_channel::decode_messages;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;

    let mut whole = stream.to_vec();
    let at_once = decode_messages(&mut whole);
    assert!(whole.len() <= stream.len());

    let mut buf = Vec::new();
    let mut got = Vec::new();
    let mut failed = false;
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        let before = buf.len();
        match decode_messages(&mut buf) {
            Ok(msgs) => got.extend(msgs),
            Err(_) => {
                failed = true;
                break;
            }
        }
        assert!(buf.len() <= before);
    }

    match at_once {
        Ok(msgs) => {
            assert!(!failed, "decoding in chunks of {chunk} failed where all at once did not");
            assert_eq!(got, msgs, "chunks of {chunk}");
            assert_eq!(buf, whole, "chunks of {chunk}: different bytes left over");
        }
        Err(_) => assert!(failed, "all at once failed, chunks of {chunk} did not"),
    }
});
