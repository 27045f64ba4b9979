//! Failover on simulated hosts: each host is a network namespace (tests/src/net.rs `Hosts`), the
//! primary on host 0 and the backup on host 1, joined by a bridge; the lock is a file both see
//! (the shared filesystem) or a real etcd (Debian's etcd-server) on a third host. "Kill a host"
//! is SIGKILL of its ftvmm; "partition" takes its link down while both still reach the lock.
//!
//! What the client sees on the serial line is the primary's output until it dies, then the new
//! primary's: together they must be the failure-free stream, with no gap and at most a small
//! duplicated tail (output the old primary may or may not have released is sent again).
//!
//! `FTVMM_FAILOVER_TRIALS=N` runs N kill trials of each Linux workload instead of the default.

use ftvmm_tests::{
    assert_counter_across, assert_synced_records_kept, assert_ticks_across, ctl_status, joins,
    json_number, key_file, linux_machine, linux_ready, scratch, test_guest, ticks_upto, trials,
    wait_until, Etcd, Hosts, Pair, Proc, Run, Sides, LINUX_CMDLINE,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A pair on `hosts` with the key seeded `seed`, the lock `lock`, logging at info.
fn pair<'h>(hosts: &'h Hosts, dir: &Path, seed: u8, lock: &str) -> Pair<'h> {
    Pair::on_hosts(hosts)
        .key(&key_file(dir, "key", seed))
        .lock(lock)
        .args(["--log-level", "info"])
        .limits(Duration::from_secs(30), Duration::from_secs(90))
}

fn wait_live(b: &Proc) {
    assert!(
        b.wait_stderr("LIVE: took over", Duration::from_secs(60)),
        "the backup never went live:\n{}",
        b.stderr()
    );
}

fn tiny_pair<'h>(hosts: &'h Hosts, dir: &Path, lock: &str) -> Pair<'h> {
    pair(hosts, dir, 21, lock).args([
        "--kernel",
        test_guest("ticks-long").to_str().unwrap(),
        "--serial-input",
        "none",
    ])
}

fn file_lock(dir: &Path) -> String {
    format!("file:{}", dir.join("pair.lock").display())
}

#[test]
fn killing_the_primary_host_hands_the_guest_to_the_backup() {
    let dir = scratch("fo-kill-primary");
    let hosts = Hosts::new("kp", 2);
    let pair = tiny_pair(&hosts, &dir, &file_lock(&dir));
    let Sides { p, b, .. } = pair.start();
    assert!(p.wait_stdout("tick 200\n", Duration::from_secs(30)));
    p.signal(libc::SIGKILL);
    let p = p.wait(Duration::from_secs(10));
    wait_live(&b);
    let b = b.wait(Duration::from_secs(60));
    b.assert_code(0);
    assert_ticks_across(&p.stdout, &b.stdout, 1000);
    let lock = std::fs::read(dir.join("pair.lock")).unwrap();
    assert_eq!(&lock[..8], b"FTVMLOCK");
}

#[test]
fn killing_the_backup_host_leaves_the_primary_running_and_a_new_backup_attaches() {
    let dir = scratch("fo-kill-backup");
    let hosts = Hosts::new("kb", 3);
    let sock = dir.join("p.sock");
    let pair = tiny_pair(&hosts, &dir, &file_lock(&dir))
        .primary_args(["--api-socket", sock.to_str().unwrap()]);
    let Sides { p, b, .. } = pair.start();
    assert!(p.wait_stdout("tick 100\n", Duration::from_secs(30)));
    b.signal(libc::SIGKILL);
    let _ = b.wait(Duration::from_secs(10));
    assert!(
        p.wait_stderr("won the lock at epoch 2", Duration::from_secs(10)),
        "{}",
        p.stderr()
    );
    let shown = p.stdout().len();
    std::thread::sleep(Duration::from_millis(500));
    assert!(p.stdout().len() > shown, "the primary's output stopped");
    let b2 = pair.backup_on(2, &pair.addr(0));
    pair.wait_attached(&p, &b2, 2);
    let status = ctl_status(&sock);
    assert_eq!(json_number(&status, "epoch"), Some(2), "{status}");
    assert!(status.contains("\"protected\": true"), "{status}");
    let (p, b2) = (
        p.wait(Duration::from_secs(60)),
        b2.wait(Duration::from_secs(60)),
    );
    p.assert_code(0);
    b2.assert_code(0);
    assert_eq!(p.digest_line(), b2.digest_line());
    assert_eq!(ticks_upto(&p.stdout), Some(1000), "{}", p.stdout);
}

