//! The operator's tools on real pairs: `ftvmm ctl` (status, stop, switchover), the Prometheus
//! endpoint, JSON logs, and the failover demo itself.
//!
//! A switchover hands the guest from the primary to the backup with nothing lost and nothing
//! repeated: the serial stream, cut where each switchover happened and put back together, is
//! the failure-free stream byte for byte; the disk holds every record the guest reported
//! synced; a TCP conversation from a client goes on throughout.

use ftvmm_tests::{
    count_break, ctl, ftvmm_bin, http_get, keep, key_file, last_synced, linux_machine,
    linux_net_ready, linux_ready, numbers, records_on_disk, root, scratch, test_guest, wait_until,
    Hosts, Pair, Proc, GUEST_IP, GUEST_MAC, LINUX_CMDLINE, LINUX_NET_CMDLINE,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ctl_json(sock: &Path, request: &[&str]) -> serde_json::Value {
    let mut args = vec!["--api-socket", sock.to_str().unwrap()];
    args.extend(request);
    let (code, out, err) = ctl(&args);
    assert_eq!(code, 0, "ctl {request:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {request:?}: {e}: {out}"))
}

#[test]
fn ctl_against_a_dead_or_foreign_socket_fails_in_one_clear_line() {
    let dir = scratch("ops-ctl-dead");
    // Nothing there.
    let missing = dir.join("missing.sock");
    let (code, out, err) = ctl(&["--api-socket", missing.to_str().unwrap(), "status"]);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach") && err.contains("is an ftvmm running"),
        "{err}"
    );
    // A socket file whose ftvmm is gone (bound, then its listener closed).
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (code, _, err) = ctl(&["--api-socket", stale.to_str().unwrap(), "status"]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    // Something that is not an ftvmm answers.
    let foreign = dir.join("foreign.sock");
    let listener = std::os::unix::net::UnixListener::bind(&foreign).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"220 smtp.example ESMTP ready\r\n");
    });
    let (code, _, err) = ctl(&["--api-socket", foreign.to_str().unwrap(), "status"]);
    server.join().unwrap();
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not an ftvmm API socket"), "{err}");
    // A wrong request never reaches a socket.
    let (code, _, err) = ctl(&["--api-socket", missing.to_str().unwrap(), "reboot"]);
    assert_eq!(code, 2, "{err}");
}

/// What both sides of a pair in `dir` take: the key file (seeded `seed`), the file lock, logs
/// at info.
fn pair_flags(dir: &Path, seed: u8) -> Vec<String> {
    let key = key_file(dir, "key", seed);
    [
        "--key-file",
        key.to_str().unwrap(),
        "--lock",
        &format!("file:{}", dir.join("pair.lock").display()),
        "--log-level",
        "info",
    ]
    .map(String::from)
    .to_vec()
}

/// A pair's flags with the `guest` test guest.
fn tiny_args(dir: &Path, guest: &str) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        test_guest(guest).display().to_string(),
    ];
    args.extend(pair_flags(dir, 41));
    args
}

