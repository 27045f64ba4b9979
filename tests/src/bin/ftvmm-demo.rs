//! `ftvmm-demo`: what ftvmm is for, on one machine, in about two minutes.
//!
//! Four simulated hosts (network namespaces, as in the tests): A runs the Linux guest as a
//! primary, B attaches as its backup, C is a spare, D is a client on the guest's LAN. A counter
//! runs on the guest's serial line and a client on D talks to the guest over TCP; then host A
//! dies (its ftvmm gets SIGKILL). B takes over; the counter and the TCP connection carry on;
//! C attaches to B as the new backup; the pair stops cleanly.
//!
//! Exit status 0 only when the takeover was clean: the counter has no gap and no wrong value
//! across it, every byte the client got back was right, the new backup attached, and the pair
//! stopped with exit status 0. Everything it starts is stopped and its namespaces removed, also
//! on Ctrl-C or a failure. Logs of every process are kept in target/demo/.
//!
//! Needs root (namespaces, taps), /dev/kvm and the built guests (scripts/setup does it all).

use ftvmm_tests::{
    consecutive, ftvmm_bin, joins, key_file, linux_machine, linux_net_ready, numbers, root, Ftvmm,
    Hosts, Proc, GUEST_IP, GUEST_MAC, LINUX_NET_CMDLINE,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

type Step<T> = Result<T, String>;

const PORT: u16 = 7000;
/// How long the client talks to the guest: across the host's death and past it.
const TALK_SECONDS: u32 = 30;
const STEPS: usize = 9;

/// The demo's screen: numbered steps with the time since the start, a spinner while waiting.
struct Screen {
    start: Instant,
    step: usize,
}

impl Screen {
    fn step(&mut self, what: &str) {
        self.step += 1;
        println!(
            "\n[{:6.1} s] {}/{STEPS}  {what}",
            self.start.elapsed().as_secs_f64(),
            self.step
        );
    }

    fn say(&self, text: &str) {
        println!("            {text}");
    }

    /// Waits until `probe` gives a value (or `limit`, or Ctrl-C), with a spinner on a
    /// terminal; returns the value and how long it took.
    fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> Step<(T, Duration)> {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("            {spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        let start = Instant::now();
        let result = loop {
            if let Some(v) = probe() {
                break Ok((v, start.elapsed()));
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                break Err("interrupted".to_string());
            }
            if start.elapsed() > limit {
                break Err(format!("{what}: nothing after {} s", limit.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        bar.finish_and_clear();
        result
    }
}

/// A client program on host D, killed (by PID) when dropped.
struct Client {
    child: Child,
    progress: Arc<Mutex<String>>,
    out: Option<std::thread::JoinHandle<String>>,
}

impl Client {
    fn start(hosts: &Hosts, host: usize, args: &[&str]) -> Step<Client> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", hosts.ns(host), "python3"])
            .arg(root().join("tests/net_client.py"))
            .arg(GUEST_IP)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the client: {e}"))?;
        let progress = Arc::new(Mutex::new(String::new()));
        let (p, err) = (progress.clone(), child.stderr.take());
        std::thread::spawn(move || {
            if let Some(err) = err {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    *p.lock().unwrap_or_else(|e| e.into_inner()) = line;
                }
            }
        });
        let stdout = child.stdout.take();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut o) = stdout {
                let _ = std::io::Read::read_to_string(&mut o, &mut s);
            }
            s
        });
        Ok(Client {
            child,
            progress,
            out: Some(out),
        })
    }

    fn progress(&self) -> String {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Its result line, once it ended.
    fn finished(&mut self) -> Option<(bool, String)> {
        let status = self.child.try_wait().ok()??;
        let out = self.out.take()?.join().unwrap_or_default();
        Some((status.success(), out.trim().to_string()))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Everything the demo started, saved to logs and stopped in reverse order at the end.
#[derive(Default)]
struct Started {
    procs: Vec<(&'static str, Proc)>,
    clients: Vec<Client>,
}

impl Started {
    fn proc(&self, name: &str) -> &Proc {
        &self
            .procs
            .iter()
            .find(|(n, _)| *n == name)
            .expect("started")
            .1
    }

    fn proc_mut(&mut self, name: &str) -> &mut Proc {
        &mut self
            .procs
            .iter_mut()
            .find(|(n, _)| *n == name)
            .expect("started")
            .1
    }

    fn save_logs(&self, dir: &Path) {
        for (name, p) in &self.procs {
            let _ = std::fs::write(dir.join(format!("{name}.serial")), p.stdout());
            let _ = std::fs::write(dir.join(format!("{name}.log")), p.stderr());
        }
    }
}

fn status(sock: &Path) -> Step<serde_json::Value> {
    let out = Command::new(ftvmm_bin())
        .args(["ctl", "--api-socket"])
        .arg(sock)
        .arg("status")
        .output()
        .map_err(|e| format!("ftvmm ctl: {e}"))?;
    serde_json::from_slice(&out.stdout).map_err(|_| {
        format!(
            "ftvmm ctl status: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

fn ctl(sock: &Path, request: &str) -> Step<String> {
    let out = Command::new(ftvmm_bin())
        .args(["ctl", "--api-socket"])
        .arg(sock)
        .arg(request)
        .output()
        .map_err(|e| format!("ftvmm ctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ftvmm ctl {request}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The last `n=<k>` the guest printed in `serial`.
fn last_count(serial: &str) -> Option<u64> {
    numbers(serial, "n=", "").last().copied()
}

struct Pair {
    hosts: Hosts,
    dir: PathBuf,
    machine: Vec<String>,
    key: PathBuf,
    lock: String,
}

impl Pair {
    fn sock(&self, host: usize) -> PathBuf {
        self.dir
            .join(format!("host{}.sock", ["A", "B", "C", "D"][host]))
    }

    fn ftvmm(&self, host: usize, role: &str) -> Ftvmm {
        Ftvmm::raw(&["--role", role])
            .in_netns(self.hosts.ns(host))
            .args(["--listen", &format!("{}:{PORT}", self.hosts.addr(host))])
            .args(["--key-file", self.key.to_str().unwrap_or_default()])
            .args(["--lock", &self.lock])
            .args(["--api-socket", self.sock(host).to_str().unwrap_or_default()])
            .args(["--log-level", "info"])
            .args(&self.machine)
    }
}

fn main() {
    // SAFETY: installing a handler that only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let dir = root().join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("ftvmm-demo: cannot create {}: {e}", dir.display());
        std::process::exit(2);
    }
    let mut screen = Screen {
        start: Instant::now(),
        step: 0,
    };
    let mut started = Started::default();
    let result = demo(&mut screen, &dir, &mut started);
    started.save_logs(&dir);
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    drop(started);
    let elapsed = screen.start.elapsed().as_secs_f64();
    match result {
        Ok(summary) => {
            println!("\n[{elapsed:6.1} s] CLEAN TAKEOVER: {summary}");
            println!("            logs of every process: {}", dir.display());
        }
        Err(e) => {
            println!(
                "\n[{elapsed:6.1} s] {}: {e}",
                if interrupted {
                    "INTERRUPTED"
                } else {
                    "DEMO FAILED"
                }
            );
            println!("            logs of every process: {}", dir.display());
            std::process::exit(if interrupted { 130 } else { 1 });
        }
    }
}

fn demo(screen: &mut Screen, dir: &Path, started: &mut Started) -> Step<String> {
    println!("ftvmm demo: a Linux guest protected by a primary/backup pair, a host failure, and");
    println!("the guest carrying on. Four simulated hosts (network namespaces) on this machine.");

    screen.step("The Linux guest at its shell prompt");
    let t = Instant::now();
    let cached = root().join("target/test-scratch/linux-net-ready/ready.snap");
    if !cached.exists() {
        screen.say("first run: booting it once under ftvmm and saving a snapshot (about a minute here; later runs restore it)");
    }
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(100));
    bar.set_message("booting");
    let ready = linux_net_ready();
    bar.finish_and_clear();
    let ready = ready.ok_or("FTVMM_SKIP_LINUX is set: the demo needs the Linux guest")?;
    screen.say(&format!(
        "ready in {:.1} s: snapshot {}",
        t.elapsed().as_secs_f64(),
        ready.snapshot.display()
    ));

    screen.step("Four hosts: A (primary), B (backup), C (spare), D (a client)");
    let hosts = Hosts::new("demo", 4);
    for h in 0..3 {
        hosts.add_guest_tap(h, "tapg");
    }
    hosts.add_guest_lan_addr(3, "10.240.0.2/16");
    let disk = dir.join("disk.img");
    std::fs::copy(&ready.disk, &disk).map_err(|e| format!("disk image: {e}"))?;
    let mut machine = linux_machine(LINUX_NET_CMDLINE, &disk).ok_or("no Linux guest")?;
    machine.extend(["--net".into(), format!("tap=tapg,mac={GUEST_MAC}")]);
    let pair = Pair {
        key: key_file(dir, "pair.key", 77),
        lock: format!("file:{}", dir.join("pair.lock").display()),
        dir: dir.to_path_buf(),
        machine,
        hosts,
    };
    screen.say(&format!(
        "pair network 10.231.x.0/16 (A={}, B={}, C={}); guest LAN 10.240.0.0/16, guest {GUEST_IP}",
        pair.hosts.addr(0),
        pair.hosts.addr(1),
        pair.hosts.addr(2)
    ));
    screen.say(&format!(
        "shared storage: the disk image and the lock block {}",
        dir.join("pair.lock").display()
    ));

    screen.step("Host A runs the guest as the primary");
    let snap = ready.snapshot.to_str().unwrap_or_default();
    let p = pair
        .ftvmm(0, "primary")
        .args(["--restore", snap, "--serial-input", "-"])
        .spawn();
    started.procs.push(("hostA", p));
    let ((), took) = screen.wait("starting", Duration::from_secs(60), || {
        started
            .proc("hostA")
            .stderr()
            .contains("listening for a backup")
            .then_some(())
    })?;
    screen.say(&format!(
        "running in {:.2} s (restored from the snapshot), UNPROTECTED until a backup attaches",
        took.as_secs_f64()
    ));

    screen.step("Host B attaches as the backup, while the guest runs");
    let b = pair
        .ftvmm(1, "backup")
        .args([
            "--primary",
            &format!("{}:{PORT}", pair.hosts.addr(0)),
            "--serial-input",
            "none",
        ])
        .spawn();
    started.procs.push(("hostB", b));
    let ((), took) = screen.wait("live state transfer", Duration::from_secs(120), || {
        started
            .proc("hostA")
            .stderr()
            .contains(" attached: ")
            .then_some(())
    })?;
    let st = status(&pair.sock(0))?;
    screen.say(&format!(
        "PROTECTED after {:.2} s: {} pages in {} pre-copy rounds, the guest paused {:.1} ms",
        took.as_secs_f64(),
        st["attach"]["pages"],
        st["attach"]["rounds"],
        st["attach"]["pause_ms"].as_f64().unwrap_or(0.0)
    ));

    screen.step("Load: a counter on the serial line, a TCP conversation from host D");
    started
        .proc_mut("hostA")
        .type_input(b"/workloads/counter\n");
    screen.wait("the counter", Duration::from_secs(120), || {
        last_count(&started.proc("hostA").stdout()).filter(|&n| n >= 3)
    })?;
    started.clients.push(Client::start(
        &pair.hosts,
        3,
        &["talk", &TALK_SECONDS.to_string()],
    )?);
    screen.wait(
        "the client's first answers",
        Duration::from_secs(60),
        || {
            let p = started.clients[0].progress();
            (!p.is_empty()).then_some(())
        },
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let st = status(&pair.sock(0))?;
    screen.say(&format!(
        "guest counting (last: n={}); client: {}",
        last_count(&started.proc("hostA").stdout()).unwrap_or(0),
        started.clients[0].progress()
    ));
    screen.say(&format!(
        "pair: epoch {}, backup {:.1} ms behind, {} KiB of log sent, output held {} us (p50) before it leaves",
        st["epoch"],
        st["lag"]["vtime_ns"].as_f64().unwrap_or(0.0) / 1e6,
        st["log"]["bytes"].as_u64().unwrap_or(0) / 1024,
        st["output_latency_us"]["p50"]
    ));

    screen.step("Host A dies (SIGKILL of its ftvmm)");
    let before_count = last_count(&started.proc("hostA").stdout()).unwrap_or(0);
    let killed = Instant::now();
    started.proc("hostA").signal(libc::SIGKILL);
    let ((), _) = screen.wait(
        "host B noticing and taking over",
        Duration::from_secs(60),
        || {
            started
                .proc("hostB")
                .stderr()
                .contains("LIVE: took over")
                .then_some(())
        },
    )?;
    let takeover = killed.elapsed();
    let st = status(&pair.sock(1))?;
    let record = &st["takeovers"][0];
    screen.say(&format!(
        "host B is LIVE {:.0} ms after the kill (A's stream ended {:.0} ms after its last message; B won the lock at epoch {} and was live {:.1} ms later)",
        takeover.as_secs_f64() * 1e3,
        record["detect_ms"].as_f64().unwrap_or(0.0),
        record["epoch"],
        record["go_live_ms"].as_f64().unwrap_or(0.0)
    ));
    screen.say(&format!(
        "the counter had reached n={before_count} on host A"
    ));

    screen.step("The guest carries on from host B");
    screen.wait("the counter on host B", Duration::from_secs(120), || {
        last_count(&started.proc("hostB").stdout()).filter(|&n| n >= before_count + 10)
    })?;
    let ((ok, line), _) = screen.wait(
        "the client's conversation to finish",
        Duration::from_secs(u64::from(TALK_SECONDS) + 180),
        || started.clients[0].finished(),
    )?;
    if !ok {
        return Err(format!("the client's TCP conversation broke: {line}"));
    }
    let max_ms = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("max_ms="))
        .unwrap_or("?")
        .to_string();
    screen.say(&format!(
        "client: {line} (same connection throughout; longest wait for an answer {max_ms} ms)"
    ));
    let (a_out, b_out) = (
        started.proc("hostA").stdout(),
        started.proc("hostB").stdout(),
    );
    let joined = joins(&a_out, &b_out).into_iter().find(|s| {
        let n = numbers(s, "n=", "");
        !n.is_empty() && n[0] == 1 && consecutive(&n)
    });
    let Some(joined) = joined else {
        return Err("the counter has a gap or a wrong value across the takeover (see target/demo/hostA.serial and hostB.serial)".into());
    };
    let counted = numbers(&joined, "n=", "");
    screen.say(&format!(
        "counter: n=1..{} with no gap and no wrong value across the takeover (A printed up to {}, B from there)",
        counted.last().copied().unwrap_or(0),
        before_count
    ));

    screen.step("Re-protection: host C attaches to host B");
    let c = pair
        .ftvmm(2, "backup")
        .args([
            "--primary",
            &format!("{}:{PORT}", pair.hosts.addr(1)),
            "--serial-input",
            "none",
        ])
        .spawn();
    started.procs.push(("hostC", c));
    let ((), took) = screen.wait("live state transfer", Duration::from_secs(120), || {
        started
            .proc("hostB")
            .stderr()
            .contains(" attached: ")
            .then_some(())
    })?;
    let st = status(&pair.sock(1))?;
    if st["protected"] != serde_json::Value::Bool(true) {
        return Err(format!("host B is not protected after the attach: {st}"));
    }
    screen.say(&format!(
        "PROTECTED again after {:.2} s (epoch {}, guest paused {:.1} ms)",
        took.as_secs_f64(),
        st["epoch"],
        st["attach"]["pause_ms"].as_f64().unwrap_or(0.0)
    ));

    screen.step("A clean stop of the pair (ftvmm ctl stop)");
    ctl(&pair.sock(1), "stop")?;
    let mut codes = Vec::new();
    for name in ["hostB", "hostC"] {
        let (code, _) =
            screen.wait(&format!("{name} stopping"), Duration::from_secs(60), || {
                let p = started.proc_mut(name);
                p.exited().then(|| p.exit_code())
            })?;
        codes.push(code);
    }
    if codes != [Some(0), Some(0)] {
        return Err(format!(
            "the pair did not stop cleanly: exit statuses {codes:?}"
        ));
    }
    let (b_digest, c_digest) = (
        last_line(&started.proc("hostB").stderr()),
        last_line(&started.proc("hostC").stderr()),
    );
    if b_digest != c_digest || !b_digest.starts_with("ftvmm: exits=") {
        return Err(format!(
            "the new primary and its backup ended in different states: {b_digest} / {c_digest}"
        ));
    }
    screen.say(&format!(
        "both stopped with exit status 0 at the same point: {b_digest}"
    ));
    Ok(format!(
        "host B live {:.0} ms after host A died; the counter and the client's connection carried on with nothing lost (longest client wait {max_ms} ms); re-protected by host C",
        takeover.as_secs_f64() * 1e3
    ))
}

fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or_default().to_string()
}
