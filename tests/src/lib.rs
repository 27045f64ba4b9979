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

/// The `ftvmm` binary: `$FTVMM_BIN`, or the one built next to this binary (a program in
/// target/<profile>/) or to this test binary's profile (target/<profile>/deps/<test>).
pub fn ftvmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FTVMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("ftvmm"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{} not found: build it first (cargo build -p ftvmm, with the same profile)",
                candidates[candidates.len() - 1].display()
            )
        })
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

/// What `ftvmm probe --json` found on this host (vmm/src/host.rs): `host` (the findings) and
/// `mechanisms` (what a run with the default flags uses). Probed once per test binary.
pub fn host() -> &'static serde_json::Value {
    static HOST: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let out = Command::new(ftvmm_bin())
            .args(["probe", "--json"])
            .output()
            .expect("run ftvmm probe");
        assert!(out.status.success(), "ftvmm probe: {out:?}");
        serde_json::from_slice(&out.stdout).expect("ftvmm probe --json prints JSON")
    })
}

/// Whether this host's KVM runs under QEMU's TCG (the stock lane, docs/HARDWARE.md), whose
/// emulation of some instructions is not the hardware's.
pub fn under_tcg() -> bool {
    host()["host"]["kvm"]
        .as_str()
        .is_some_and(|k| k.contains("TCGTCGTCGTCG"))
}

/// `args` as the lane runs them: on a lane whose host is itself emulated (the stock lane: one
/// CPU under QEMU's TCG runs both sides of a pair and the test), `FTVMM_TEST_FAILOVER_TIMEOUT`
/// gives a pair's sides a failover timeout that fits it (scripts/test-stock-lane), unless the
/// test chose one.
pub fn lane_args(args: &[String]) -> Vec<String> {
    let mut args = args.to_vec();
    let pair = args
        .windows(2)
        .any(|w| w[0] == "--role" && (w[1] == "primary" || w[1] == "backup"));
    let chosen = args
        .iter()
        .any(|a| a == "--failover-timeout" || a == "--peer-timeout");
    if let (true, false, Ok(t)) = (pair, chosen, std::env::var("FTVMM_TEST_FAILOVER_TIMEOUT")) {
        args.extend(["--failover-timeout".to_string(), t]);
    }
    args
}

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

/// How many trials a campaign runs: the number in environment variable `var`, else `default`.
pub fn trials(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
    fn command(&self) -> Command {
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

/// A TCP proxy between a backup and its primary, on 127.0.0.1, that the test controls: it can
/// hold back what the backup sends (acknowledgements) and flip one byte of it.
pub struct Proxy {
    addr: std::net::SocketAddr,
    /// While set, bytes from the backup wait in the proxy.
    pub hold_upstream: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// When non-zero, the byte at this offset of the backup's stream (from 1) is flipped.
    pub flip_upstream_at: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Proxies connections made to [`Proxy::addr`] to `target`.
    pub fn start(target: &str) -> Proxy {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = Arc::new(AtomicBool::new(false));
        let flip = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, f, s, target) = (hold.clone(), flip.clone(), stop.clone(), target.to_string());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Acquire) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = down.set_nonblocking(false);
                let Ok(up) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (h, f) = (h.clone(), f.clone());
                // backup -> primary, with hold and flip
                std::thread::spawn(move || pump(down, up, Some((h, f))));
                // primary -> backup
                std::thread::spawn(move || pump(u2, d2, None));
            }
        });
        Proxy {
            addr,
            hold_upstream: hold,
            flip_upstream_at: flip,
            stop,
        }
    }

    /// Where the backup should connect.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }
}

type Controls = (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
);

fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, ctl: Option<Controls>) {
    use std::sync::atomic::Ordering;
    let mut buf = [0u8; 16384];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((hold, flip)) = &ctl {
            while hold.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let at = flip.load(Ordering::Acquire);
            if at > offset && at <= offset + n as u64 {
                buf[(at - offset - 1) as usize] ^= 0x01;
                flip.store(0, Ordering::Release);
            }
        }
        offset += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// `ftvmm ctl --api-socket PATH status`, parsed as JSON-ish text: the number after `"key": `
/// (the first occurrence).
pub fn ctl_status(socket: &Path) -> String {
    let out = Command::new(ftvmm_bin())
        .args([
            "ctl",
            "--api-socket",
            &socket.display().to_string(),
            "status",
        ])
        .output()
        .expect("run ftvmm ctl");
    if out.stdout.is_empty() {
        return String::from_utf8_lossy(&out.stderr).into_owned();
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number after `"key": ` in a status document.
pub fn json_number(doc: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\": ");
    let at = doc.find(&pat)? + pat.len();
    doc[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A pre-shared key file for a pair, in `dir`.
pub fn key_file(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(&p, key).expect("write key");
    p
}

/// The Linux guest's kernel and initramfs (images/build-linux), or None when
/// `FTVMM_SKIP_LINUX` is set.
pub fn linux_images() -> Option<(PathBuf, PathBuf)> {
    if std::env::var_os("FTVMM_SKIP_LINUX").is_some() {
        eprintln!("FTVMM_SKIP_LINUX is set: skipping the Linux guest tests");
        return None;
    }
    let dir = root().join("images/out/linux");
    let (k, i) = (dir.join("vmlinux"), dir.join("initramfs.cpio"));
    assert!(
        k.exists() && i.exists(),
        "{} or {} missing: run images/build-linux (or set FTVMM_SKIP_LINUX=1)",
        k.display(),
        i.display()
    );
    Some((k, i))
}

/// The machine flags of the Linux guest with `cmdline` and `disk` (its kernel and initramfs
/// from [`linux_images`]); None when the Linux tests are skipped.
pub fn linux_machine(cmdline: &str, disk: &Path) -> Option<Vec<String>> {
    let (k, i) = linux_images()?;
    Some(
        [
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--disk",
            disk.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec(),
    )
}

/// The command line every Linux test uses.
pub const LINUX_CMDLINE: &str = "console=ttyS0 panic=-1";
/// The Linux guest's shell prompt.
pub const LINUX_PROMPT: &str = "ftvmm# ";

/// The Linux guest booted to its shell prompt, saved: a snapshot, the disk it had (16 MiB,
/// blank at boot) and what the boot printed.
pub struct LinuxReady {
    /// The snapshot at the prompt.
    pub snapshot: PathBuf,
    /// The disk as it was when the snapshot was taken (copy it before use).
    pub disk: PathBuf,
    /// The boot's serial output.
    pub boot_output: String,
}

fn file_key(p: &Path) -> String {
    let m = std::fs::metadata(p).expect("metadata");
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}-{mtime}", m.len())
}

/// Boots a Linux guest once to its shell prompt and keeps the snapshot under
/// target/test-scratch/`name`, shared by every test binary (and reused by later runs) as long
/// as ftvmm, the kernel and the initramfs are unchanged. `boot` runs the boot (ftvmm with its
/// images, a blank 16 MiB disk and the snapshot path) and checks it.
fn boot_once(
    name: &str,
    boot: impl FnOnce(&Path, &Path, &Path, &Path) -> Run,
) -> Option<LinuxReady> {
    let (kernel, initrd) = linux_images()?;
    let key = format!(
        "{}_{}_{}",
        file_key(&ftvmm_bin()),
        file_key(&kernel),
        file_key(&initrd)
    );
    let dir = root().join("target/test-scratch").join(name);
    let (snapshot, disk, out, stamp) = (
        dir.join("ready.snap"),
        dir.join("disk.img"),
        dir.join("boot.out"),
        dir.join("key"),
    );
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) && snapshot.exists() {
        return Some(LinuxReady {
            snapshot,
            disk,
            boot_output: std::fs::read_to_string(&out).unwrap_or_default(),
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let run = boot(&kernel, &initrd, &disk, &snapshot);
    run.assert_code(0);
    assert!(snapshot.exists(), "no snapshot saved:\n{}", run.stderr);
    let faults = guest_faults(&run.stdout);
    assert!(
        faults.is_empty(),
        "user processes of the guest faulted during its boot:\n{}\n\nthe whole output:\n{}",
        faults.join("\n"),
        run.stdout
    );
    std::fs::write(&out, &run.stdout).unwrap();
    std::fs::write(&stamp, &key).unwrap();
    Some(LinuxReady {
        snapshot,
        disk,
        boot_output: run.stdout,
    })
}

/// The lines where the Linux guest's kernel reports a user process killed by a fault
/// (`segfault at`, `traps: ... general protection fault`, `invalid opcode`): on a correct
/// platform the guest's own programs never fault, so each one is a platform defect (seen once:
/// interrupts injected at the entry of `__alloc_pages`, docs/ARCHITECTURE.md).
pub fn guest_faults(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| {
            l.contains("segfault at ")
                || (l.contains("traps: ")
                    && (l.contains("general protection") || l.contains("invalid opcode")))
        })
        .collect()
}

/// The arguments of a Linux boot that stops at the prompt with a snapshot.
fn boot_args(initrd: &Path, cmdline: &str, disk: &Path, snapshot: &Path) -> Vec<String> {
    [
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--disk",
        disk.to_str().unwrap(),
        "--snapshot-on-exit",
        snapshot.to_str().unwrap(),
        "--serial-input",
        "none",
    ]
    .map(String::from)
    .to_vec()
}

/// The Linux guest booted to its shell prompt and saved (see `boot_once`): CI boots it once.
pub fn linux_ready() -> Option<&'static LinuxReady> {
    static READY: std::sync::OnceLock<Option<LinuxReady>> = std::sync::OnceLock::new();
    READY
        .get_or_init(|| {
            boot_once("linux-ready", |kernel, initrd, disk, snapshot| {
                Ftvmm::standalone(kernel)
                    .args(boot_args(initrd, LINUX_CMDLINE, disk, snapshot))
                    .timeout(Duration::from_secs(600))
                    .run_until_output(LINUX_PROMPT)
            })
        })
        .as_ref()
}

/// Simulated hosts for multi-host tests: network namespaces, each with two links: `eth0` on the
/// pair network (10.231.S.h/16), where primary and backup talk, and `eth1` on the storage
/// network (10.232.S.h/16), where a lock service lives. A partition cuts a host's pair link and
/// leaves its storage link up, as when two hosts lose each other but not their shared storage.
/// The bridges live in a namespace of their own (the "switch"). Created with unique names,
/// removed on drop even when the test fails; traffic stays inside them. Needs root (the tests
/// run as root here, see ENVIRONMENT.md).
pub struct Hosts {
    names: Vec<String>,
    bridge_ns: String,
    subnet: u8,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let mut argv = vec!["ip"];
    argv.extend(args);
    sh(&argv)
}

/// Runs `argv` (a network set-up command): Ok when it succeeded, else what it printed.
pub fn sh(argv: &[&str]) -> Result<(), String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Hosts {
    /// `n` hosts on the two networks.
    pub fn new(tag: &str, n: usize) -> Hosts {
        let id = std::process::id() % 10000;
        let subnet = (id % 200) as u8 + 20;
        let bridge_ns = format!("ftsw-{tag}-{id}");
        let names: Vec<String> = (0..n).map(|i| format!("fth{i}-{tag}-{id}")).collect();
        let hosts = Hosts {
            names,
            bridge_ns,
            subnet,
        };
        hosts.cleanup();
        let setup = || -> Result<(), String> {
            let sw = hosts.bridge_ns.as_str();
            ip(&["netns", "add", sw])?;
            for br in ["br0", "br1"] {
                ip(&["-n", sw, "link", "add", br, "type", "bridge"])?;
                ip(&["-n", sw, "link", "set", br, "up"])?;
            }
            for (i, ns) in hosts.names.iter().enumerate() {
                ip(&["netns", "add", ns])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
                for (net, br) in [(0, "br0"), (1, "br1")] {
                    let (inner, outer) = (format!("eth{net}"), format!("p{net}h{i}"));
                    ip(&[
                        "-n", ns, "link", "add", &inner, "type", "veth", "peer", "name", &outer,
                        "netns", sw,
                    ])?;
                    let addr = format!("10.{}.{}.{}/16", 231 + net, hosts.subnet, i + 1);
                    ip(&["-n", ns, "addr", "add", &addr, "dev", &inner])?;
                    ip(&["-n", ns, "link", "set", &inner, "up"])?;
                    ip(&["-n", sw, "link", "set", &outer, "master", br])?;
                    ip(&["-n", sw, "link", "set", &outer, "up"])?;
                }
            }
            Ok(())
        };
        if let Err(e) = setup() {
            hosts.cleanup();
            panic!("cannot set up the test hosts: {e}");
        }
        hosts
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The pair-network address of host `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("10.231.{}.{}", self.subnet, i + 1)
    }

    /// The storage-network address of host `i` (where a lock service listens).
    pub fn storage_addr(&self, i: usize) -> String {
        format!("10.232.{}.{}", self.subnet, i + 1)
    }

    /// Cuts host `i` off the pair network (its storage link stays up).
    pub fn cut(&self, i: usize) {
        let dev = format!("p0h{i}");
        ip(&["-n", &self.bridge_ns, "link", "set", &dev, "down"]).expect("cut");
    }

    /// Joins host `i` back to the pair network.
    pub fn heal(&self, i: usize) {
        let dev = format!("p0h{i}");
        ip(&["-n", &self.bridge_ns, "link", "set", &dev, "up"]).expect("heal");
    }

    /// Gives host `i` a tap for a guest's NIC, bridged with its storage link (the guest LAN):
    /// a local bridge `brg` takes `eth1` and its address, and the tap `tap` joins it.
    pub fn add_guest_tap(&self, i: usize, tap: &str) {
        let ns = self.ns(i);
        let addr = format!("{}/16", self.storage_addr(i));
        let steps: [&[&str]; 8] = [
            &["-n", ns, "link", "add", "brg", "type", "bridge"],
            &["-n", ns, "addr", "del", &addr, "dev", "eth1"],
            &["-n", ns, "link", "set", "eth1", "master", "brg"],
            &["-n", ns, "addr", "add", &addr, "dev", "brg"],
            &["-n", ns, "link", "set", "brg", "up"],
            &["-n", ns, "tuntap", "add", tap, "mode", "tap"],
            &["-n", ns, "link", "set", tap, "master", "brg"],
            &["-n", ns, "link", "set", tap, "up"],
        ];
        for step in steps {
            ip(step).expect("guest tap");
        }
    }

    /// Adds `addr` (e.g. `10.240.0.2/16`) to host `i`'s storage link: a client on the guest LAN.
    pub fn add_guest_lan_addr(&self, i: usize, addr: &str) {
        ip(&["-n", self.ns(i), "addr", "add", addr, "dev", "eth1"]).expect("client address");
    }

    fn cleanup(&self) {
        for ns in self.names.iter().chain(std::iter::once(&self.bridge_ns)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The guest's address on the guest LAN of [`Hosts`] (10.240.0.0/16 on the storage bridge).
pub const GUEST_IP: &str = "10.240.0.100";
/// The guest's MAC in the networked snapshot.
pub const GUEST_MAC: &str = "52:54:00:f7:00:01";

/// The Linux guest booted with a NIC (`ftvmm.ip=10.240.0.100/16`, its services listening) to
/// its shell prompt, saved; booted once and shared like [`linux_ready`]. Restore it with
/// `--net tap=<a tap>` and [`LINUX_NET_CMDLINE`].
pub fn linux_net_ready() -> Option<&'static LinuxReady> {
    static READY: std::sync::OnceLock<Option<LinuxReady>> = std::sync::OnceLock::new();
    READY
        .get_or_init(|| {
            boot_once("linux-net-ready", |kernel, initrd, disk, snapshot| {
                // A host of its own, with a tap nobody reads: the boot needs the NIC to exist.
                let hosts = Hosts::new("boot", 1);
                hosts.add_guest_tap(0, "ftg0");
                let run = Ftvmm::standalone(kernel)
                    .in_netns(hosts.ns(0))
                    .args(boot_args(initrd, LINUX_NET_CMDLINE, disk, snapshot))
                    .args(["--net", &format!("tap=ftg0,mac={GUEST_MAC}")])
                    .timeout(Duration::from_secs(600))
                    .run_until_output(LINUX_PROMPT);
                assert!(
                    run.stdout.contains("ftvmm-guest: eth0 10.240.0.100/16"),
                    "the guest did not configure its NIC:\n{}",
                    run.stdout
                );
                run
            })
        })
        .as_ref()
}

/// The command line of the networked Linux guest.
pub const LINUX_NET_CMDLINE: &str = "console=ttyS0 panic=-1 ftvmm.ip=10.240.0.100/16";

/// Output an old primary may have released before it died, re-sent by the new one: a few UART
/// bytes (the guest writes the serial line a byte at a time).
pub const MAX_DUP: usize = 64;

/// `before` (the dead primary's output) and `after` (the new primary's) joined: `after` may
/// begin with up to [`MAX_DUP`] bytes that end `before`. Returns every way of joining them.
pub fn joins(before: &str, after: &str) -> Vec<String> {
    (0..=MAX_DUP.min(after.len()))
        .filter(|&k| after.is_char_boundary(k) && before.ends_with(&after[..k]))
        .map(|k| format!("{before}{}", &after[k..]))
        .collect()
}

/// The last tick of a `ticks` guest's output when it is every tenth tick in order (None
/// otherwise).
pub fn ticks_upto(out: &str) -> Option<u32> {
    let mut n = 0;
    // A last line cut short by a kill is the start of the next tick (the next primary completes
    // or re-emits it); every whole line is the next tick.
    let (whole, cut) = out.rsplit_once('\n').map_or(("", out), |(w, c)| (w, c));
    for line in whole.lines() {
        let v: u32 = line.strip_prefix("tick ")?.parse().ok()?;
        if v != n + 10 {
            return None;
        }
        n = v;
    }
    format!("tick {}\n", n + 10).starts_with(cut).then_some(n)
}

/// The joined serial stream is every tick in order, up to `last`.
pub fn assert_ticks_across(before: &str, after: &str, last: u32) {
    assert!(
        joins(before, after)
            .iter()
            .any(|s| ticks_upto(s) == Some(last) && s.ends_with('\n')),
        "the client's stream has a gap or a wrong line:\n--- before ---\n{before}\n--- after ---\n{after}"
    );
}

/// Numbers `n` of `prefix<n>suffix` lines, in order of appearance (lines cut short are
/// skipped).
pub fn numbers(out: &str, prefix: &str, suffix: &str) -> Vec<u64> {
    out.split('\n')
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse()
                .ok()
        })
        .collect()
}

/// Whether `v` counts up by one.
pub fn consecutive(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[1] == w[0] + 1)
}

/// A real etcd (Debian's `etcd-server`): the lock service of a pair. It listens on `addr`:2379
/// (inside network namespace `netns` when given), keeps its data in `dir`/etcd (emptied first)
/// and its log in `dir`/etcd.log; it is killed (only it) when dropped.
pub struct Etcd {
    child: std::process::Child,
    /// `ADDR:2379`, for `--lock etcd:ENDPOINT/KEY`.
    pub endpoint: String,
}

impl Etcd {
    /// Starts it and waits until it accepts connections.
    pub fn start(netns: Option<&str>, addr: &str, peer_port: u16, dir: &Path) -> Etcd {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("etcd not installed: scripts/test installs etcd-server (apt-get install etcd-server)");
        let endpoint = format!("{addr}:2379");
        let peer = format!("http://{addr}:{peer_port}");
        let data = dir.join("etcd");
        let _ = std::fs::remove_dir_all(&data);
        let in_ns = |cmd: &str| {
            let mut c = Command::new(if netns.is_some() { "ip" } else { cmd });
            if let Some(ns) = netns {
                c.args(["netns", "exec", ns, cmd]);
            }
            c
        };
        let child = in_ns(bin)
            .args(["--name", "ftvmm-test", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &format!("http://{endpoint}")])
            .args(["--advertise-client-urls", &format!("http://{endpoint}")])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("ftvmm-test={peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).expect("etcd log"))
            .spawn()
            .expect("start etcd");
        let etcd = Etcd { child, endpoint };
        // Wait until it answers, from where its clients are.
        let start = Instant::now();
        while !in_ns("bash")
            .arg("-c")
            .arg(format!("exec 3<>/dev/tcp/{addr}/2379"))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "etcd did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A failover trial of the Linux `counter` workload: `before` (the dead primary's serial
/// output) and `after` (the new primary's) joined count 1, 2, 3... with no gap, and the new
/// primary printed at least five more.
pub fn assert_counter_across(trial: usize, before: &str, after: &str) {
    let ok = joins(before, after).iter().any(|s| {
        let n = numbers(s, "n=", "");
        !n.is_empty()
            && n[0] == 1
            && consecutive(&n)
            && n.len() >= numbers(before, "n=", "").len() + 5
    });
    assert!(
        ok,
        "trial {trial}: the counter has a gap, a wrong value or stopped\n--- before ---\n{before}\n--- after ---\n{after}"
    );
}

/// A failover trial of the Linux `diskwrite` workload: the client's `record N synced` lines
/// across both primaries have no gap, and every record the client saw synced is on `disk`.
pub fn assert_synced_records_kept(trial: usize, before: &str, after: &str, disk: &Path) {
    let seen = joins(before, after)
        .iter()
        .map(|s| numbers(s, "record ", " synced"))
        .find(|n| !n.is_empty() && n[0] == 1 && consecutive(n));
    let Some(&last_seen) = seen.as_ref().and_then(|n| n.last()) else {
        panic!("trial {trial}: the client's record lines have a gap\n--- before ---\n{before}\n--- after ---\n{after}");
    };
    let on_disk = records_on_disk(disk);
    assert!(
        on_disk >= last_seen,
        "trial {trial}: the client saw record {last_seen} synced, the disk holds 1..{on_disk}"
    );
}

/// The records the Linux guest's `diskwrite` left on `disk`: record n at sector n-1, valid,
/// in order; the number of them.
pub fn records_on_disk(disk: &Path) -> u64 {
    let data = std::fs::read(disk).unwrap();
    let mut n = 0;
    for sector in data.chunks(512) {
        let line = String::from_utf8_lossy(sector);
        let line = line.trim_end_matches('\0');
        if !line.starts_with(&format!("FTVMMREC {} ", n + 1)) {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_faults_finds_the_kernels_fault_reports() {
        // Lines from a networked boot with `--window-sites __alloc_pages` (2026-11-30).
        let out = "Run /init as init process\n\
            ftvmm-guest: eth0 10.240.0.100/16\n\
            traps: nc[29] general protection fault ip:41bf19 sp:7fffffffea50 error:0 in busybox[401000+184000]\n\
            exe[38]: segfault at 0 ip 00000000004a4d02 sp 00007fffffffec48 error 4 in busybox[401000+184000]\n\
            Segmentation fault\n\
            ftvmm-guest: ready\n";
        let f = guest_faults(out);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].starts_with("traps: nc[29]") && f[1].starts_with("exe[38]"));
        assert!(guest_faults("ftvmm-guest: ready\nftvmm# echo segfault\n").is_empty());
    }
}
