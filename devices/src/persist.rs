//! Saving a device's state and putting it back, for snapshots, checkpoints and live state
//! transfer: the one shape every device follows ([`Persist`]).
//!
//! A device is built first, with what is not part of its state (the disk behind virtio-blk),
//! and then given a saved state. The saved states are plain serde structs: their layout is
//! the snapshot format, in files and on the wire.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device whose complete state can be saved and put back.
pub trait Persist {
    /// The saved state.
    type State: Clone + std::fmt::Debug + Serialize + DeserializeOwned;

    /// The complete state.
    fn state(&self) -> Self::State;

    /// Puts the device in the saved state `state`; what is not state (a disk) stays. A value
    /// the device could never hold is either brought into range, with a warning (each device
    /// says which), or refused: then the device is left as it was and the error says why.
    fn restore(&mut self, state: &Self::State) -> Result<(), RestoreError>;
}

/// A saved state that a device refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A saved queue state is invalid.
    #[error("saved state of virtqueue {queue} is invalid: {source}")]
    QueueState {
        /// Queue index.
        queue: usize,
        /// What virtio-queue found.
        source: virtio_queue::Error,
    },
    /// A saved state has a different number of queues than the device.
    #[error("saved state has {saved} virtqueues, the device has {device}")]
    QueueCount {
        /// Queues in the saved state.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
}
