//! Setting up connections: the primary's [`Listener`] and the backup's [`connect`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::{noise, runtime, ChannelConfig, ChannelError, Connection};

/// The primary's side: accepts backups in the background and hands out those that completed the
/// handshake. Dropping it stops accepting; connections already handed out live on.
pub struct Listener {
    local: SocketAddr,
    ready: Mutex<std_mpsc::Receiver<Connection>>,
    refused: Arc<AtomicU64>,
    accept_task: JoinHandle<()>,
}

impl Listener {
    /// Listens on `addr` (e.g. "0.0.0.0:7000", or port 0 for any) and starts accepting.
    pub fn bind(addr: &str, cfg: ChannelConfig) -> Result<Listener, ChannelError> {
        let rt = runtime::handle()?;
        let io = |source| ChannelError::Io {
            what: format!("cannot listen on {addr}"),
            source,
        };
        let std_listener = std::net::TcpListener::bind(addr).map_err(io)?;
        std_listener.set_nonblocking(true).map_err(io)?;
        let local = std_listener.local_addr().map_err(io)?;
        let listener = {
            let _in_runtime = rt.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(io)?
        };
        let (tx, ready) = std_mpsc::channel();
        let refused = Arc::new(AtomicU64::new(0));
        let accept_task = rt.spawn(accept_loop(rt.clone(), listener, cfg, tx, refused.clone()));
        Ok(Listener {
            local,
            ready: Mutex::new(ready),
            refused,
            accept_task,
        })
    }

    /// The address the listener is bound to, with the actual port when `bind` was given port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next connection that completed the handshake, if one is waiting. A peer that fails
    /// the handshake (another key, garbage, silence past the timeout) is dropped, logged with
    /// `tracing::warn` and counted in [`Listener::refused`].
    pub fn try_accept(&self) -> Option<Connection> {
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_recv()
            .ok()
    }

    /// As [`Listener::try_accept`], waiting up to `d` for one.
    pub fn accept_timeout(&self, d: Duration) -> Option<Connection> {
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv_timeout(d)
            .ok()
    }

    /// How many peers failed the handshake so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local", &self.local)
            .field("refused", &self.refused())
            .finish()
    }
}

async fn accept_loop(
    rt: tokio::runtime::Handle,
    listener: tokio::net::TcpListener,
    cfg: ChannelConfig,
    ready: std_mpsc::Sender<Connection>,
    refused: Arc<AtomicU64>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!("logging channel: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (rt2, cfg, ready, refused) = (rt.clone(), cfg.clone(), ready.clone(), refused.clone());
        rt.spawn(async move {
            match handshake(&rt2, stream, peer, &cfg, false).await {
                Ok(conn) => {
                    // The listener is gone: the connection is dropped (and says Bye).
                    let _ = ready.send(conn);
                }
                Err(e) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "logging channel: refused a connection from {peer}: {e}");
                }
            }
        });
    }
}

/// Runs the handshake within the configured timeout and starts the connection.
async fn handshake(
    rt: &tokio::runtime::Handle,
    mut stream: TcpStream,
    peer: SocketAddr,
    cfg: &ChannelConfig,
    initiator: bool,
) -> Result<Connection, ChannelError> {
    // Small messages (acks, heartbeats) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let noise = async {
        if initiator {
            noise::initiate(&mut stream, &cfg.psk, peer).await
        } else {
            noise::respond(&mut stream, &cfg.psk, peer).await
        }
    };
    let transport = tokio::time::timeout(cfg.timeout, noise)
        .await
        .map_err(|_| ChannelError::Handshake {
            peer: peer.to_string(),
            reason: format!(
                "no handshake within {:.1} s (is the peer an ftvmm logging channel?)",
                cfg.timeout.as_secs_f64()
            ),
        })??;
    Ok(Connection::start(rt, stream, transport, cfg, peer))
}

/// The backup's side: connects to the primary at `addr` and runs the handshake. A primary with
/// another key makes this fail with a message that says so.
pub fn connect(addr: &str, cfg: ChannelConfig) -> Result<Connection, ChannelError> {
    let rt = runtime::handle()?;
    let (tx, rx) = std_mpsc::channel();
    let addr = addr.to_owned();
    rt.spawn({
        let rt = rt.clone();
        async move {
            let _ = tx.send(connect_async(&rt, &addr, &cfg).await);
        }
    });
    rx.recv()
        .unwrap_or_else(|_| Err(ChannelError::Runtime("the connecting task ended".into())))
}

/// How long a backup's connection to its primary may take to open.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn connect_async(
    rt: &tokio::runtime::Handle,
    addr: &str,
    cfg: &ChannelConfig,
) -> Result<Connection, ChannelError> {
    let io = |source| ChannelError::Io {
        what: format!("cannot connect to the primary at {addr}"),
        source,
    };
    // Not the peer timeout: that decides how soon a silent peer is lost (hundreds of
    // milliseconds), while a connection may need an ARP resolution on a link that just came
    // back, or a SYN sent again (the kernel waits 1 s before it does).
    let limit = cfg.timeout.max(CONNECT_TIMEOUT);
    let stream = tokio::time::timeout(limit, TcpStream::connect(addr))
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io)?;
    let peer = stream.peer_addr().map_err(io)?;
    handshake(rt, stream, peer, cfg, true).await
}
