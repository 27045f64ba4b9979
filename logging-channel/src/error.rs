//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong on the logging channel. Each message says what happened and, where
/// it helps, what to check.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// cannot read the pre-shared key file {path}: {source}
    #[error("cannot read the pre-shared key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the pre-shared key file {path} holds {len} bytes; it needs at least 16 (e.g. `head -c 32 /dev/urandom > FILE`)
    #[error("the pre-shared key file {path} holds {len} bytes; it needs at least {min} (e.g. `head -c 32 /dev/urandom > FILE`)", min = crate::psk::MIN_KEY_FILE_LEN)]
    KeyTooShort { path: PathBuf, len: usize },
    /// the pre-shared key holds {0} bytes; it needs at least 16
    #[error("the pre-shared key holds {0} bytes; it needs at least {min}", min = crate::psk::MIN_KEY_FILE_LEN)]
    KeyBytesTooShort(usize),
    /// cannot start the network runtime: {0}
    #[error("cannot start the network runtime: {0}")]
    Runtime(String),
    /// {what}: {source}
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Noise handshake with {peer} failed: {reason}
    #[error("Noise handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
    /// message of {len} bytes exceeds the limit of 1 GiB (MAX_MSG)
    #[error("message of {len} bytes exceeds the limit of {max} bytes (MAX_MSG)", max = crate::msg::MAX_MSG)]
    MessageTooLarge { len: u64 },
    /// undecodable message of {len} bytes: {reason}
    #[error("undecodable message of {len} bytes: {reason}")]
    BadMessage { len: usize, reason: String },
    /// peer lost: {0}
    #[error("peer lost: {0}")]
    PeerLost(String),
    /// connection closed: {0}
    #[error("connection closed: {0}")]
    Closed(String),
    /// connection broken: {0}
    #[error("connection broken: {0}")]
    Broken(String),
}
