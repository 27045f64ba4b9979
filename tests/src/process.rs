//! An `ftvmm` process in the background (`Proc`): started from an `Ftvmm` builder, its output
//! collected as it comes, waited on, typed at, signalled, killed when dropped.

use crate::{wait_until, Ftvmm, Run};
use std::io::{Read, Write};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// An `ftvmm` process running in the background: its output is collected as it comes, it can
/// be signalled, and it is killed (only it, by its PID) when dropped.
pub struct Proc {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    err: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    start: Instant,
    status: Option<ExitStatus>,
}

fn collect(
    mut from: impl Read + Send + 'static,
    into: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

impl Ftvmm {
    /// Starts the process in the background with a pipe as its stdin (serial input with
    /// `--serial-input -`).
    pub fn spawn(self) -> Proc {
        self.spawn_with_env(&[])
    }

    /// The same, with extra environment variables.
    pub fn spawn_with_env(self, env: &[(&str, &str)]) -> Proc {
        let mut cmd = self.command();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ftvmm");
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let err = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("stdout"), out.clone()),
            collect(child.stderr.take().expect("stderr"), err.clone()),
        ];
        Proc {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            readers,
            start: Instant::now(),
            status: None,
        }
    }
}

impl Proc {
    /// The process ID.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything it printed on stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Everything it printed on stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, what: impl Fn(&Proc) -> bool, limit: Duration) -> bool {
        wait_until(limit, Duration::from_millis(10), || what(self))
    }

    /// Waits until stdout contains `marker`; false after `limit`.
    pub fn wait_stdout(&self, marker: &str, limit: Duration) -> bool {
        self.wait_for(|p| p.stdout().contains(marker), limit)
    }

    /// Waits until stderr contains `marker`; false after `limit`.
    pub fn wait_stderr(&self, marker: &str, limit: Duration) -> bool {
        self.wait_for(|p| p.stderr().contains(marker), limit)
    }

    /// The first word after `prefix` on stderr (e.g. the address after "listening on ").
    pub fn stderr_word_after(&self, prefix: &str) -> Option<String> {
        let err = self.stderr();
        let at = err.find(prefix)? + prefix.len();
        err[at..]
            .split(char::is_whitespace)
            .next()
            .map(|w| w.trim_end_matches([':', ',']).to_string())
    }

    /// Types `bytes` on its serial input.
    pub fn type_input(&mut self, bytes: &[u8]) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(bytes);
            let _ = stdin.flush();
        }
    }

    /// Sends it signal `sig`.
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped (status is
            // None), so the pid still names it.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_some()
    }

    /// Its exit code, once it exited (None while it runs, or when a signal ended it).
    pub fn exit_code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Waits for it to exit (killing it after `limit`) and returns what it did.
    pub fn wait(mut self, limit: Duration) -> Run {
        let start = Instant::now();
        while !self.exited() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        drop(self.stdin.take());
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Run {
            status: self.status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed: self.start.elapsed(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
