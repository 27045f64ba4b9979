//! The API socket (`ftvmm --api-socket PATH`): a Unix socket on which `ftvmm ctl` asks a running VMM for its status and
//! tells it to stop or to hand its guest over to its backup.
//!
//! The protocol is one request line, answered with one JSON document, then the connection
//! closes. Requests: `status`, `stop`, `switchover stop|backup`, `verify-disk`. An answer with an `"error"`
//! field is a refusal. docs/OPERATIONS.md lists every field of the status. The request
//! `console` is the exception: the connection stays open and carries the guest's serial line
//! ([`crate::console`]).

use crate::api::{refusal, ApiFn, Request};
use crate::console::Console;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Why the API socket or the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The OS refused to spawn a server thread (API or metrics; `name` is the thread's name).
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// The thread's name.
        name: String,
        /// The OS's answer.
        source: std::io::Error,
    },
    /// The API socket path exists and a connection to it succeeds: another VMM is serving it.
    /// (A stale socket file that nobody answers on is replaced instead.)
    #[error("API socket {0} is in use by another ftvmm")]
    InUse(String),
    /// Binding the API socket or the metrics listener, or setting one up, failed; `context` says
    /// which step.
    #[error("{context}: {source}")]
    Socket {
        /// The step that failed.
        context: String,
        /// The OS's answer.
        source: std::io::Error,
    },
}

/// A socket error with what was being done.
pub(crate) fn socket(context: String) -> impl FnOnce(std::io::Error) -> ServeError {
    move |source| ServeError::Socket { context, source }
}

/// A thread that accepts connections from a non-blocking listener (`accept`) and hands each
/// to `serve`, until dropped. The API socket and the metrics endpoint both run on one.
pub(crate) struct AcceptLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptLoop {
    pub(crate) fn spawn<S: 'static>(
        name: &str,
        mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
        serve: impl Fn(S) + Send + 'static,
    ) -> Result<AcceptLoop, ServeError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let label = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    match accept() {
                        Ok(conn) => serve(conn),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            tracing::warn!("{label}: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(|source| ServeError::Thread {
                name: name.to_string(),
                source,
            })?;
        Ok(AcceptLoop {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread serving the API socket; removes the socket when dropped.
pub struct ApiServer {
    path: PathBuf,
    _accept: AcceptLoop,
}

impl ApiServer {
    /// Serves `path`, with the guest's `console` if there is one. A socket file left by a VMM
    /// that is gone is replaced; one that answers is in use, and refused.
    pub fn start(
        path: &Path,
        api: ApiFn,
        console: Option<Arc<Console>>,
    ) -> Result<ApiServer, ServeError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse(path.display().to_string()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(socket(format!(
            "cannot create API socket {}",
            path.display()
        )))?;
        listener
            .set_nonblocking(true)
            .map_err(socket(format!("API socket {}", path.display())))?;
        let accept = AcceptLoop::spawn(
            "api-socket",
            move || listener.accept().map(|(stream, _)| stream),
            move |stream| {
                // A switchover takes a while: status keeps answering meanwhile.
                let api = api.clone();
                let console = console.clone();
                let spawned = std::thread::Builder::new()
                    .name("api-request".into())
                    .spawn(move || answer(stream, &api, console.as_ref()));
                if let Err(e) = spawned {
                    tracing::warn!("API socket: cannot answer: {e}");
                }
            },
        )?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            _accept: accept,
        })
    }
}

/// The longest request line read (a request is a few words).
const MAX_REQUEST: u64 = 256;

fn answer(stream: UnixStream, api: &ApiFn, console: Option<&Arc<Console>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = Vec::new();
    // A byte at a time up to the newline: what follows a `console` request is the console's
    // input, for the console to read.
    let mut byte = [0u8; 1];
    while line.len() < MAX_REQUEST as usize && line.last() != Some(&b'\n') {
        match (&stream).read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let line = String::from_utf8_lossy(&line);
    let reply = match Request::parse(&line) {
        Ok(Request::Console) => match console {
            Some(console) => return console.serve(stream),
            None => refusal("this ftvmm serves no console"),
        },
        Ok(req) => api(req),
        Err(e) => refusal(e),
    };
    let mut out = &stream;
    let _ = writeln!(out, "{reply:#}");
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
