//! `ftvmm ctl --api-socket PATH console`: the guest's serial console on this terminal.
//!
//! The request `console` turns the API connection into the guest's serial line
//! (`ft_pair::console`): after one line of JSON, the guest's recent output, then its output as it
//! leaves (under the output rule, as stdout gets it) one way, and what is typed here the other
//! way, into the guest's serial input (recorded and replayed like any input). On a terminal,
//! stdin is put in raw mode (every key goes to the guest, Ctrl-C included) and restored on the
//! way out, whatever the way out is. `Ctrl-]`, or `~.` at the start of a line, detaches; so
//! does the end of the input (a pipe). Without a terminal the same bytes go through unchanged,
//! so a script can drive it.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// The byte of `Ctrl-]`.
const CTRL_BRACKET: u8 = 0x1d;

/// Why a console did not attach.
#[derive(Debug, thiserror::Error)]
enum AttachError {
    #[error("cannot reach {path}: {source} (is an ftvmm running with --api-socket {path}?)")]
    Unreachable { path: String, source: io::Error },
    #[error("{path}: {source} (not an ftvmm API socket?)")]
    Io { path: String, source: io::Error },
    #[error("{0}: the socket closed without answering (not an ftvmm API socket, or one without a console?)")]
    Closed(String),
    #[error("{path}: the answer is not an ftvmm console's (it said: {said:?})")]
    Foreign { path: String, said: String },
    #[error("refused: {0}")]
    Refused(String),
}

pub(crate) fn main(socket: &Path) -> ExitCode {
    let stream = match attach(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ftvmm ctl: {e}");
            return ExitCode::from(2);
        }
    };
    let stdin = io::stdin();
    let raw = match RawMode::enter(stdin.as_raw_fd()) {
        Ok(raw) => raw,
        Err(e) => {
            eprintln!("ftvmm ctl: cannot put the terminal in raw mode: {e}");
            return ExitCode::from(2);
        }
    };
    let nl = if raw.is_some() { "\r\n" } else { "\n" };
    eprint!(
        "ftvmm ctl: attached to the guest's console at {}; detach with Ctrl-] or ~. at the start of a line{nl}",
        socket.display()
    );
    let ended = relay(&stream, stdin.as_raw_fd());
    drop(raw);
    match ended {
        Ok(Ended::Detached) => {
            eprintln!("\nftvmm ctl: detached");
            ExitCode::SUCCESS
        }
        Ok(Ended::Closed) => {
            eprintln!(
                "\nftvmm ctl: the console closed: the ftvmm at {} stopped or left it (after a takeover, attach to the new primary's socket)",
                socket.display()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("\nftvmm ctl: the console broke: {e}");
            ExitCode::from(1)
        }
    }
}

/// Connects and asks for the console; returns the stream once the answer said attached.
fn attach(socket: &Path) -> Result<UnixStream, AttachError> {
    let path = socket.display().to_string();
    let io = |source| AttachError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| AttachError::Unreachable {
        path: path.clone(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    stream.write_all(b"console\n").map_err(io)?;
    // The answer's line, a byte at a time: what follows it is the guest's output.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 4096 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    if line.is_empty() {
        return Err(AttachError::Closed(path));
    }
    let foreign = || AttachError::Foreign {
        path: path.clone(),
        said: String::from_utf8_lossy(&line).chars().take(80).collect(),
    };
    let answer: serde_json::Value = serde_json::from_slice(&line).map_err(|_| foreign())?;
    if let Some(why) = answer.get("error") {
        return Err(AttachError::Refused(
            why.as_str().unwrap_or_default().to_string(),
        ));
    }
    if answer.get("console").and_then(|c| c.as_str()) != Some("attached") {
        return Err(foreign());
    }
    stream.set_read_timeout(None).map_err(io)?;
    Ok(stream)
}

enum Ended {
    /// The user detached (the escape, or the end of the input).
    Detached,
    /// The ftvmm closed the console.
    Closed,
}

/// Copies the guest's output to stdout and stdin to the guest until one side ends.
fn relay(stream: &UnixStream, stdin: i32) -> io::Result<Ended> {
    let mut escape = Escape::default();
    let mut out = io::stdout().lock();
    let mut buf = [0u8; 4096];
    let mut to_guest = Vec::with_capacity(buf.len());
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stdin,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            let got = (&*stream).read(&mut buf)?;
            if got == 0 {
                return Ok(Ended::Closed);
            }
            out.write_all(&buf[..got])?;
            out.flush()?;
        }
        if fds[0].revents != 0 {
            // SAFETY: reads at most `buf.len()` bytes into `buf`, which is valid for writes.
            let got = unsafe { libc::read(stdin, buf.as_mut_ptr().cast(), buf.len()) };
            if got < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if got == 0 {
                return Ok(Ended::Detached);
            }
            to_guest.clear();
            let detach = escape.filter(&buf[..got as usize], &mut to_guest);
            if !to_guest.is_empty() {
                (&*stream).write_all(&to_guest)?;
            }
            if detach {
                return Ok(Ended::Detached);
            }
        }
    }
}

/// The detach escapes in what is typed: `Ctrl-]` anywhere, `~.` at the start of a line (`~~`
/// there sends one `~`).
#[derive(Debug)]
struct Escape {
    line_start: bool,
    tilde: bool,
}

impl Default for Escape {
    fn default() -> Self {
        Escape {
            line_start: true,
            tilde: false,
        }
    }
}

impl Escape {
    /// Appends to `out` what of `input` goes to the guest; true at a detach (what follows it is
    /// dropped).
    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if b == CTRL_BRACKET {
                return true;
            }
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return true,
                    b'~' => {
                        out.push(b'~');
                        self.line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.line_start = b == b'\r' || b == b'\n';
        }
        false
    }
}

/// A terminal in raw mode, restored when dropped (also when the relay fails, and on a panic's
/// unwinding).
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal; None (and nothing changed) if it is not.
    fn enter(fd: i32) -> io::Result<Option<RawMode>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it in or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write to.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: `saved` is the termios tcgetattr returned for this descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut e = Escape::default();
        let mut out = Vec::new();
        for c in chunks {
            if e.filter(c, &mut out) {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn escapes_detach_and_everything_else_goes_through() {
        assert_eq!(typed(&[b"ls\r"]), (b"ls\r".to_vec(), false));
        assert_eq!(typed(&[b"ls\x1dxyz"]), (b"ls".to_vec(), true));
        assert_eq!(typed(&[b"~."]), (Vec::new(), true));
        assert_eq!(typed(&[b"ls\r~", b"."]), (b"ls\r".to_vec(), true));
        assert_eq!(typed(&[b"ls\n~."]), (b"ls\n".to_vec(), true));
        // Not at the start of a line, or not followed by a dot: typed as it is.
        assert_eq!(typed(&[b"a~."]), (b"a~.".to_vec(), false));
        assert_eq!(typed(&[b"~a"]), (b"~a".to_vec(), false));
        assert_eq!(typed(&[b"~~."]), (b"~.".to_vec(), false));
        assert_eq!(typed(&[b"cd ~/x\r"]), (b"cd ~/x\r".to_vec(), false));
    }
}
