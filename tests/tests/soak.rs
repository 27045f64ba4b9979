//! The soak (`scripts/soak`): a pair of the networked Linux guest under a mixed load (the guest
//! counts on its serial line and appends synced records to its disk; a client on the guest LAN
//! holds one TCP conversation open the whole time), through a long random series of events:
//! SIGKILL of the primary's host or the backup's, a partition of either side's pair link, a
//! planned switchover, CPU hogs beside the pair, a backup starved (stopped, then resumed).
//! After every event the pair is re-protected (a backup attached again, on a free host) and the
//! client-visible invariants are checked:
//! - the serial stream, as the outside world saw it across every primary, counts `n=1, 2, 3...`
//!   with no gap and no repeat, and its `record N synced` lines count up from 1 the same way;
//! - every record the client saw synced is on the disk;
//! - the workload goes on (it makes progress within a generous limit: a liveness check, not a
//!   speed);
//! - the TCP conversation is alive, each answer checked by the client (`tests/net_client.py`).
//!
//! Ignored in the suite; `scripts/soak --minutes N [--seed S]` runs it (FTVMM_SOAK_MINUTES,
//! FTVMM_SOAK_SEED), printing one line per event and a summary; it fails at the first invariant
//! broken, naming the event, the seed and where the stream broke.

use ftvmm_tests::{
    count_break, ctl, joins, key_file, linux_machine, linux_net_ready, numbers, records_on_disk,
    root, scratch, wait_until, Hosts, Pair, Proc, GUEST_IP, GUEST_MAC, LINUX_NET_CMDLINE,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Hosts 0-2 run sides of the pair; host 3 is the client.
const SIDES: usize = 3;
const CLIENT: usize = 3;
/// How long the workload gets to show progress after an event, and a backup to attach.
const LIMIT: Duration = Duration::from_secs(300);

/// A small deterministic generator (xorshift64*): the seed reproduces a soak's events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    KillPrimaryHost,
    KillBackupHost,
    PartitionPrimary,
    PartitionBackup,
    Switchover,
    Hogs,
    StarveBackup,
}

const EVENTS: [Event; 7] = [
    Event::KillPrimaryHost,
    Event::KillBackupHost,
    Event::PartitionPrimary,
    Event::PartitionBackup,
    Event::Switchover,
    Event::Hogs,
    Event::StarveBackup,
];

/// One side of the pair: its host, its process, and how much of its stdout is in the stream
/// already (a side that was primary before a switchover, and may be again).
struct Side {
    host: usize,
    proc: Proc,
    taken: usize,
}

impl Side {
    fn new(host: usize, proc: Proc) -> Side {
        Side {
            host,
            proc,
            taken: 0,
        }
    }

    /// What it printed since it last became primary.
    fn output(&self) -> String {
        self.proc
            .stdout()
            .get(self.taken..)
            .unwrap_or("")
            .to_string()
    }
}

/// Where the client-visible stream stands: the last counter value and the last synced record.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    counter: u64,
    synced: u64,
    answers: u64,
}

struct Soak {
    /// Sides that ended so far (their logs are kept in the scratch directory).
    ended: usize,
    hosts: Hosts,
    /// The flags every side takes (machine, key, lock).
    flags: Vec<String>,
    disk: PathBuf,
    dir: PathBuf,
    primary: Side,
    backup: Option<Side>,
    /// The serial stream the outside world saw from primaries that have ended, joined.
    seen: String,
    client: Child,
    client_log: PathBuf,
    /// Counts for the summary.
    takeovers: usize,
    fenced: usize,
    reprotects: usize,
    longest_reprotect: Duration,
}

fn sock(dir: &Path, host: usize) -> PathBuf {
    dir.join(format!("h{host}.sock"))
}

/// The counter and record lines of `stream`, checked: the count 1, 2, 3... each (either may
/// not have begun yet).
fn check_stream(stream: &str) -> Result<Progress, String> {
    let n = numbers(stream, "n=", "");
    if !n.is_empty() {
        if let Some(why) = count_break(&n) {
            return Err(format!("the counter: {why}"));
        }
    }
    let r = numbers(stream, "record ", " synced");
    if !r.is_empty() {
        if let Some(why) = count_break(&r) {
            return Err(format!("the synced records: {why}"));
        }
    }
    Ok(Progress {
        counter: n.last().copied().unwrap_or(0),
        synced: r.last().copied().unwrap_or(0),
        answers: 0,
    })
}