#[test]
fn a_primary_stopped_past_the_timeout_finds_its_backup_live_and_emits_nothing() {
    let dir = scratch("fo-sigstop");
    let hosts = Hosts::new("ss", 2);
    let pair = tiny_pair(&hosts, &dir, &file_lock(&dir));
    let Sides { p, b, .. } = pair.start();
    assert!(p.wait_stdout("tick 100\n", Duration::from_secs(30)));
    p.signal(libc::SIGSTOP);
    let frozen = p.stdout();
    wait_live(&b);
    p.signal(libc::SIGCONT);
    let p = p.wait(Duration::from_secs(30));
    assert_eq!(
        p.code(),
        5,
        "the old primary did not stop fenced:\n{}",
        p.stderr
    );
    assert_eq!(
        p.stdout, frozen,
        "the old primary emitted output after it lost the lock"
    );
    assert!(p.stderr.contains("lost the lock"), "{}", p.stderr);
    let b = b.wait(Duration::from_secs(60));
    b.assert_code(0);
    assert_ticks_across(&p.stdout, &b.stdout, 1000);
}

/// A primary process that stops (SIGSTOP: starved, as far as its peer can tell) for longer than
/// the unacknowledged-data timeout and two heartbeats, but less than `--failover-timeout`, is a
/// slow peer, not a dead one: its host's kernel still acknowledges the backup's data. The
/// backup waits and counts it; the pair goes on as if nothing happened.
#[test]
fn a_primary_stopped_for_less_than_the_failover_timeout_is_waited_for() {
    let dir = scratch("fo-slow");
    let hosts = Hosts::new("sl", 2);
    let bsock = dir.join("b.sock");
    let pair = tiny_pair(&hosts, &dir, &file_lock(&dir))
        .args(["--failover-timeout", "8s"])
        .backup_args(["--api-socket", bsock.to_str().unwrap()]);
    let Sides { p, b, .. } = pair.start();
    assert!(p.wait_stdout("tick 100\n", Duration::from_secs(30)));
    // The backup serves its API socket once it replays, a moment after the primary counted it
    // attached (on the stock lane that moment was longer than the ticks above).
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(20), || bsock
            .exists()),
        "the backup never served {}:\n{}",
        bsock.display(),
        b.stderr()
    );
    p.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    let during = ctl_status(&bsock);
    p.signal(libc::SIGCONT);
    assert!(
        during.contains("\"peer_slow\": true"),
        "the backup does not show its primary slow:\n{during}\n{}",
        b.stderr()
    );
    let (p, b) = (
        p.wait(Duration::from_secs(60)),
        b.wait(Duration::from_secs(60)),
    );
    p.assert_code(0);
    b.assert_code(0);
    assert!(
        !b.stderr.contains("LIVE") && !b.stderr.contains("won the lock"),
        "the backup took over from a primary that was only stopped:\n{}",
        b.stderr
    );
    assert!(
        json_number(&during, "slow_peer_episodes").is_some_and(|n| n >= 1),
        "{during}"
    );
    assert_eq!(p.digest_line(), b.digest_line());
    assert_eq!(ticks_upto(&p.stdout), Some(1000), "{}", p.stdout);
}

/// A primary host that dies without a word (its link cut, then its process killed: no FIN
/// reaches the backup) is found by the backup's unacknowledged data, not by silence: with a
/// `--failover-timeout` of a minute the backup still goes live, and says why.
#[test]
fn a_primary_host_that_dies_silently_is_taken_over_before_the_failover_timeout() {
    let dir = scratch("fo-silent-death");
    let hosts = Hosts::new("sd", 2);
    let pair = tiny_pair(&hosts, &dir, &file_lock(&dir)).args(["--failover-timeout", "60s"]);
    let Sides { p, b, .. } = pair.start();
    assert!(p.wait_stdout("tick 100\n", Duration::from_secs(30)));
    hosts.cut(0);
    p.signal(libc::SIGKILL);
    let p = p.wait(Duration::from_secs(10));
    assert!(
        b.wait_stderr("LIVE: took over", Duration::from_secs(45)),
        "the backup did not go live well before the failover timeout:\n{}",
        b.stderr()
    );
    let b = b.wait(Duration::from_secs(60));
    b.assert_code(0);
    assert!(
        b.stderr.contains("acknowledged none"),
        "the backup did not find its primary lost by its unacknowledged data:\n{}",
        b.stderr
    );
    assert_ticks_across(&p.stdout, &b.stdout, 1000);
}