/// The Prometheus endpoint of a protected primary, scraped over HTTP; and its logs as JSON.
#[test]
fn a_pair_shows_its_metrics_to_prometheus_and_logs_json() {
    let dir = scratch("ops-metrics");
    let args = tiny_args(&dir, "ticks-long");
    let sock = dir.join("p.sock");
    let pair = Pair::local()
        .args(&args)
        .primary_args(["--api-socket", sock.to_str().unwrap()])
        .primary_args(["--metrics", "127.0.0.1:0", "--log-format", "json"])
        .args(["--serial-input", "none"])
        .limits(Duration::from_secs(30), Duration::from_secs(30));
    let p = pair.primary();
    assert!(p.wait_stderr("metrics at http://", Duration::from_secs(30)));
    let listen = p
        .stderr_word_after("listening for a backup on ")
        .expect("listen address");
    let metrics = p
        .stderr_word_after("metrics at http://")
        .expect("metrics address")
        .trim_end_matches("/metrics\"}}")
        .trim_end_matches("/metrics")
        .to_string();
    let b = pair.backup(&listen);
    pair.wait_attached(&p, &b, 1);
    std::thread::sleep(Duration::from_millis(300));
    let text = http_get(&metrics, "/metrics").expect("GET /metrics");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("application/openmetrics-text"), "{text}");
    for want in [
        "ftvmm_role{role=\"primary\"} 1",
        "ftvmm_protected 1",
        "ftvmm_epoch 1",
        "ftvmm_fenced 0",
        "ftvmm_failovers_total 0",
        "# TYPE ftvmm_log_bytes counter",
        "# EOF",
    ] {
        assert!(text.contains(want), "no `{want}` in:\n{text}");
    }
    let log_bytes = metric(&text, "ftvmm_log_bytes_total");
    assert!(log_bytes > 0.0, "{text}");
    // The same figure as the status document's (scraped a moment apart: it only grows).
    let status = ctl_json(&sock, &["status"]);
    assert!(status["log"]["bytes"].as_f64().unwrap() >= log_bytes);
    // The host's findings are the probe's (vmm/src/host.rs).
    let probed = &ftvmm_tests::host()["host"];
    assert_eq!(status["host"]["kvm"], probed["kvm"], "{status}");
    for f in [
        "exact_irq_window",
        "breakpoints_cpl0",
        "dirty_log",
        "syscall",
    ] {
        assert_eq!(status["host"][f], probed[f]["ok"], "{f}: {status}");
    }
    assert!(http_get(&metrics, "/nothing")
        .expect("GET /nothing")
        .starts_with("HTTP/1.1 404"));
    // Every diagnostic line is a JSON object, up to the digest line that ends every run.
    let (p, b) = (
        p.wait(Duration::from_secs(60)),
        b.wait(Duration::from_secs(60)),
    );
    p.assert_code(0);
    b.assert_code(0);
    let lines: Vec<&str> = p.stderr.lines().collect();
    let (last, logs) = lines.split_last().unwrap();
    assert!(last.starts_with("ftvmm: exits="), "{last}");
    assert!(logs.len() >= 3, "{}", p.stderr);
    for line in logs {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Two simulated hosts running a pair; each switchover moves the primary to the other host,
/// whose old primary becomes the backup again (`--then backup`).
struct Hopper {
    hosts: Hosts,
    procs: [Proc; 2],
    socks: [PathBuf; 2],
    /// Which host runs the primary now.
    primary: usize,
    /// The serial stream as the outside world saw it, put together at each switchover.
    seen: String,
    /// How much of each process's stdout is in `seen` already.
    taken: [usize; 2],
}

impl Hopper {
    /// With `nic`, hosts 0 and 1 get a tap for the guest's NIC and host 2 an address on the
    /// guest LAN (a client).
    fn start(
        tag: &str,
        dir: &Path,
        machine: &[String],
        primary_args: &[&str],
        nic: bool,
    ) -> Hopper {
        let hosts = Hosts::new(tag, 3);
        if nic {
            hosts.add_guest_tap(0, "tapg");
            hosts.add_guest_tap(1, "tapg");
            hosts.add_guest_lan_addr(2, "10.240.0.2/16");
        }
        let socks = [dir.join("h0.sock"), dir.join("h1.sock")];
        let sides = Pair::on_hosts(&hosts)
            .args(machine)
            .primary_args(["--api-socket", socks[0].to_str().unwrap()])
            .primary_args(primary_args)
            .backup_args(["--api-socket", socks[1].to_str().unwrap()])
            .backup_args(["--serial-input", "none"])
            .start();
        Hopper {
            hosts,
            procs: [sides.p, sides.b],
            socks,
            primary: 0,
            seen: String::new(),
            taken: [0, 0],
        }
    }

    /// Hands the guest to the other host and waits until the old primary is its backup.
    fn switch(&mut self, round: usize) -> serde_json::Value {
        self.switch_with(round, &[])
    }

    /// [`Hopper::switch`] with more flags for `ctl switchover`.
    fn switch_with(&mut self, round: usize, flags: &[&str]) -> serde_json::Value {
        let (old, new) = (self.primary, 1 - self.primary);
        let attached_before = self.procs[new].stderr().matches(" attached: ").count();
        let request = [&["switchover", "--then", "backup"], flags].concat();
        let done = ctl_json(&self.socks[old], &request);
        assert_eq!(done["switchover"], "done", "round {round}: {done}");
        // The old primary's guest stopped for good before ctl returned: its output is final.
        let out = self.procs[old].stdout();
        self.seen.push_str(&out[self.taken[old]..]);
        self.taken[old] = out.len();
        self.primary = new;
        let start = Instant::now();
        while self.procs[new].stderr().matches(" attached: ").count() <= attached_before {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "round {round}: the old primary never attached as a backup:\n--- old ---\n{}\n--- new ---\n{}",
                self.procs[old].stderr(),
                self.procs[new].stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        done
    }

    /// Waits (up to `limit`) for both sides to end: each exits 0, both at the same point,
    /// neither re-emitted anything. Returns the whole serial stream.
    fn end(self, limit: Duration) -> String {
        let stream = self.stream();
        let Hopper {
            procs: [a, b],
            hosts,
            ..
        } = self;
        let (a, b) = (a.wait(limit), b.wait(limit));
        drop(hosts);
        a.assert_code(0);
        b.assert_code(0);
        assert_eq!(a.digest_line(), b.digest_line());
        assert_nothing_re_emitted(&[&a.stderr, &b.stderr]);
        stream
    }

    /// The stream up to now, the current primary's part included.
    fn stream(&self) -> String {
        let p = self.primary;
        format!("{}{}", self.seen, &self.procs[p].stdout()[self.taken[p]..])
    }
}

fn ticks_upto(out: &str) -> Option<u32> {
    let mut n = 0;
    for line in out.lines() {
        let v: u32 = line.strip_prefix("tick ")?.parse().ok()?;
        if v != n + 10 {
            return None;
        }
        n = v;
    }
    Some(n)
}

#[test]
fn switchover_back_and_forth_loses_and_repeats_nothing() {
    let dir = scratch("ops-switch-tiny");
    // A minute of guest: four switchovers fit in it on a slow host too (each re-attach probes
    // the host and copies the VM; on the stock lane ten seconds were not enough).
    let args = tiny_args(&dir, "ticks-minute");
    let mut h = Hopper::start("sw", &dir, &args, &["--serial-input", "none"], false);
    assert!(h.procs[0].wait_stdout("tick 50\n", Duration::from_secs(30)));
    let start = Instant::now();
    for round in 0..4 {
        let done = h.switch(round);
        assert!(done["pause_ms"].as_f64().unwrap() < 5000.0, "{done}");
        eprintln!(
            "round {round}: switched over and re-attached {:.1} s after the first",
            start.elapsed().as_secs_f64()
        );
    }
    // The guest ends by itself: both sides stop there with the same state.
    let status = ctl_json(&h.socks[h.primary], &["status"]);
    assert_eq!(status["switchovers"], 0, "a fresh primary counts its own");
    assert_eq!(status["epoch"], 5, "{status}");
    let start = Instant::now();
    while !h.stream().ends_with("tick 6000\n") {
        assert!(start.elapsed() < Duration::from_secs(180), "{}", h.stream());
        std::thread::sleep(Duration::from_millis(20));
    }
    let stream = h.end(Duration::from_secs(30));
    assert_eq!(
        ticks_upto(&stream),
        Some(6000),
        "the stream across four switchovers is not the failure-free one:\n{stream}"
    );
}

/// A switchover re-emits nothing: the old primary released everything before it handed over.
fn assert_nothing_re_emitted(logs: &[&str]) {
    for line in logs.iter().flat_map(|l| l.lines()) {
        if line.contains("re-emitted") {
            assert!(
                line.contains(": 0 serial bytes, 0 frames, 0 disk writes"),
                "{line}"
            );
        }
    }
}

/// A Linux pair on two simulated hosts with a NIC each (host 2 is a client on the guest LAN),
/// restored from the networked snapshot, `command` typed at its shell.
fn linux_hopper(tag: &str, dir: &Path, command: &str, started: &str) -> Option<(Hopper, PathBuf)> {
    let ready = linux_net_ready()?;
    let disk = dir.join("disk.img");
    std::fs::copy(&ready.disk, &disk).unwrap();
    let mut machine = linux_machine(LINUX_NET_CMDLINE, &disk)?;
    machine.extend(["--net".to_string(), format!("tap=tapg,mac={GUEST_MAC}")]);
    machine.extend(pair_flags(dir, 42));
    let snap = ready.snapshot.to_str().unwrap();
    let mut h = Hopper::start(
        tag,
        dir,
        &machine,
        &["--restore", snap, "--serial-input", "-"],
        true,
    );
    h.procs[0].type_input(format!("{command}\n").as_bytes());
    assert!(
        h.procs[0].wait_stdout(started, Duration::from_secs(120)),
        "{}",
        h.procs[0].stdout()
    );
    Some((h, disk))
}

/// A client on host 2 talking to the guest's echo service over one TCP connection for `secs`
/// seconds, every answer checked (tests/net_client.py `talk`).
fn talk(h: &Hopper, dir: &Path, secs: u32) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", h.hosts.ns(2), "python3"])
        .arg(root().join("tests/net_client.py"))
        .args([GUEST_IP, "talk", &secs.to_string()])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("client.progress")).unwrap())
        .spawn()
        .expect("client")
}