/// `before` and `after` joined (the new primary may repeat the last bytes of the old one's
/// output) the one way that keeps the counts whole; the reason when no way does.
fn join_checked(before: &str, after: &str) -> Result<(String, Progress), String> {
    let mut why = String::new();
    for s in joins(before, after) {
        match check_stream(&s) {
            Ok(p) => return Ok((s, p)),
            Err(e) => why = e,
        }
    }
    Err(why)
}

impl Soak {
    fn start(dir: &Path) -> Option<Soak> {
        let ready = linux_net_ready()?;
        let disk = dir.join("disk.img");
        std::fs::copy(&ready.disk, &disk).unwrap();
        let key = key_file(dir, "key", 77);
        let hosts = Hosts::new("sk", SIDES + 1);
        for h in 0..SIDES {
            hosts.add_guest_tap(h, "tapg");
        }
        hosts.add_guest_lan_addr(CLIENT, "10.240.0.2/16");
        let mut flags = linux_machine(LINUX_NET_CMDLINE, &disk)?;
        flags.extend([
            "--net".to_string(),
            format!("tap=tapg,mac={GUEST_MAC}"),
            "--log-level".to_string(),
            "info".to_string(),
            "--key-file".to_string(),
            key.display().to_string(),
            "--lock".to_string(),
            format!("file:{}", dir.join("pair.lock").display()),
        ]);
        let pair = Pair::on_hosts(&hosts).args(&flags);
        let mut p = pair
            .primary_args(["--restore", ready.snapshot.to_str().unwrap()])
            .primary_args(["--serial-input", "-"])
            .primary_args(["--api-socket", sock(dir, 0).to_str().unwrap()])
            .primary_on(0);
        Pair::on_hosts(&hosts).wait_listening(&p);
        p.type_input(b"/workloads/diskwrite & /workloads/counter\n");
        let client_log = dir.join("client.log");
        let client = talk(&hosts, &client_log, 365 * 24 * 3600);
        let mut soak = Soak {
            hosts,
            flags,
            disk,
            dir: dir.to_path_buf(),
            primary: Side::new(0, p),
            backup: None,
            seen: String::new(),
            client,
            client_log,
            ended: 0,
            takeovers: 0,
            fenced: 0,
            reprotects: 0,
            longest_reprotect: Duration::ZERO,
        };
        soak.reprotect().expect("the first backup");
        Some(soak)
    }