/// A pair under `--ack ack` whose backup diverges at exit 1500 and whose primary never answers
/// its resync request; returned once the primary has ignored it.
fn diverged_pair(hosts: &Hosts, dir: &Path, ack: &str) -> Sides {
    let pair = tiny_pair(hosts, dir, &file_lock(dir))
        .primary_args(["--ack", ack])
        .backup_env("FTVMM_TEST_DIVERGE_AT_EXIT", "1500")
        .primary_env("FTVMM_TEST_IGNORE_RESYNC", "1");
    let sides = pair.start();
    assert!(
        sides
            .p
            .wait_stderr("resync request ignored", Duration::from_secs(60)),
        "the backup never asked for a resync:\n{}\n{}",
        sides.p.stderr(),
        sides.b.stderr()
    );
    sides
}

/// A backup that diverged and waits for its resync when the primary falls silent may not go
/// live when, under `--ack received` (the default), outputs of records it held but never
/// verified may have left the primary: going on from its own state could contradict them. So
/// it must not race for the lock either: a primary that was only stopped (or cut off) keeps the
/// guest. Before this was fixed, the diverged backup won the lock and stopped, and the primary,
/// resumed, found itself fenced: nobody ran the guest.
#[test]
fn a_diverged_backup_does_not_take_the_lock_from_a_stopped_primary() {
    let dir = scratch("fo-diverged");
    let hosts = Hosts::new("dv", 2);
    let Sides { p, b, .. } = diverged_pair(&hosts, &dir, "received");
    // An output the backup held but could not verify leaves the primary.
    let lines = p.stdout().lines().count();
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(10), || p
            .stdout()
            .lines()
            .count()
            > lines + 1),
        "the primary released no output after the divergence:\n{}",
        p.stdout()
    );
    p.signal(libc::SIGSTOP);
    let b = b.wait(Duration::from_secs(60));
    p.signal(libc::SIGCONT);
    assert_eq!(
        b.code(),
        4,
        "the diverged backup did not stop as one without its primary:\n{}",
        b.stderr
    );
    assert!(
        b.reason()
            .is_some_and(|l| l.contains("may have released outputs")
                && l.contains("does not race for the lock")),
        "the last words before the digest line do not say why:\n{}",
        b.stderr
    );
    assert!(
        !b.stderr.contains("won the lock"),
        "the diverged backup took the lock:\n{}",
        b.stderr
    );
    // The primary, resumed, loses its backup, wins the lock at the next epoch and runs the
    // guest to its end.
    let p = p.wait(Duration::from_secs(120));
    p.assert_code(0);
    assert!(p.stderr.contains("won the lock"), "{}", p.stderr);
    assert_eq!(ticks_upto(&p.stdout), Some(1000), "{}", p.stdout);
}

/// Under `--ack executed` the primary releases only outputs its backup replayed and checked,
/// so a backup that diverged and waits for its resync when its primary dies may go on from
/// the last state it verified: it takes the lock and goes live from exactly where it diverged
/// (the call that diverged answered by the live side); the guest's serial stream, joined
/// across the two sides, has every tick once, in order.
#[test]
fn a_diverged_backup_goes_live_when_its_primary_dies_under_ack_executed() {
    let dir = scratch("fo-diverged-executed");
    let hosts = Hosts::new("dx", 2);
    let Sides { p, b, .. } = diverged_pair(&hosts, &dir, "executed");
    hosts.cut(0);
    p.signal(libc::SIGKILL);
    let p = p.wait(Duration::from_secs(30));
    let b = b.wait(Duration::from_secs(120));
    b.assert_code(0);
    assert!(
        b.stderr
            .contains("it may go on from the last state it verified")
            && b.stderr.contains("going live"),
        "the diverged backup did not go live:\n{}",
        b.stderr
    );
    assert_ticks_across(&p.stdout, &b.stdout, 1000);
}

