//! What the user chooses for a channel (kept apart from the connection's runtime state).

use std::time::Duration;

use crate::Psk;

/// Settings of one channel; both sides should use the same `heartbeat` and `timeout`.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Both sides must hold the same key, or the handshake fails.
    pub psk: Psk,
    /// Bytes of log batches the primary may have sent but not seen acknowledged as received;
    /// [`Connection::send_log`](crate::Connection::send_log) blocks beyond it. Default 16 MiB.
    pub log_buffer: usize,
    /// The network task sends a heartbeat whenever nothing else went out for this long.
    /// Default 50 ms.
    pub heartbeat: Duration,
    /// Nothing at all received from the peer for this long means it is lost, even while its
    /// host still acknowledges the TCP data (its process stopped, hung or starved); also bounds
    /// the handshake, and the TCP connect when longer than 5 s (listener.rs). Default 2 s.
    pub timeout: Duration,
    /// Data this side sent that the peer's kernel has not acknowledged for this long (no ACK
    /// at all meanwhile) means its host is down or the link is cut: lost at once, whatever
    /// `timeout` says. Raised to 40 ms + 3 round trips on a slow link. Default 80 ms.
    pub unacked_timeout: Duration,
}

impl ChannelConfig {
    /// The defaults: 16 MiB of log in flight, heartbeats every 50 ms, peer lost after 2 s of
    /// silence or 80 ms of data its host does not acknowledge.
    pub fn new(psk: Psk) -> ChannelConfig {
        ChannelConfig {
            psk,
            log_buffer: 16 << 20,
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_secs(2),
            unacked_timeout: Duration::from_millis(80),
        }
    }
}