/// The end of [`talk`]: its result line; panics (with both sides' logs kept in `dir`) when the
/// conversation broke.
fn talked(client: std::process::Child, h: &Hopper, dir: &Path) -> String {
    let out = client.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        for (i, p) in h.procs.iter().enumerate() {
            keep(dir, &format!("h{i}.log"), &p.stderr());
        }
        panic!(
            "the client's conversation broke: {said} (logs in {})",
            dir.display()
        );
    }
    eprintln!("client: {said}");
    said
}

/// Ten switchovers, `pause` apart, every other one pausing the guest at once (`--converge 0`)
/// rather than running it at half speed until the backup caught up first; returns the pauses
/// (ms).
fn hop_ten_times(h: &mut Hopper, pause: Duration) -> Vec<f64> {
    let mut pauses = Vec::new();
    for round in 0..10 {
        std::thread::sleep(pause);
        let at_once = round % 2 == 1;
        let done = h.switch_with(round, if at_once { &["--converge", "0"] } else { &[] });
        if at_once {
            assert_eq!(done["converge_ms"], 0.0, "round {round}: {done}");
            assert_eq!(done["converged"], false, "round {round}: {done}");
        } else {
            assert!(done["converge_ms"].is_f64(), "round {round}: {done}");
        }
        pauses.push(done["pause_ms"].as_f64().unwrap());
    }
    eprintln!("switchover pauses (ms): {pauses:.1?}");
    pauses
}

