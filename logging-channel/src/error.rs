//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong on the logging channel. Each message says what happened and, where
/// it helps, what to check.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// [`crate::Psk::from_file`] could not read the key file (missing, unreadable).
    #[error("cannot read the pre-shared key file {path}: {source}")]
    KeyFile {
        /// The key file as given.
        path: PathBuf,
        /// The read's error.
        source: std::io::Error,
    },
    /// The key file holds fewer than [`crate::MIN_KEY_FILE_LEN`] bytes (an empty or
    /// truncated file would make a guessable key).
    #[error("the pre-shared key file {path} holds {len} bytes; it needs at least {min} (e.g. `head -c 32 /dev/urandom > FILE`)", min = crate::psk::MIN_KEY_FILE_LEN)]
    KeyTooShort {
        /// The key file as given.
        path: PathBuf,
        /// Its size in bytes.
        len: usize,
    },
    /// [`crate::Psk::from_bytes`] got fewer than [`crate::MIN_KEY_FILE_LEN`] bytes of key
    /// material (the number is how many it got).
    #[error("the pre-shared key holds {0} bytes; it needs at least {min}", min = crate::psk::MIN_KEY_FILE_LEN)]
    KeyBytesTooShort(usize),
    /// The process's tokio runtime could not be built on first use, or a task on it ended
    /// without an answer; every later call fails the same way.
    #[error("cannot start the network runtime: {0}")]
    Runtime(String),
    /// A socket operation before the handshake failed: binding the listener, connecting to
    /// the primary (a connect that takes longer than the configured timeout is `TimedOut`).
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the address, e.g. "cannot listen on 0.0.0.0:7000".
        what: String,
        /// The socket's error.
        source: std::io::Error,
    },
    /// The Noise handshake did not complete: another pre-shared key, a peer that is not an
    /// ftvmm logging channel, or no handshake within the configured timeout.
    #[error("Noise handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer's socket address.
        peer: String,
        /// What went wrong, in words.
        reason: String,
    },
    /// A length prefix, or a message to send, above [`crate::MAX_MSG`] bytes. On receive
    /// the stream cannot be resynchronised after it and the connection is dropped.
    #[error("message of {len} bytes exceeds the limit of {max} bytes (MAX_MSG)", max = crate::msg::MAX_MSG)]
    MessageTooLarge {
        /// The message's encoded length in bytes.
        len: u64,
    },
    /// A message body that is not exactly one postcard-encoded [`crate::Msg`] (or one that
    /// cannot be encoded, with `len` 0). Drops the connection, as above.
    #[error("undecodable message of {len} bytes: {reason}")]
    BadMessage {
        /// The body's length in bytes (the length prefix).
        len: usize,
        /// postcard's error, or the count of bytes left after the message.
        reason: String,
    },
    /// The connection died without a `Bye`: the peer was silent past the timeout, the TCP
    /// connection dropped, or a send failed. A backup treats this as a possible primary failure.
    #[error("peer lost: {0}")]
    PeerLost(String),
    /// The connection was closed cleanly, by a `Bye` from either side (the string is its reason).
    #[error("connection closed: {0}")]
    Closed(String),
    /// This side dropped the connection because the stream went bad: a frame failed
    /// authentication, a message did not decode, or encryption failed.
    #[error("connection broken: {0}")]
    Broken(String),
}
