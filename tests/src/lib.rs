//! Support for the integration tests: find the `ftvmm` binary and the guest images, run the
//! binary as a real process with scripted serial input and a time limit, and parse what it
//! printed.
//!
//! The tests need `/dev/kvm`, a built `ftvmm` (`cargo build --release -p ftvmm`, which
//! `scripts/test` does first) and the test guests (`images/build-test-guests`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The `ftvmm` binary: `$FTVMM_BIN`, or the one built next to this test binary's profile.
pub fn ftvmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FTVMM_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let bin = profile_dir.join("ftvmm");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p ftvmm, with the same profile as the tests)",
        bin.display()
    );
    bin
}

/// A test guest's ELF, built by images/build-test-guests.
pub fn test_guest(name: &str) -> PathBuf {
    let p = root().join(format!("images/out/test-guests/{name}.elf"));
    assert!(
        p.exists(),
        "{} not found: run images/build-test-guests first",
        p.display()
    );
    p
}

/// A scratch directory for one test, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// What one run of `ftvmm` did.
#[derive(Debug)]
pub struct Run {
    /// Exit status (None if it was killed by the time limit).
    pub status: Option<ExitStatus>,
    /// The guest's serial output (stdout).
    pub stdout: String,
    /// Diagnostics.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Run {
    /// The exit code, or -1 if killed.
    pub fn code(&self) -> i32 {
        self.status.and_then(|s| s.code()).unwrap_or(-1)
    }

    /// The `ftvmm: exits=N exit-digest=H` line, which must be the last line of stderr.
    pub fn digest_line(&self) -> Option<&str> {
        self.stderr
            .lines()
            .last()
            .filter(|l| l.starts_with("ftvmm: exits=") && l.contains(" exit-digest="))
    }

    /// The number of synchronous exits from the digest line.
    pub fn exits(&self) -> Option<u64> {
        let line = self.digest_line()?;
        line.strip_prefix("ftvmm: exits=")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// A `key=value` number from the `stats:` line (`--log-level info`).
    pub fn stat(&self, key: &str) -> u64 {
        self.stderr
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in:\n{}", self.stderr))
    }

    /// Panics with everything printed unless the run exited with `code`.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "ftvmm exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Builder for one `ftvmm` process.
pub struct Ftvmm {
    args: Vec<String>,
    input: Option<Vec<u8>>,
    input_delay: Duration,
    timeout: Duration,
}

impl Ftvmm {
    /// `ftvmm --role standalone --kernel <kernel>`.
    pub fn standalone(kernel: &Path) -> Self {
        Ftvmm {
            args: vec![
                "--role".into(),
                "standalone".into(),
                "--kernel".into(),
                kernel.display().to_string(),
            ],
            input: None,
            input_delay: Duration::ZERO,
            timeout: Duration::from_secs(60),
        }
    }

    /// A process with exactly these arguments.
    pub fn raw(args: &[&str]) -> Self {
        Ftvmm {
            args: args.iter().map(|s| s.to_string()).collect(),
            input: None,
            input_delay: Duration::ZERO,
            timeout: Duration::from_secs(60),
        }
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// Writes `bytes` to the guest's serial input (stdin) after `delay`, then closes it.
    pub fn input(mut self, bytes: &[u8], delay: Duration) -> Self {
        self.input = Some(bytes.to_vec());
        self.input_delay = delay;
        self
    }

    /// Kills the process after `t`.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Runs the process, sends it SIGTERM once its stdout contains `marker` (or after the time
    /// limit), and waits for it to end.
    pub fn run_until_output(self, marker: &str) -> Run {
        self.run_inner(Some(marker.to_string()))
    }

    /// Runs the process to its end (or the time limit).
    pub fn run(self) -> Run {
        self.run_inner(None)
    }

    fn run_inner(self, stop_at: Option<String>) -> Run {
        let start = Instant::now();
        let mut child = Command::new(ftvmm_bin())
            .args(&self.args)
            .stdin(if self.input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftvmm");
        let stdin = child.stdin.take();
        let input = self.input.clone();
        let delay = self.input_delay;
        let writer = std::thread::spawn(move || {
            if let (Some(mut stdin), Some(bytes)) = (stdin, input) {
                std::thread::sleep(delay);
                let _ = stdin.write_all(&bytes);
            }
        });
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen_w = seen.clone();
        let out_t = std::thread::spawn(move || {
            let mut s = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        s.extend_from_slice(&buf[..n]);
                        if let Some(m) = &stop_at {
                            if String::from_utf8_lossy(&s).contains(m.as_str()) {
                                seen_w.store(true, std::sync::atomic::Ordering::Release);
                            }
                        }
                    }
                }
            }
            s
        });
        let mut signalled = false;
        let err_t = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            s
        });
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break Some(st);
            }
            if !signalled && seen.load(std::sync::atomic::Ordering::Acquire) {
                // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                signalled = true;
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = writer.join();
        let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
        Run {
            status,
            stdout,
            stderr,
            elapsed: start.elapsed(),
        }
    }
}
