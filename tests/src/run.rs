//! One `ftvmm` run to its end: the `Ftvmm` builder (role, flags, namespace, CPU, scripted serial
//! input, time limit), what the run did (`Run`), `ftvmm ctl`, and `wait_until`.

use crate::{ftvmm_bin, lane_args};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Polls `what` every `poll` until it holds (true) or `limit` has passed (its last answer).
pub fn wait_until(limit: Duration, poll: Duration, mut what: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if what() {
            return true;
        }
        std::thread::sleep(poll);
    }
    what()
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

    /// Why a run ended badly: the line before the digest line, which is the last one
    /// (README, "Exit status").
    pub fn reason(&self) -> Option<&str> {
        self.digest_line()?;
        let mut lines = self.stderr.lines().rev();
        lines.next();
        lines.next().filter(|l| l.starts_with("ftvmm: "))
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
    netns: Option<String>,
    cpu: Option<u32>,
    args: Vec<String>,
    input: Option<Vec<u8>>,
    input_delay: Duration,
    timeout: Duration,
}

impl Ftvmm {
    /// `ftvmm --role standalone --kernel <kernel>`.
    pub fn standalone(kernel: &Path) -> Self {
        Ftvmm {
            netns: None,
            cpu: None,
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
            netns: None,
            cpu: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            input: None,
            input_delay: Duration::ZERO,
            timeout: Duration::from_secs(60),
        }
    }

    /// Runs the process on host CPU `cpu` only (`taskset`, which keeps the PID). On this
    /// project's nested KVM, `CPUID` at CPL3 is not intercepted and leaf 1 shows the host
    /// CPU's APIC ID, which glibc keeps in memory: a primary and a backup on different host
    /// CPUs then differ in that byte of RAM (ENVIRONMENT.md; hardware KVM intercepts it). Tests
    /// that compare a pair's RAM pin both sides to one CPU.
    pub fn on_cpu(mut self, cpu: u32) -> Self {
        self.cpu = Some(cpu);
        self
    }

    /// Runs the process inside network namespace `ns` (a simulated host), with
    /// `ip netns exec`, which keeps the PID: signals still reach ftvmm itself.
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// The command that runs ftvmm: in the namespace, on the CPU asked for.
    pub(crate) fn command(&self) -> Command {
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        if let Some(cpu) = self.cpu {
            argv.extend(["taskset".to_string(), "-c".to_string(), cpu.to_string()]);
        }
        argv.push(ftvmm_bin().display().to_string());
        argv.extend(lane_args(&self.args));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
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
        let mut cmd = self.command();
        let mut child = cmd
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

/// `ftvmm ctl` with these arguments: (exit code, stdout, stderr).
pub fn ctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(ftvmm_bin())
        .arg("ctl")
        .args(args)
        .output()
        .expect("run ftvmm ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ftvmm ctl --api-socket SOCKET status`: the status document, or what ctl said when it
/// printed none (read it with [`json_number`](crate::json_number)).
pub fn ctl_status(socket: &Path) -> String {
    let (_, out, err) = ctl(&["--api-socket", &socket.display().to_string(), "status"]);
    if out.is_empty() {
        err
    } else {
        out
    }
}