/// A clean stop of the pair: both sides end at the same point; returns the whole serial stream.
fn stop_pair(h: Hopper) -> String {
    let _ = ctl_json(&h.socks[h.primary], &["stop"]);
    h.end(Duration::from_secs(60))
}

/// Ten switchovers of a Linux guest writing and syncing disk records (each reported on the
/// serial line) while a client on a third host talks to it over one TCP connection: the
/// stream has every record once and in order, the disk holds every record reported synced
/// (the failover tests' checks), and the conversation lives through all ten with every answer
/// right (the network under disk load, issue 22).
#[test]
fn linux_diskwrite_survives_ten_switchovers() {
    let dir = scratch("ops-switch-disk");
    let Some((mut h, disk)) = linux_hopper("swd", &dir, "/workloads/diskwrite", "record 2 synced")
    else {
        return;
    };
    let client = talk(&h, &dir, 30);
    hop_ten_times(&mut h, Duration::from_millis(1500));
    talked(client, &h, &dir);
    // The workload goes on after the ten switchovers: a record past every one reported so far
    // (a liveness check with a generous limit, not a speed).
    let before = format!(
        "{}{}",
        h.seen,
        &h.procs[h.primary].stdout()[h.taken[h.primary]..]
    );
    let next = last_synced(&before) + 1;
    assert!(
        h.procs[h.primary].wait_stdout(&format!("record {next} synced"), Duration::from_secs(300)),
        "the workload did not go on after the switchovers: no record {next}:\n{before}"
    );
    let stream = stop_pair(h);
    let synced = numbers(&stream, "record ", " synced");
    if let Some(why) = count_break(&synced) {
        panic!(
            "the record lines across the switchovers: {why} (the stream is in {})",
            keep(&dir, "stream.txt", &stream).display()
        );
    }
    let last = *synced.last().unwrap();
    let on_disk = records_on_disk(&disk);
    assert!(
        on_disk >= last,
        "the client saw record {last} synced, the disk holds 1..{on_disk}"
    );
}

/// Ten switchovers of a Linux guest counting on its serial line while a client on a third host
/// talks to it over one TCP connection: the counter has no gap and no repeat, every answer
/// the client got was right, and the connection lives through all ten.
#[test]
fn linux_counter_and_a_tcp_conversation_survive_ten_switchovers() {
    let dir = scratch("ops-switch-net");
    let Some((mut h, _)) = linux_hopper("swn", &dir, "/workloads/counter", "n=3\r\n") else {
        return;
    };
    let client = talk(&h, &dir, 40);
    hop_ten_times(&mut h, Duration::from_millis(1500));
    talked(client, &h, &dir);
    let stream = stop_pair(h);
    let n = numbers(&stream, "n=", "");
    if let Some(why) = count_break(&n) {
        panic!(
            "the counter across the switchovers: {why} (the stream is in {})",
            keep(&dir, "stream.txt", &stream).display()
        );
    }
}

