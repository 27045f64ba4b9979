//! The API socket: a Unix socket on which `ftvmm ctl` asks a running VMM for its status.
//!
//! The protocol is one request line (`status`), answered with one JSON document, then the
//! connection closes. docs/OPERATIONS.md lists every field of the status.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What builds the status document.
pub(crate) type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The thread serving the API socket; removes the socket when dropped.
pub(crate) struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves `path`. A socket file left by a VMM that is gone is replaced; one that answers is
    /// in use, and refused.
    pub(crate) fn start(path: &Path, status: StatusFn) -> Result<ApiServer, String> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "API socket {} is in use by another ftvmm",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("cannot create API socket {}: {e}", path.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("API socket {}: {e}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api-socket".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => answer(stream, &status),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            tracing::warn!("API socket: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the API socket thread: {e}"))?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

fn answer(stream: UnixStream, status: &StatusFn) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match line.trim() {
        "status" => status(),
        other => serde_json::json!({ "error": format!("unknown request `{other}`: try `status`") }),
    };
    let mut out = &stream;
    let _ = writeln!(out, "{reply:#}");
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
