//! The guest's console on the API socket (`ftvmm ctl --api-socket PATH console`): its serial
//! output as the world sees it, and input typed into its serial line.
//!
//! A [`Console`] sits between a node and its host's serial line: [`Console::output`] wraps the
//! writer the output rule releases serial bytes to (stdout, a file), so a console shows exactly
//! what that writer gets and when (nothing the backup does not hold yet), and keeps the last
//! [`Console::RECENT`] bytes to show a console when it attaches. [`Console::input`] wraps the
//! host's serial input into a channel that consoles send to as well: what they type reaches the
//! guest as serial input from the host does, recorded in the log and replayed by the backup.
//!
//! A backup that follows has no console (its guest's output is not the world's yet); it keeps
//! the recent output the primary released ([`Console::released`]), so that once it goes live a
//! console attached to it starts where the old primary's stopped.
//!
//! On the socket, after the request line `console`: one line of JSON (`{"console":"attached",
//! ...}`, or `{"error":...}` and the socket closes), then the recent output, then the guest's
//! output as it leaves one way and input bytes the other, until either side closes.

use ft_core::live::SerialSource;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The guest's console: recent serial output, attached consoles, and the serial input they send
/// to.
#[derive(Default)]
pub struct Console {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The last output released, at most [`Console::RECENT`] bytes.
    recent: VecDeque<u8>,
    clients: Vec<Client>,
    next_id: u64,
    /// Where consoles' input goes: the live serial line's channel (none on a backup that
    /// follows).
    input: Option<Sender<Vec<u8>>>,
    /// The serial output is this host's: consoles may attach.
    live: bool,
}

struct Client {
    id: u64,
    tx: SyncSender<Vec<u8>>,
    /// Bytes that did not fit the client's queue since it last got any.
    dropped: usize,
}

/// A console just attached: its id, the recent output, and a queue of what follows.
struct Attached {
    id: u64,
    recent: Vec<u8>,
    rx: Receiver<Vec<u8>>,
}

/// Why a console cannot attach.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleRefused {
    /// A backup that follows: the guest's output is not this side's yet.
    #[error(
        "this ftvmm is a backup following its primary: the guest's console is on the live side \
         (attach to the primary's API socket, or to this one once this side has taken over)"
    )]
    NotLive,
    /// Too many consoles at once.
    #[error("{0} consoles are attached already: detach one first")]
    Full(usize),
}

impl Console {
    /// How much recent output a console is shown when it attaches.
    pub const RECENT: usize = 16 << 10;
    /// The most consoles attached at once.
    pub const MAX_CLIENTS: usize = 16;
    /// Output chunks that wait for a console that reads slowly before its output is dropped
    /// (the guest's output never waits for a console).
    const QUEUE: usize = 1024;

