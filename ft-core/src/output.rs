//! Outputs to the world, and the gate that holds them for the output rule.
//!
//! Every output the guest makes (serial bytes, a network frame, a disk write or flush) is
//! produced by one record of the log: the recorder writes that record first and learns its
//! sequence number from the [`crate::log::RecordSink`]. Under fault tolerance the output is then
//! handed to an [`OutputGate`] *with that number*, and the gate lets it leave once the backup
//! holds the log up to it (DESIGN.md section 5). The backup's replay keeps the same outputs under
//! the same numbers ([`crate::replay::KeptWrites`]) until the primary reports them released. One
//! shape, one number, on both sides.

/// An output of the guest, with its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Serial bytes.
    Serial(Vec<u8>),
    /// An Ethernet frame (re-sending one is harmless: the network may duplicate frames).
    Net(Vec<u8>),
    /// A disk write (idempotent: re-issuing it is harmless).
    DiskWrite {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// A disk flush.
    DiskFlush,
}

impl Output {
    /// The bytes it carries (0 for a flush).
    pub fn len(&self) -> u64 {
        match self {
            Output::Serial(b) | Output::Net(b) => b.len() as u64,
            Output::DiskWrite { data, .. } => data.len() as u64,
            Output::DiskFlush => 0,
        }
    }

    /// Whether it carries no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a recorder's outputs go when a rule decides when they may leave: the primary's link to
/// its backup. Without a gate the recorder passes outputs to the boundary it wraps (a recording
/// to a file writes them at once).
pub trait OutputGate: Send + Sync {
    /// Takes `out`, produced by the record the log numbered `seq` (0: the log went nowhere, as
    /// on a primary with no backup), to release once the rule allows.
    fn hold(&self, seq: u64, out: Output);
}