/// Partition at a random moment: exactly one side stays live; the other emits nothing after
/// the cut (beyond what its peer had acknowledged before it).
fn partition_trials(tag: &str, lock_for: impl Fn(&Path) -> String, trials: usize) {
    for trial in 0..trials {
        let dir = scratch(&format!("fo-part-{tag}-{trial}"));
        let hosts = Hosts::new(&format!("pt{trial}{}", &tag[..1]), 3);
        // With etcd, the lock service runs on host 2, reached over the storage network.
        let etcd = (tag == "etcd")
            .then(|| Etcd::start(Some(hosts.ns(2)), &hosts.storage_addr(2), 2380, &dir));
        let lock = match &etcd {
            Some(e) => format!("etcd:{}/ftvmm/trial{trial}", e.endpoint),
            None => lock_for(&dir),
        };
        let Sides { p, b, .. } = tiny_pair(&hosts, &dir, &lock).start();
        let wait_ms = 300 + (trial as u64 * 977) % 2500;
        std::thread::sleep(Duration::from_millis(wait_ms));
        hosts.cut(1);
        let (p, b) = (
            p.wait(Duration::from_secs(60)),
            b.wait(Duration::from_secs(60)),
        );
        let live: Vec<&Run> = [&p, &b].into_iter().filter(|r| r.code() == 0).collect();
        assert_eq!(
            live.len(),
            1,
            "trial {trial}: not exactly one live side\n--- primary ({}) ---\n{}\n--- backup ({}) ---\n{}",
            p.code(),
            p.stderr,
            b.code(),
            b.stderr
        );
        let loser = if p.code() == 0 { &b } else { &p };
        assert_eq!(loser.code(), 5, "trial {trial}: {}", loser.stderr);
        assert!(
            loser
                .reason()
                .is_some_and(|l| l.starts_with("ftvmm: error: ")),
            "trial {trial}: the loser's last words before the digest line do not say why:\n{}",
            loser.stderr
        );
        if p.code() == 0 {
            // The primary went on: its stream alone is complete; the backup emitted nothing.
            assert!(
                b.stdout.is_empty(),
                "trial {trial}: the losing backup emitted output"
            );
            assert_eq!(ticks_upto(&p.stdout), Some(1000), "{}", p.stdout);
        } else {
            assert_ticks_across(&p.stdout, &b.stdout, 1000);
        }
        drop(etcd);
    }
}

#[test]
fn a_partition_leaves_exactly_one_live_side_file_lock() {
    partition_trials("file", file_lock, 3);
}

#[test]
fn a_partition_leaves_exactly_one_live_side_etcd_lock() {
    partition_trials("etcd", |_| String::new(), 3);
}

#[test]
fn reprotect_and_fail_over_three_times_in_a_row() {
    let dir = scratch("fo-thrice");
    let hosts = Hosts::new("tr", 4);
    let pair = tiny_pair(&hosts, &dir, &file_lock(&dir));
    let mut live = pair.primary();
    pair.wait_listening(&live);
    let mut host = 0;
    // What the client has seen so far, across every primary.
    let mut client = String::new();
    for round in 1..=3 {
        let next = round % 4;
        let b = pair.backup_on(next, &pair.addr(host));
        pair.wait_attached(&live, &b, 1);
        std::thread::sleep(Duration::from_millis(800));
        live.signal(libc::SIGKILL);
        let dead = live.wait(Duration::from_secs(10));
        client = joins(&client, &dead.stdout)
            .into_iter()
            .find(|s| ticks_upto(s).is_some())
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: a gap before the failover:\n{client}\n---\n{}",
                    dead.stdout
                )
            });
        wait_live(&b);
        assert!(
            b.stderr().contains(&format!("at epoch {}", round + 1)),
            "round {round}: {}",
            b.stderr()
        );
        live = b;
        host = next;
    }
    let last = live.wait(Duration::from_secs(60));
    last.assert_code(0);
    assert_ticks_across(&client, &last.stdout, 1000);
}