    fn pair(&self) -> Pair<'_> {
        Pair::on_hosts(&self.hosts)
            .args(&self.flags)
            .limits(LIMIT, LIMIT)
    }

    /// A host that runs no side now; each re-protection starts looking at the next host, so
    /// that a host that just died (and came back) is not always the one chosen.
    fn free_host(&self, attempt: usize) -> usize {
        (0..SIDES)
            .map(|i| (i + self.reprotects + attempt) % SIDES)
            .find(|h| *h != self.primary.host && self.backup.as_ref().is_none_or(|b| b.host != *h))
            .expect("three hosts, two sides")
    }

    /// Starts a backup on a free host and waits until it attached, trying again with backoff
    /// (as an operator's supervisor would) for up to [`LIMIT`]: right after a backup's host died
    /// the primary still holds it until the silence tells, and refuses a second one.
    fn reprotect(&mut self) -> Result<(), String> {
        let start = Instant::now();
        let mut attempt = 0;
        let mut last = String::new();
        while start.elapsed() < LIMIT {
            let host = self.free_host(attempt);
            let attached = self.primary.proc.stderr().matches(" attached: ").count();
            let b = self
                .pair()
                .backup_args(["--serial-input", "none"])
                .backup_args(["--api-socket", sock(&self.dir, host).to_str().unwrap()])
                .backup_on(host, &self.pair().addr(self.primary.host));
            let mut b = Side::new(host, b);
            let ok = wait_until(LIMIT, Duration::from_millis(20), || {
                self.primary.proc.stderr().matches(" attached: ").count() > attached
                    || b.proc.exited()
            });
            if ok && !b.proc.exited() {
                self.backup = Some(b);
                self.reprotects += 1;
                self.longest_reprotect = self.longest_reprotect.max(start.elapsed());
                eprintln!(
                    "soak:   a backup attached on host {host} (pid {}, try {})",
                    self.backup.as_ref().map_or(0, |b| b.proc.pid()),
                    attempt + 1
                );
                return Ok(());
            }
            let run = b.proc.wait(Duration::from_secs(10));
            self.keep(host, "refused", &run);
            last = format!(
                "host {host}, status {:?}: {}",
                run.status,
                run.stderr.lines().last().unwrap_or("")
            );
            eprintln!(
                "soak:   a backup did not attach (try {}): {last}",
                attempt + 1
            );
            self.settle()?;
            attempt += 1;
            std::thread::sleep(Duration::from_millis(250 << attempt.min(4)));
        }
        Err(format!(
            "no backup attached in {LIMIT:?} ({attempt} tries; the last: {last})"
        ))
    }

    /// Keeps the stderr of a side that ended in the scratch directory: `ended-K-hHOST-ROLE.log`.
    fn keep(&mut self, host: usize, role: &str, run: &ftvmm_tests::Run) {
        self.ended += 1;
        let path = self
            .dir
            .join(format!("ended-{}-h{host}-{role}.log", self.ended));
        let _ = std::fs::write(path, format!("status {:?}\n{}", run.status, run.stderr));
    }

    /// The live sides' logs, for a failure message.
    fn sides_now(&self) -> String {
        let mut out = format!(
            "--- primary (host {}, pid {}) ---\n{}",
            self.primary.host,
            self.primary.proc.pid(),
            tail(&self.primary.proc.stderr(), 25)
        );
        if let Some(b) = &self.backup {
            out += &format!(
                "\n--- backup (host {}, pid {}) ---\n{}",
                b.host,
                b.proc.pid(),
                tail(&b.proc.stderr(), 25)
            );
        }
        out
    }

    /// Takes note of sides that ended: a primary that ended hands over to its backup, which
    /// must go live; a backup that ended is gone.
    fn settle(&mut self) -> Result<(), String> {
        if let Some(b) = self.backup.as_mut() {
            if b.proc.exited() && !self.primary.proc.exited() {
                let b = self.backup.take().unwrap();
                let run = b.proc.wait(Duration::from_secs(10));
                self.keep(b.host, "backup", &run);
                eprintln!(
                    "soak:   the backup on host {} ended ({:?}): {}",
                    b.host,
                    run.status,
                    run.reason().unwrap_or("")
                );
                self.fenced += usize::from(run.status.and_then(|s| s.code()) == Some(5));
            }
        }
        if !self.primary.proc.exited() {
            return Ok(());
        }
        let Some(b) = self.backup.take() else {
            return Err(format!(
                "the primary on host {} ended with no backup:\n{}",
                self.primary.host,
                self.primary.proc.stderr()
            ));
        };
        let live = wait_until(LIMIT, Duration::from_millis(20), || {
            b.proc.stderr().contains("LIVE: took over")
        });
        let old = std::mem::replace(&mut self.primary, b);
        let taken = old.taken;
        let run = old.proc.wait(Duration::from_secs(10));
        self.keep(old.host, "primary", &run);
        let stdout = run.stdout.get(taken..).unwrap_or("");
        if !live {
            return Err(format!(
                "the primary on host {} ended ({:?}) and its backup never went live:\n{}",
                old.host,
                run.status,
                self.primary.proc.stderr()
            ));
        }
        eprintln!(
            "soak:   the primary on host {} ended ({:?}); host {} took over",
            old.host, run.status, self.primary.host
        );
        self.takeovers += 1;
        self.fenced += usize::from(run.status.and_then(|s| s.code()) == Some(5));
        let (joined, _) = join_checked(&self.seen, stdout)
            .map_err(|e| format!("the stream of the primary on host {} breaks: {e}", old.host))?;
        self.seen = joined;
        Ok(())
    }

    /// The invariants now: the whole stream checked, every synced record on the disk, the
    /// client's conversation alive.
    fn check(&mut self) -> Result<Progress, String> {
        let (_, mut p) = join_checked(&self.seen, &self.primary.output())?;
        let on_disk = records_on_disk(&self.disk);
        if on_disk < p.synced {
            return Err(format!(
                "the client saw record {} synced, the disk holds 1..{on_disk}",
                p.synced
            ));
        }
        if let Ok(Some(status)) = self.client.try_wait() {
            return Err(format!(
                "the client's conversation ended ({status}): {}",
                std::fs::read_to_string(&self.client_log).unwrap_or_default()
            ));
        }
        p.answers = answers(&self.client_log);
        Ok(p)
    }

    /// Waits until the counter, the records and the answers all went past `from`. A side may
    /// end meanwhile (a takeover the load caused: not unsafe, the lock decides): the stream
    /// goes on from the survivor, re-protected.
    fn progress_past(&mut self, from: Progress) -> Result<Progress, String> {
        let start = Instant::now();
        loop {
            self.settle()?;
            if self.backup.is_none() {
                self.reprotect()?;
            }
            let now = self.check()?;
            if now.counter >= from.counter + 5
                && now.synced > from.synced
                && now.answers > from.answers
            {
                return Ok(now);
            }
            if start.elapsed() > LIMIT {
                return Err(format!(
                    "no progress in {LIMIT:?}: from {from:?} to {now:?}\n--- primary (host {}) ---\n{}",
                    self.primary.host,
                    tail(&self.primary.proc.stderr(), 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn event(&mut self, e: Event, rng: &mut Rng) -> Result<String, String> {
        match e {
            Event::KillPrimaryHost | Event::KillBackupHost => {
                let side = if e == Event::KillPrimaryHost {
                    &self.primary
                } else {
                    self.backup.as_ref().ok_or("no backup")?
                };
                // The host dies: first its link, so that nothing (no FIN) leaves it, then
                // the process. It comes back (healed) as a free host.
                let host = side.host;
                self.hosts.cut(host);
                side.proc.signal(libc::SIGKILL);
                let _ = wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
                    if e == Event::KillPrimaryHost {
                        self.primary.proc.exited()
                    } else {
                        self.backup.as_mut().is_none_or(|b| b.proc.exited())
                    }
                });
                self.settle()?;
                self.hosts.heal(host);
                Ok(format!("host {host} killed"))
            }
            Event::PartitionPrimary | Event::PartitionBackup => {
                let host = if e == Event::PartitionPrimary {
                    self.primary.host
                } else {
                    self.backup.as_ref().ok_or("no backup")?.host
                };
                self.hosts.cut(host);
                // One side stops (it lost the lock or its primary); the other goes on.
                let one_ended = wait_until(LIMIT, Duration::from_millis(20), || {
                    self.primary.proc.exited()
                        || self.backup.as_mut().is_some_and(|b| b.proc.exited())
                });
                // A moment for the loser to stop if both raced.
                std::thread::sleep(Duration::from_secs(2));
                self.settle()?;
                self.hosts.heal(host);
                if !one_ended {
                    return Err(format!("host {host} cut off and neither side stopped"));
                }
                Ok(format!(
                    "host {host} cut off; host {} live",
                    self.primary.host
                ))
            }
            Event::Switchover => {
                let b = self.backup.as_ref().ok_or("no backup")?;
                let (old, new) = (self.primary.host, b.host);
                let attached = b.proc.stderr().matches(" attached: ").count();
                let s = sock(&self.dir, old);
                let (code, out, err) = ctl(&[
                    "--api-socket",
                    s.to_str().unwrap(),
                    "switchover",
                    "--then",
                    "backup",
                ]);
                if out.contains("no backup to hand over to") {
                    // The backup ended between the last look and the request (a false
                    // suspicion under load): not a fault of the switchover.
                    self.settle()?;
                    return Ok(format!(
                        "switchover {old} -> {new} refused: the backup had ended"
                    ));
                }
                if code != 0 || !out.contains("\"done\"") {
                    return Err(format!("switchover refused ({code}): {out}{err}"));
                }
                // The old primary's output is final: it released everything before it handed
                // over, and re-emits nothing.
                let (joined, _) = join_checked(&self.seen, &self.primary.output())?;
                self.seen = joined;
                let b = self.backup.take().unwrap();
                let mut old_side = std::mem::replace(&mut self.primary, b);
                old_side.taken = old_side.proc.stdout().len();
                self.backup = Some(old_side);
                let ok = wait_until(LIMIT, Duration::from_millis(20), || {
                    self.primary.proc.stderr().matches(" attached: ").count() > attached
                });
                if !ok {
                    self.settle()?;
                    return Ok(format!(
                        "switchover {old} -> {new}; the old primary did not re-attach"
                    ));
                }
                Ok(format!("switchover {old} -> {new}"))
            }
            Event::Hogs => {
                let n = 2 + rng.below(3);
                let mut hogs: Vec<Child> = (0..n)
                    .map(|_| {
                        Command::new("sh")
                            .args(["-c", "while :; do :; done"])
                            .spawn()
                            .expect("a CPU hog")
                    })
                    .collect();
                std::thread::sleep(Duration::from_secs(20 + rng.below(20)));
                for h in hogs.iter_mut() {
                    let _ = h.kill();
                    let _ = h.wait();
                }
                self.settle()?;
                Ok(format!("{n} CPU hogs"))
            }
            Event::StarveBackup => {
                let b = self.backup.as_ref().ok_or("no backup")?;
                let host = b.host;
                let ms = 500 + rng.below(2500);
                b.proc.signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(ms));
                b.proc.signal(libc::SIGCONT);
                std::thread::sleep(Duration::from_secs(3));
                self.settle()?;
                Ok(format!("backup on host {host} stopped {ms} ms"))
            }
        }
    }
}

/// The answers the client reported last (its progress lines: `talk: N answers, ...`).
fn answers(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("talk: ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The client's conversation with the guest: echo requests back to back on one connection for
/// `seconds`, each answer checked; its output in `log`.
fn talk(hosts: &Hosts, log: &Path, seconds: u64) -> Child {
    let out = std::fs::File::create(log).expect("client log");
    Command::new("ip")
        .args(["netns", "exec", hosts.ns(CLIENT), "python3"])
        .arg(root().join("tests/net_client.py"))
        .args([GUEST_IP, "talk", &seconds.to_string()])
        .stdout(out.try_clone().expect("client log"))
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("run the test client")
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

#[test]
#[ignore = "long: scripts/soak runs it"]
fn soak() {
    let minutes = env_u64("FTVMM_SOAK_MINUTES").unwrap_or(10);
    let seed = env_u64("FTVMM_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    eprintln!("soak: {minutes} min, seed {seed} (FTVMM_SOAK_SEED={seed} repeats the events)");
    let mut rng = Rng(seed);
    let dir = scratch("soak");
    let Some(mut soak) = Soak::start(&dir) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(minutes * 60);
    let mut counts = [0usize; EVENTS.len()];
    let mut at = soak
        .progress_past(Progress::default())
        .unwrap_or_else(|e| panic!("soak: the workload never started: {e}"));
    let mut n = 0;
    while Instant::now() < deadline {
        let i = rng.below(EVENTS.len() as u64) as usize;
        let e = EVENTS[i];
        let started = Instant::now();
        // A side may have ended between events (a takeover the load caused).
        let result = soak
            .settle()
            .and_then(|()| match soak.backup {
                None => soak.reprotect(),
                Some(_) => Ok(()),
            })
            .and_then(|()| soak.event(e, &mut rng))
            .and_then(|what| {
                if soak.backup.is_none() {
                    soak.reprotect()?;
                }
                Ok(what)
            })
            .and_then(|what| Ok((what, soak.progress_past(at)?)));
        match result {
            Ok((what, now)) => {
                n += 1;
                counts[i] += 1;
                eprintln!(
                    "soak: event {n} ({:?}) {what}: {:.1} s; counter {} synced {} answers {}; primary on host {}",
                    e,
                    started.elapsed().as_secs_f64(),
                    now.counter,
                    now.synced,
                    now.answers,
                    soak.primary.host
                );
                at = now;
            }
            Err(why) => panic!(
                "soak: event {} ({e:?}, seed {seed}) broke an invariant: {why}\n{}\n(the scratch directory {} has the client's log and the logs of the sides that ended)",
                n + 1,
                soak.sides_now(),
                dir.display()
            ),
        }
        // The load runs undisturbed for a while between events.
        std::thread::sleep(Duration::from_secs(5 + rng.below(10)));
    }
    let _ = soak.client.kill();
    let _ = soak.client.wait();
    eprintln!(
        "soak: {n} events survived in {minutes} min (seed {seed}): {}; {} takeovers, {} sides fenced, {} re-protections (longest {:.1} s); counter {}, records {}, answers {}; no invariant broken",
        EVENTS
            .iter()
            .zip(counts)
            .map(|(e, c)| format!("{e:?} {c}"))
            .collect::<Vec<_>>()
            .join(", "),
        soak.takeovers,
        soak.fenced,
        soak.reprotects,
        soak.longest_reprotect.as_secs_f64(),
        at.counter,
        at.synced,
        at.answers
    );
}