/// `ftvmm ctl --api-socket SOCK console` in the background, driven through pipes as a script
/// would: what it prints is collected as it comes.
struct ConsoleSession {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl ConsoleSession {
    fn attach(sock: &Path) -> ConsoleSession {
        let mut child = Command::new(ftvmm_bin())
            .args(["ctl", "--api-socket", sock.to_str().unwrap(), "console"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ftvmm ctl console");
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut from, into) = (child.stdout.take().unwrap(), out.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        ConsoleSession { child, out }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, marker: &str, limit: Duration) -> bool {
        wait_until(limit, Duration::from_millis(20), || {
            self.output().contains(marker)
        })
    }

    fn type_input(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Detaches with Ctrl-]; the exit status and what ctl said on stderr.
    fn detach(mut self) -> (i32, String) {
        self.type_input(b"\x1d");
        let out = self.child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The guest's console through the API socket: a session types a command at the Linux guest's
/// shell and reads the answer, which stdout shows too (the same output rule); a backup that
/// follows refuses a console; after a SIGKILL of the primary the new primary's console shows
/// the recent output where the old one stopped and takes commands.
#[test]
fn a_console_on_the_api_socket_types_at_the_shell_before_and_after_a_takeover() {
    let Some(ready) = linux_ready() else { return };
    let dir = scratch("ops-console");
    let disk = dir.join("disk.img");
    std::fs::copy(&ready.disk, &disk).unwrap();
    let (psock, bsock) = (dir.join("p.sock"), dir.join("b.sock"));
    let Some(machine) = linux_machine(LINUX_CMDLINE, &disk) else {
        return;
    };
    let pair = Pair::local()
        .args(machine)
        .args(pair_flags(&dir, 43))
        .args(["--serial-input", "none"])
        .primary_args(["--restore", ready.snapshot.to_str().unwrap()])
        .primary_args(["--api-socket", psock.to_str().unwrap()])
        .backup_args(["--api-socket", bsock.to_str().unwrap()])
        .limits(Duration::from_secs(60), Duration::from_secs(120));
    let sides = pair.start();
    let (p, b) = (sides.p, sides.b);

    // A backup that follows has no console of its own: one clear refusal.
    assert!(wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || bsock.exists()
    ));
    let (code, _, err) = ctl(&["--api-socket", bsock.to_str().unwrap(), "console"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("backup following its primary"), "{err}");

    let mut c = ConsoleSession::attach(&psock);
    // `echo con$((6*7))sole` echoes as typed; only the shell's answer says con42sole.
    c.type_input(b"echo con$((6*7))sole\r");
    assert!(
        c.wait_for("con42sole", Duration::from_secs(60)),
        "no answer on the console:\n{}\n--- primary ---\n{}",
        c.output(),
        p.stderr()
    );
    assert!(
        p.wait_stdout("con42sole", Duration::from_secs(10)),
        "the console showed what stdout did not:\n{}",
        p.stdout()
    );
    let (code, err) = c.detach();
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("detach with Ctrl-]") && err.contains("detached"),
        "{err}"
    );

    // The primary's host dies; the backup goes live, and its console goes on where the old
    // one was: the recent output has the answer, and the shell answers it.
    p.signal(libc::SIGKILL);
    let p = p.wait(Duration::from_secs(10));
    assert!(
        b.wait_stderr("LIVE: took over", Duration::from_secs(60)),
        "the backup never went live:\n{}",
        b.stderr()
    );
    let mut c = ConsoleSession::attach(&bsock);
    assert!(
        c.wait_for("con42sole", Duration::from_secs(10)),
        "the new primary's console did not show the recent output:\n{}",
        c.output()
    );
    c.type_input(b"echo after$((6*7))takeover\r");
    assert!(
        c.wait_for("after42takeover", Duration::from_secs(60)),
        "no answer on the new primary's console:\n{}\n--- new primary ---\n{}",
        c.output(),
        b.stderr()
    );
    assert!(b.wait_stdout("after42takeover", Duration::from_secs(10)));
    // Input from a console is the guest's serial input like any: recorded, so the command
    // the old primary's console typed is in what the backup replayed (its answer is the old
    // primary's output, and the new primary's console showed it).
    assert!(p.stdout.contains("con42sole"), "{}", p.stdout);
    let (code, err) = c.detach();
    assert_eq!(code, 0, "{err}");
    ctl_json(&bsock, &["stop"]);
    b.wait(Duration::from_secs(60)).assert_code(0);
}

/// The README's first command ends with this demo: it must pass here too.
#[test]
fn the_failover_demo_passes() {
    // Boots (or finds) the networked snapshot here first, so that the demo's process and this
    // one never boot it into the same cache at once.
    if linux_net_ready().is_none() {
        return;
    }
    let demo = ftvmm_bin().with_file_name("ftvmm-demo");
    assert!(
        demo.exists(),
        "{} not built (cargo build --release --workspace --bins)",
        demo.display()
    );
    let out = Command::new(&demo).output().expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the demo failed ({:?}):\n{text}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("CLEAN TAKEOVER"), "{text}");
    // It left nothing behind: no namespace of its own.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains("-demo-"),
        "the demo left namespaces behind"
    );
}
