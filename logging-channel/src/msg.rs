//! Application messages and their framing inside the decrypted byte stream:
//! `len: varint` (LEB128, at most 5 bytes) then `postcard(Msg)`.

use serde::{Deserialize, Serialize};

use crate::ChannelError;

/// The protocol version a backup announces in [`Msg::Hello`]. 6: a message's length is a varint
/// (5 had a u32), an acknowledgement travels as [`Msg::AckDelta`], a heartbeat is an empty Noise
/// message, and the log's records are version 7 (`ExitAtTime`). 5: a `Log` batch's frames
/// travel without their CRCs and are compressed against the stream's earlier batches (4
/// compressed each batch alone, CRCs included): docs/PROTOCOL.md.
pub const PROTOCOL_VERSION: u16 = 6;

/// The largest encoded message (its postcard bytes, without the 4-byte length).
pub const MAX_MSG: usize = 1 << 30;

/// One application message. The variant order is the wire format (postcard variant index):
/// append new variants at the end, never reorder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Backup -> primary, the first message after the handshake.
    Hello {
        /// The backup's [`PROTOCOL_VERSION`]; the primary refuses any other.
        version: u16,
        /// Hash of the configuration that must match for replay to work (guest image, RAM, CPUID
        /// profile...); the primary compares it with its own.
        config_hash: u64,
        /// That configuration in words, for the refusal message when the hashes differ.
        config_summary: String,
    },
    /// Primary -> backup: the attach goes ahead.
    Welcome {
        /// The primary releases an output only once the backup has replayed its record
        /// (`--ack executed`), not once it holds it: what a diverged backup may go live
        /// without contradicting depends on it.
        ack_executed: bool,
    },
    /// Either way, followed by a close: the primary turns down an attach (another version,
    /// other machine flags, a backup already attached), or a backup declines a `Handover`.
    Refused {
        /// Why, in words, for the other side's log.
        reason: String,
    },
    /// Opaque state-transfer payload (RAM pages, final state), primary -> backup.
    Transfer(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Event-log frames `first_seq .. first_seq + frames`, primary -> backup.
    Log {
        /// Sequence number of the first frame in `bytes`.
        first_seq: u64,
        /// How many whole frames `bytes` holds.
        frames: u32,
        /// Whether a frame in it produces an output the primary holds until this batch is
        /// acknowledged: the backup acknowledges such a batch as soon as it has it.
        carries_output: bool,
        /// The frames, opaque to the channel (ft-pair sends them LZ4-compressed against the
        /// stream's earlier batches, `ft_core::log::BatchWriter`); their size counts against
        /// the flow-control buffer until acknowledged.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Backup -> primary, cumulative: the backup holds every frame with seq < `received`, has
    /// replayed every frame with seq < `executed`, and its guest's virtual time is `vtime_ns`.
    /// What [`crate::Connection::send`] takes and what the primary's [`crate::Connection::acked`]
    /// gives; since version 6 it travels as [`Msg::AckDelta`] (this form still reads).
    Ack {
        /// One past the highest frame seq the backup holds.
        received: u64,
        /// One past the highest frame seq the backup has replayed.
        executed: u64,
        /// The backup guest's virtual time, in nanoseconds.
        vtime_ns: u64,
    },
    /// Primary -> backup: outputs produced by frames < `seq` have left the primary.
    Released {
        /// Frames with a lower seq have had their outputs released.
        seq: u64,
    },
    /// Backup -> primary: the backup cannot go on from the stream and asks for a new transfer.
    ResyncRequest {
        /// What went wrong in the replay, e.g. a divergence, for the primary's log.
        reason: String,
    },
    /// Both ways, sent by the network task when nothing else went out for the heartbeat period.
    Heartbeat,
    /// Clean close, either way; the receiver ends the connection as `Closed`, not `PeerLost`.
    Bye {
        /// Why the sender closes, for the other side's log.
        reason: String,
    },
    /// Primary -> backup, a planned switchover: the primary has paused its guest, every log
    /// frame and every `Released` marker went out before this, and its guest will never run
    /// again unless this backup declines. The backup replays to the end of the stream, takes
    /// the lock from `epoch` and goes live there.
    Handover {
        /// The lock epoch the primary holds; the backup claims the lock from it.
        epoch: u64,
    },
    /// Backup -> primary: the backup went live after a [`Msg::Handover`] and accepts backups at
    /// `listen` (a port on an unspecified address means the address the primary reached it at).
    HandedOver {
        /// The new primary's listen address for backups, as `host:port`.
        listen: String,
    },
    /// Version 3, backup -> primary: the outcome of a verification of a mirrored disk (the
    /// log's `DiskVerify` record `id`): whether this side's copy was equal to the primary's at
    /// that record, sent when the replay reached it (before a mismatch diverges).
    DiskVerified {
        /// The verification's number, as the record carried it.
        id: u64,
        /// The record's sequence number.
        position: u64,
        /// The copies were equal.
        matched: bool,
        /// Blocks that differ.
        differing: u64,
        /// The first of them (at most 16).
        first_differing: Vec<u64>,
        /// Blocks the backup hashed for it.
        hashed_blocks: u64,
        /// How long the backup took, us.
        micros: u64,
    },
    /// Version 6, backup -> primary: an [`Msg::Ack`] as it travels, relative to the previous
    /// acknowledgement on the connection ((0, 0, 0) before the first), every difference
    /// wrapping and zigzagged: a few bytes where the absolute values take up to 9 each. The
    /// receiver turns it back into the `Ack` ([`AckDelta::apply`]); senders send `Ack`.
    AckDelta {
        /// `received` minus the previous acknowledgement's.
        received: i64,
        /// `received` minus `executed` (what the backup holds and has not replayed).
        pending: i64,
        /// `vtime_ns` minus the previous acknowledgement's.
        vtime_ns: i64,
    },
}

/// The relative form of acknowledgements on one connection, either end: the last one sent or
/// received, and the conversions ([`Msg::AckDelta`]). Exact for any values (wrapping).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckDelta {
    /// The last acknowledgement: (received, executed, vtime_ns).
    pub last: (u64, u64, u64),
}

