//! The logging channel: the wire between a primary VMM and its backup.
//!
//! One TCP connection per pair, authenticated and encrypted with Noise
//! (`Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`: both sides prove the pre-shared key before anything
//! else moves). On it travel [`Msg`]s: the attach (`Hello`, `Welcome`/`Refused`), the state
//! transfer, the event log in batches and the backup's cumulative acknowledgements, releases,
//! heartbeats. docs/PROTOCOL.md ("The logging channel") defines the bytes.
//!
//! The network runs on a tokio runtime on its own threads (two, named `ftvmm-net`, per process,
//! at a raised priority: [`set_network_nice`]);
//! the VMM's threads only call the synchronous [`Connection`] and [`Listener`] methods, which
//! wait on std primitives and never touch a socket.
//!
//! ```
//! use std::time::Duration;
//! use logging_channel::{connect, ChannelConfig, Listener, Msg, Psk};
//!
//! let cfg = ChannelConfig::new(Psk::from_bytes(b"a shared secret of 16+ bytes").unwrap());
//! let listener = Listener::bind("127.0.0.1:0", cfg.clone()).unwrap();
//! let backup = connect(&listener.local_addr().to_string(), cfg).unwrap();
//! let primary = listener.accept_timeout(Duration::from_secs(5)).unwrap();
//!
//! // The primary sends log frames 0..3; the backup acknowledges them.
//! primary.send_log(0, 3, false, vec![1, 2, 3]).unwrap();
//! let Msg::Log { first_seq, frames, .. } = backup.recv().unwrap() else { panic!() };
//! backup.send(Msg::Ack { received: first_seq + u64::from(frames), executed: 0, vtime_ns: 0 }).unwrap();
//! assert_eq!(primary.wait_ack((0, 0, 0), Duration::from_secs(5)), (3, 0, 0));
//! assert_eq!(primary.stats().log_bytes_outstanding, 0);
//! backup.close("done");
//! ```

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod config;
mod connection;
mod detect;
mod error;
mod listener;
mod msg;
mod noise;
mod psk;
mod runtime;

pub use config::ChannelConfig;
pub use connection::{ChannelStats, Connection};
pub use error::ChannelError;
pub use listener::{connect, Listener};
pub use msg::{decode_messages, encode_message, AckDelta, Msg, MAX_MSG, PROTOCOL_VERSION};
pub use noise::{MAX_NOISE_MSG, NOISE_PATTERN};
pub use psk::{Psk, MIN_KEY_FILE_LEN};
pub use runtime::{network_nice, set_network_nice, DEFAULT_NICE};