    /// A console with no output yet and no serial line.
    pub fn new() -> Arc<Console> {
        Arc::new(Console::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wraps the serial output the output rule releases to: consoles see what `out` gets, when
    /// it gets it. From now on consoles may attach.
    pub fn output(self: &Arc<Self>, out: Box<dyn Write + Send>) -> Box<dyn Write + Send> {
        self.state().live = true;
        Box::new(Tee {
            out,
            console: self.clone(),
        })
    }

    /// Wraps the host's serial input: consoles' input joins it. A script (`Bytes`) comes
    /// first, a reader (stdin) is forwarded as it reads; the guest's line closes once the host's
    /// input has ended and this console is dropped (a live node keeps it to the end).
    pub fn input(&self, host: SerialSource) -> SerialSource {
        let (tx, rx) = mpsc::channel();
        let script = match host {
            SerialSource::None => Vec::new(),
            SerialSource::Bytes(bytes) => bytes,
            SerialSource::Reader(r) => {
                ft_core::live::forward_serial_input(r, tx.clone());
                Vec::new()
            }
            SerialSource::Channel { script, rx: from } => {
                let to = tx.clone();
                let _ = std::thread::Builder::new()
                    .name("serial-in".into())
                    .spawn(move || {
                        while let Ok(bytes) = from.recv() {
                            if to.send(bytes).is_err() {
                                break;
                            }
                        }
                    });
                script
            }
        };
        self.state().input = Some(tx);
        SerialSource::Channel { script, rx }
    }

    /// Serial output the primary released, on a backup that follows: kept as recent output.
    pub fn released(&self, bytes: &[u8]) {
        push_recent(&mut self.state().recent, bytes);
    }

    fn emit(&self, bytes: &[u8]) {
        let mut s = self.state();
        push_recent(&mut s.recent, bytes);
        s.clients.retain_mut(|c| {
            if c.dropped > 0 {
                let note = format!(
                    "\r\n[ftvmm: {} bytes of output not shown: this console read too slowly]\r\n",
                    c.dropped
                );
                match c.tx.try_send(note.into_bytes()) {
                    Ok(()) => c.dropped = 0,
                    Err(TrySendError::Full(_)) => {
                        c.dropped += bytes.len();
                        return true;
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            }
            match c.tx.try_send(bytes.to_vec()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    c.dropped += bytes.len();
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    /// Attaches a console: the recent output, and a queue of what follows (nothing lost or
    /// repeated between the two).
    fn attach(&self) -> Result<Attached, ConsoleRefused> {
        let mut s = self.state();
        if !s.live {
            return Err(ConsoleRefused::NotLive);
        }
        if s.clients.len() >= Self::MAX_CLIENTS {
            return Err(ConsoleRefused::Full(s.clients.len()));
        }
        let (tx, rx) = mpsc::sync_channel(Self::QUEUE);
        let id = s.next_id;
        s.next_id += 1;
        s.clients.push(Client { id, tx, dropped: 0 });
        Ok(Attached {
            id,
            recent: s.recent.iter().copied().collect(),
            rx,
        })
    }

    fn detach(&self, id: u64) {
        self.state().clients.retain(|c| c.id != id);
    }

    /// Bytes a console typed: to the guest's serial line (dropped on a side that is not live).
    fn typed(&self, bytes: &[u8]) {
        if let Some(tx) = &self.state().input {
            let _ = tx.send(bytes.to_vec());
        }
    }

    /// How many consoles are attached.
    pub fn attached(&self) -> usize {
        self.state().clients.len()
    }

    /// Serves one console connection (after its request line) until either side closes it.
    pub fn serve(self: &Arc<Self>, stream: UnixStream) {
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        let mut out = &stream;
        let Attached { id, recent, rx } = match self.attach() {
            Ok(attached) => attached,
            Err(e) => {
                let _ = writeln!(out, "{}", serde_json::json!({ "error": e.to_string() }));
                return;
            }
        };
        let hello = serde_json::json!({ "console": "attached", "recent_bytes": recent.len() });
        if writeln!(out, "{hello}").is_err() || out.write_all(&recent).is_err() {
            self.detach(id);
            return;
        }
        tracing::info!("console attached ({} now)", self.attached());
        let typing = match stream.try_clone() {
            Ok(mut input) => {
                let (done_tx, done) = mpsc::channel::<()>();
                let me = self.clone();
                // The reader ends when the client closes (or this side shuts the socket down).
                let spawned =
                    std::thread::Builder::new()
                        .name("console-in".into())
                        .spawn(move || {
                            let _done = done_tx;
                            let mut buf = [0u8; 1024];
                            loop {
                                match input.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => me.typed(&buf[..n]),
                                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                                    Err(_) => break,
                                }
                            }
                        });
                spawned.ok().map(|t| (t, done))
            }
            Err(_) => None,
        };
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(bytes) => {
                    if out.write_all(&bytes).is_err() {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if let Some((_, done)) = &typing {
                if matches!(done.try_recv(), Err(mpsc::TryRecvError::Disconnected)) {
                    break;
                }
            }
        }
        self.detach(id);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        if let Some((t, _)) = typing {
            let _ = t.join();
        }
        tracing::info!("console detached ({} left)", self.attached());
    }
}

fn push_recent(recent: &mut VecDeque<u8>, bytes: &[u8]) {
    let bytes = &bytes[bytes.len().saturating_sub(Console::RECENT)..];
    let over = (recent.len() + bytes.len()).saturating_sub(Console::RECENT);
    recent.drain(..over);
    recent.extend(bytes);
}

/// The serial output writer with consoles beside it.
struct Tee {
    out: Box<dyn Write + Send>,
    console: Arc<Console>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write_all(buf)?;
        self.console.emit(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_sees_recent_output_then_what_follows_and_types_into_the_line() {
        let console = Console::new();
        console.released(b"before the takeover\n");
        assert!(matches!(console.attach(), Err(ConsoleRefused::NotLive)));
        let mut out = console.output(Box::new(io::sink()));
        let SerialSource::Channel { script, rx } = console.input(SerialSource::Bytes(b"s".into()))
        else {
            panic!("not a channel");
        };
        assert_eq!(script, b"s");
        out.write_all(b"ready\n").unwrap();
        let Attached {
            id,
            recent,
            rx: queue,
        } = console.attach().unwrap();
        assert_eq!(recent, b"before the takeover\nready\n");
        out.write_all(b"more").unwrap();
        assert_eq!(queue.try_recv().unwrap(), b"more");
        console.typed(b"ls\r");
        assert_eq!(rx.try_recv().unwrap(), b"ls\r");
        console.detach(id);
        assert_eq!(console.attached(), 0);
    }

    #[test]
    fn recent_output_keeps_the_last_bytes_only() {
        let mut recent = VecDeque::new();
        push_recent(&mut recent, &vec![b'a'; Console::RECENT - 1]);
        push_recent(&mut recent, b"bc");
        assert_eq!(recent.len(), Console::RECENT);
        assert_eq!(recent.front(), Some(&b'a'));
        assert_eq!(recent.back(), Some(&b'c'));
        push_recent(&mut recent, &vec![b'z'; Console::RECENT + 5]);
        assert!(recent.iter().all(|&b| b == b'z'));
        assert_eq!(recent.len(), Console::RECENT);
    }
}