impl AckDelta {
    /// `ack` relative to the last one, which it becomes.
    pub fn encode(&mut self, ack: (u64, u64, u64)) -> Msg {
        let (received, executed, vtime_ns) = ack;
        let msg = Msg::AckDelta {
            received: received.wrapping_sub(self.last.0) as i64,
            pending: received.wrapping_sub(executed) as i64,
            vtime_ns: vtime_ns.wrapping_sub(self.last.2) as i64,
        };
        self.last = ack;
        msg
    }

    /// The acknowledgement an `AckDelta` received stands for, which becomes the last one.
    pub fn apply(&mut self, received: i64, pending: i64, vtime_ns: i64) -> (u64, u64, u64) {
        let r = self.last.0.wrapping_add(received as u64);
        let ack = (
            r,
            r.wrapping_sub(pending as u64),
            self.last.2.wrapping_add(vtime_ns as u64),
        );
        self.last = ack;
        ack
    }
}

/// The most bytes a message's length takes (a varint of at most [`MAX_MSG`]).
const MAX_LEN_BYTES: usize = 5;

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
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

/// The length at the front of `buf`: `Ok(None)` while it is incomplete, else the length and the
/// bytes it took. More than [`MAX_LEN_BYTES`], or a length above [`MAX_MSG`], is an error.
fn take_len(buf: &[u8]) -> Result<Option<(usize, usize)>, ChannelError> {
    let mut len = 0u64;
    for (i, &b) in buf.iter().enumerate().take(MAX_LEN_BYTES) {
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > MAX_MSG as u64 {
                return Err(ChannelError::MessageTooLarge { len });
            }
            return Ok(Some((len as usize, i + 1)));
        }
    }
    if buf.len() >= MAX_LEN_BYTES {
        return Err(ChannelError::BadMessage {
            len: 0,
            reason: format!("a length of more than {MAX_LEN_BYTES} bytes"),
        });
    }
    Ok(None)
}

/// `msg` framed for the plaintext stream: `len: varint` then `postcard(msg)`.
pub fn encode_message(msg: &Msg) -> Result<Vec<u8>, ChannelError> {
    let body = postcard::to_stdvec(msg).map_err(|e| ChannelError::BadMessage {
        len: 0,
        reason: format!("cannot encode: {e}"),
    })?;
    if body.len() > MAX_MSG {
        return Err(ChannelError::MessageTooLarge {
            len: body.len() as u64,
        });
    }
    let mut framed = Vec::with_capacity(body.len() + MAX_LEN_BYTES);
    push_varint(&mut framed, body.len() as u64);
    framed.extend_from_slice(&body);
    Ok(framed)
}