#[test]
fn a_corrupt_or_missing_lock_stops_the_side_that_needs_it_and_is_not_overwritten() {
    let dir = scratch("fo-badlock");
    let hosts = Hosts::new("bl", 2);
    let lock_path = dir.join("pair.lock");
    // A primary refuses to start on a corrupt lock block, and leaves it as it is.
    std::fs::write(&lock_path, vec![0x42u8; 512]).unwrap();
    let pair = tiny_pair(&hosts, &dir, &file_lock(&dir));
    let p = pair.primary().wait(Duration::from_secs(30));
    p.assert_code(2);
    assert!(p.stderr.contains("corrupt"), "{}", p.stderr);
    assert!(p.stdout.is_empty());
    assert_eq!(std::fs::read(&lock_path).unwrap(), vec![0x42u8; 512]);
    // A pair whose lock is corrupted under it: the backup that finds it so after the primary
    // dies says so, emits nothing, and overwrites nothing.
    std::fs::remove_file(&lock_path).unwrap();
    let Sides { p, b, .. } = pair.start();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&lock_path, vec![0x17u8; 512]).unwrap();
    p.signal(libc::SIGKILL);
    let _ = p.wait(Duration::from_secs(10));
    let b = b.wait(Duration::from_secs(30));
    assert_eq!(b.code(), 5, "{}", b.stderr);
    assert!(
        b.reason().is_some_and(|l| l.contains("corrupt")),
        "the last words before the digest line do not say why:\n{}",
        b.stderr
    );
    assert!(
        b.stdout.is_empty(),
        "the backup emitted output: {}",
        b.stdout
    );
    assert_eq!(std::fs::read(&lock_path).unwrap(), vec![0x17u8; 512]);
    // Unreachable: the lock file is gone.
    std::fs::remove_file(&lock_path).unwrap();
    let Sides { p, b, .. } = pair.start();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::remove_file(&lock_path).unwrap();
    p.signal(libc::SIGKILL);
    let _ = p.wait(Duration::from_secs(10));
    let b = b.wait(Duration::from_secs(30));
    assert_eq!(b.code(), 5, "{}", b.stderr);
    assert!(
        b.reason().is_some_and(|l| l.contains("unreachable")),
        "the last words before the digest line do not say why:\n{}",
        b.stderr
    );
    assert!(b.stdout.is_empty());
    assert!(
        !lock_path.exists(),
        "the backup created a lock it could not win"
    );
}

// --- Linux workloads ----------------------------------------------------------------------

fn linux_pair<'h>(hosts: &'h Hosts, dir: &Path, disk: &Path) -> Option<Pair<'h>> {
    Some(pair(hosts, dir, 22, &file_lock(dir)).args(linux_machine(LINUX_CMDLINE, disk)?))
}

/// One failover trial on the Linux guest: the workload runs, the primary's host dies at a
/// random moment, the backup carries on. Returns (before, after) serial output.
fn linux_trial(
    tag: &str,
    trial: usize,
    command: &str,
    progress: &str,
    after_lines: usize,
) -> Option<(String, String, PathBuf)> {
    let ready = linux_ready()?;
    let dir = scratch(&format!("fo-linux-{tag}-{trial}"));
    let disk = dir.join("disk.img");
    std::fs::copy(&ready.disk, &disk).unwrap();
    let hosts = Hosts::new(&format!("l{}{trial}", &tag[..1]), 2);
    let Sides { mut p, b, .. } = linux_pair(&hosts, &dir, &disk)?
        .primary_args(["--restore", ready.snapshot.to_str().unwrap()])
        .primary_args(["--serial-input", "-"])
        .backup_args(["--serial-input", "none"])
        .start();
    p.type_input(format!("{command}\n").as_bytes());
    assert!(
        p.wait_stdout(progress, Duration::from_secs(300)),
        "trial {trial}: the workload never started:\n{}",
        p.stdout()
    );
    // A random moment: 0-3 s after the workload showed progress.
    let ms = (trial as u64 * 7919 + std::process::id() as u64) % 3000;
    std::thread::sleep(Duration::from_millis(ms));
    p.signal(libc::SIGKILL);
    let p = p.wait(Duration::from_secs(10));
    wait_live(&b);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(300) {
        if b.stdout().matches('\n').count() >= after_lines {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    b.signal(libc::SIGKILL);
    let b = b.wait(Duration::from_secs(10));
    Some((p.stdout, b.stdout, disk))
}

#[test]
fn linux_counter_survives_the_primary_host_dying_at_random_moments() {
    for trial in 0..trials("FTVMM_FAILOVER_TRIALS", 10) {
        let Some((before, after, _)) =
            linux_trial("counter", trial, "/workloads/counter", "n=3\r\n", 12)
        else {
            return;
        };
        assert_counter_across(trial, &before, &after);
    }
}

#[test]
fn linux_diskwrite_survives_the_primary_host_dying_and_keeps_every_synced_record() {
    for trial in 0..trials("FTVMM_FAILOVER_TRIALS", 10) {
        let Some((before, after, disk)) = linux_trial(
            "diskwrite",
            trial,
            "/workloads/diskwrite",
            "record 1 synced\r\n",
            2,
        ) else {
            return;
        };
        assert_synced_records_kept(trial, &before, &after, &disk);
    }
}