/// Takes every complete message from the front of `buf` (decrypted plaintext in arrival order)
/// and leaves an incomplete one there for later.
///
/// Never panics and never allocates what a length prefix claims: `buf` only holds what actually
/// arrived. A length above [`MAX_MSG`] or a body that is not exactly one `Msg` is an error; the
/// stream cannot be resynchronised after one, so the caller drops the connection.
pub fn decode_messages(buf: &mut Vec<u8>) -> Result<Vec<Msg>, ChannelError> {
    let mut msgs = Vec::new();
    let mut pos = 0usize;
    let result = loop {
        let rest = &buf[pos..];
        let (len, took) = match take_len(rest) {
            Ok(Some(l)) => l,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let Some(body) = rest[took..].get(..len) else {
            break Ok(());
        };
        match postcard::take_from_bytes::<Msg>(body) {
            Ok((msg, [])) => msgs.push(msg),
            Ok((_, trailing)) => {
                break Err(ChannelError::BadMessage {
                    len,
                    reason: format!("{} bytes left after the message", trailing.len()),
                })
            }
            Err(e) => {
                break Err(ChannelError::BadMessage {
                    len,
                    reason: e.to_string(),
                })
            }
        }
        pos += took + len;
    };
    buf.drain(..pos);
    result.map(|()| msgs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Msg> {
        vec![
            Msg::Hello {
                version: PROTOCOL_VERSION,
                config_hash: 0x0123_4567_89ab_cdef,
                config_summary: "ram=64M guest=spin".into(),
            },
            Msg::Welcome { ack_executed: true },
            Msg::Refused {
                reason: "config differs".into(),
            },
            Msg::Transfer(vec![7; 300]),
            Msg::Log {
                first_seq: 5,
                frames: 3,
                carries_output: true,
                bytes: vec![1, 2, 3],
            },
            Msg::Ack {
                received: 8,
                executed: 6,
                vtime_ns: 1_000_000,
            },
            Msg::Released { seq: 6 },
            Msg::ResyncRequest {
                reason: "divergence".into(),
            },
            Msg::Heartbeat,
            Msg::Bye {
                reason: "done".into(),
            },
            Msg::Handover { epoch: 3 },
            Msg::HandedOver {
                listen: "10.0.0.2:7000".into(),
            },
            Msg::DiskVerified {
                id: 1,
                position: 900,
                matched: false,
                differing: 1,
                first_differing: vec![4000],
                hashed_blocks: 3,
                micros: 1200,
            },
            Msg::AckDelta {
                received: 48,
                pending: 1,
                vtime_ns: -3,
            },
        ]
    }

    /// Acknowledgements relative to the last one come back exact, whatever the values (going
    /// back, wrapping, the extremes), and an idle pair's take a few bytes.
    #[test]
    fn ack_deltas_round_trip() {
        let acks = [
            (0, 0, 0),
            (48, 47, 20_400_000_000),
            (96, 95, 20_450_000_000),
            (96, 96, 20_450_000_001),
            (u64::MAX, 0, u64::MAX),
            (3, 7, 1),
            (0, u64::MAX, 0),
            (1 << 40, (1 << 40) - 9, 1 << 62),
        ];
        let (mut tx, mut rx) = (AckDelta::default(), AckDelta::default());
        for ack in acks {
            let msg = tx.encode(ack);
            let bytes = encode_message(&msg).unwrap();
            let mut buf = bytes.clone();
            let got = decode_messages(&mut buf).unwrap();
            let [Msg::AckDelta {
                received,
                pending,
                vtime_ns,
            }] = got[..]
            else {
                panic!("{got:?}")
            };
            assert_eq!(rx.apply(received, pending, vtime_ns), ack);
        }
        // An idle pair's: 48 frames and 50 ms on, one frame not yet replayed.
        let mut tx = AckDelta {
            last: (9_000_000, 8_999_999, 3_600_000_000_000),
        };
        let bytes = encode_message(&tx.encode((9_000_048, 9_000_047, 3_600_050_000_000))).unwrap();
        let absolute = encode_message(&Msg::Ack {
            received: 9_000_048,
            executed: 9_000_047,
            vtime_ns: 3_600_050_000_000,
        })
        .unwrap();
        assert_eq!((bytes.len(), absolute.len()), (8, 16));
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = all_kinds();
        let stream: Vec<u8> = msgs
            .iter()
            .flat_map(|m| encode_message(m).unwrap())
            .collect();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in stream {
            buf.push(b);
            got.extend(decode_messages(&mut buf).unwrap());
        }
        assert!(buf.is_empty());
        assert_eq!(got, msgs);
    }

    /// The bytes docs/PROTOCOL.md shows.
    #[test]
    fn documented_encodings() {
        let ack = Msg::Ack {
            received: 300,
            executed: 2,
            vtime_ns: 1,
        };
        assert_eq!(
            encode_message(&ack).unwrap(),
            [0x05, 0x05, 0xac, 0x02, 0x02, 0x01]
        );
        let delta = Msg::AckDelta {
            received: 48,
            pending: 1,
            vtime_ns: -1,
        };
        assert_eq!(
            encode_message(&delta).unwrap(),
            [0x04, 0x0d, 0x60, 0x02, 0x01]
        );
        let log = Msg::Log {
            first_seq: 1,
            frames: 2,
            carries_output: true,
            bytes: vec![0xaa, 0xbb],
        };
        assert_eq!(
            encode_message(&log).unwrap(),
            [0x07, 0x04, 0x01, 0x02, 0x01, 0x02, 0xaa, 0xbb]
        );
        assert_eq!(encode_message(&Msg::Heartbeat).unwrap(), [1, 8]);
        // 300 bytes of transfer: a two-byte length.
        let big = encode_message(&Msg::Transfer(vec![0; 297])).unwrap();
        assert_eq!(&big[..4], [0xac, 0x02, 0x03, 0xa9]);
    }

    fn varint(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        push_varint(&mut out, v);
        out
    }

    #[test]
    fn huge_claimed_length_does_not_allocate() {
        let mut buf = Vec::with_capacity(15);
        buf.extend_from_slice(&varint(1 << 30));
        buf.extend_from_slice(&[3; 10]);
        assert!(decode_messages(&mut buf).unwrap().is_empty());
        assert_eq!(buf.len(), 15);
        assert!(buf.capacity() < 1024, "capacity {}", buf.capacity());

        let mut over = varint((1 << 30) + 1);
        assert!(matches!(
            decode_messages(&mut over),
            Err(ChannelError::MessageTooLarge { .. })
        ));
        let mut max = varint(u64::from(u32::MAX));
        assert!(decode_messages(&mut max).is_err());
        // A length of six bytes, and one of five whose last still says more follows.
        for mut long in [vec![0x80; 6], vec![0xff; 5]] {
            let e = decode_messages(&mut long).unwrap_err();
            assert!(e.to_string().contains("more than 5 bytes"), "{e}");
        }
        // Incomplete: waited for.
        for mut part in [vec![0x80], vec![0xff, 0xff, 0xff, 0xff]] {
            assert!(decode_messages(&mut part).unwrap().is_empty());
        }
    }

    /// A Vec<u8> inside a message claiming more bytes than the message holds.
    #[test]
    fn inner_length_larger_than_the_message() {
        // Transfer (index 3), then a varint length of 2^32 - 1, then 3 bytes.
        let body = [0x03, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3];
        let mut buf = varint(body.len() as u64);
        buf.extend_from_slice(&body);
        assert!(matches!(
            decode_messages(&mut buf),
            Err(ChannelError::BadMessage { .. })
        ));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_errors() {
        let mut zero = vec![0];
        assert!(decode_messages(&mut zero).is_err());
        let mut unknown_variant = vec![1, 99];
        assert!(decode_messages(&mut unknown_variant).is_err());
        let mut trailing = vec![2, 8, 8];
        assert!(decode_messages(&mut trailing).is_err());
        // A good message before the bad one is consumed and the error still reported.
        let mut mixed = encode_message(&Msg::Welcome {
            ack_executed: false,
        })
        .unwrap();
        mixed.extend_from_slice(&[1, 99]);
        assert!(decode_messages(&mut mixed).is_err());
    }

    /// A small xorshift generator, so the fuzz-like tests need no dependency and repeat exactly.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid: Vec<u8> = all_kinds()
            .iter()
            .flat_map(|m| encode_message(m).unwrap())
            .collect();
        for round in 0..20_000 {
            let mut input = if round % 2 == 0 {
                let n = (rng.next() % 64) as usize;
                (0..n).map(|_| rng.next() as u8).collect::<Vec<u8>>()
            } else {
                let mut v = valid.clone();
                for _ in 0..1 + rng.next() % 4 {
                    let i = (rng.next() as usize) % v.len();
                    v[i] = rng.next() as u8;
                }
                v.truncate((rng.next() as usize) % (v.len() + 1));
                v
            };
            // Small length prefixes so bodies are actually decoded, not just waited for.
            if round % 3 == 0 && !input.is_empty() {
                input[0] = (rng.next() % 16) as u8;
            }
            let before = input.len();
            match decode_messages(&mut input) {
                Ok(_) | Err(_) => assert!(input.len() <= before),
            }
        }
    }
}
