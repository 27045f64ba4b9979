//! Standbys (`--role standby`) on simulated hosts (network namespaces, tests/src/net.rs): a
//! standby waits for the side the lock names live, attaches as its backup, and after a
//! failover the pair is protected again with no command typed. Two standbys never both attach:
//! the one the primary refused waits, quietly, until the lock moves.
//!
//! Every process is killed by its PID when its `Proc` drops, and the namespaces and etcd go
//! with their owners, also when a test fails.

use ftvmm_tests::{
    ctl_status, joins, key_file, scratch, test_guest, ticks_upto, wait_until, Etcd, Hosts, Pair,
    Proc,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A pair of the `ticks-minute` guest (a line every 100 ms for a minute) on `hosts`, with
/// generous limits: these tests check what happens, never how fast.
fn tiny_pair<'h>(hosts: &'h Hosts, dir: &Path, lock: &str) -> Pair<'h> {
    Pair::on_hosts(hosts)
        .key(&key_file(dir, "key", 23))
        .lock(lock)
        .args(["--log-level", "info"])
        .args([
            "--kernel",
            test_guest("ticks-minute").to_str().unwrap(),
            "--serial-input",
            "none",
        ])
        .limits(Duration::from_secs(60), Duration::from_secs(120))
}

/// The API socket of the side on host `i`.
fn sock(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("h{i}.sock"))
}

/// The status document of the side on host `i` (`Null` while it serves none: a standby
/// starting again as itself, a side gone).
fn status(dir: &Path, i: usize) -> Value {
    serde_json::from_str(&ctl_status(&sock(dir, i))).unwrap_or(Value::Null)
}

/// The host whose pair address `peer` (`ADDR:PORT`) is.
fn host_of(hosts: &Hosts, n: usize, peer: &str) -> Option<usize> {
    let ip = peer.rsplit_once(':')?.0;
    (0..n).find(|&i| hosts.addr(i) == ip)
}

/// Everything each side printed on stderr, for a failure message.
fn logs(sides: &[Option<Proc>]) -> String {
    sides
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            p.as_ref()
                .map(|p| format!("--- host {i} ---\n{}", p.stderr()))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the primary on host `live` has a backup attached after the takeover it made
/// (or, with `after_takeover` false, at all); the backup's host.
fn wait_protected(
    hosts: &Hosts,
    dir: &Path,
    live: usize,
    after_takeover: bool,
    sides: &[Option<Proc>],
) -> usize {
    let mut backup = None;
    let protected = wait_until(Duration::from_secs(120), Duration::from_millis(50), || {
        let s = status(dir, live);
        let again = !after_takeover
            || s["takeovers"]
                .as_array()
                .and_then(|t| t.last())
                .is_some_and(|t| t["protected_again_ms"].is_number());
        backup = s["peer"]
            .as_str()
            .and_then(|p| host_of(hosts, sides.len(), p));
        s["role"] == "primary" && s["protected"] == true && again && backup.is_some()
    });
    assert!(
        protected,
        "the primary on host {live} was not protected again:\n{}\n{}",
        status(dir, live),
        logs(sides)
    );
    backup.expect("a backup")
}

/// After SIGKILL of the primary, its backup (a standby that attached) takes over and another
/// standby attaches to it, five times in a row; each killed host comes back as a standby.
/// The client's serial stream runs on across every primary with no gap.
fn reprotected_five_times(tag: &str, etcd: bool) {
    let dir = scratch(&format!("sb-chain-{tag}"));
    let hosts = Hosts::new(&format!("sc{}", &tag[..1]), 3);
    let etcd = etcd.then(|| Etcd::start(Some(hosts.ns(2)), &hosts.storage_addr(2), 2380, &dir));
    let lock = match &etcd {
        Some(e) => format!("etcd:{}/ftvmm/standby-chain", e.endpoint),
        None => format!("file:{}", dir.join("pair.lock").display()),
    };
    let pair = tiny_pair(&hosts, &dir, &lock);
    let mut sides = primary_and_two_standbys(&pair, &dir);
    let mut live = 0;
    let mut backup = wait_protected(&hosts, &dir, live, false, &sides);
    let mut client = String::new();
    let mut epoch = status(&dir, live)["epoch"].as_u64().expect("an epoch");
    for round in 1..=5 {
        std::thread::sleep(Duration::from_millis(300));
        let killed = sides[live].take().expect("the live side");
        killed.signal(libc::SIGKILL);
        let dead = killed.wait(Duration::from_secs(10));
        client = joins(&client, &dead.stdout)
            .into_iter()
            .find(|s| ticks_upto(s).is_some())
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: a gap in the client's stream:\n{client}\n---\n{}",
                    dead.stdout
                )
            });
        let next = backup;
        assert!(
            wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
                sides[next]
                    .as_ref()
                    .is_some_and(|p| p.stderr().contains("LIVE: took over"))
            }),
            "round {round}: the backup on host {next} never went live:\n{}",
            logs(&sides)
        );
        // The killed host comes back as a standby, as its service manager would start it.
        sides[live] = Some(standby_on(&pair, &dir, live));
        live = next;
        backup = wait_protected(&hosts, &dir, live, true, &sides);
        assert_ne!(backup, live);
        let s = status(&dir, live);
        let now = s["epoch"].as_u64().expect("an epoch");
        assert!(now > epoch, "round {round}: the epoch did not move: {s}");
        epoch = now;
        assert_eq!(
            s["attaches"], 1,
            "round {round}: the new primary counts other than one backup: {s}"
        );
        let took = &s["takeovers"][0];
        eprintln!(
            "round {round}: host {live} took over at epoch {epoch} (live {:.0} ms after the loss), host {backup} attached: protected again {:.0} ms after the loss",
            took["go_live_ms"].as_f64().unwrap_or(0.0),
            took["protected_again_ms"].as_f64().unwrap_or(0.0)
        );
        for (i, side) in sides.iter_mut().enumerate() {
            let side = side.as_mut().expect("a side on every host");
            assert!(
                !side.exited(),
                "round {round}: the side on host {i} exited:\n{}",
                logs(&sides)
            );
        }
    }
    let last = sides[live].take().expect("the live side");
    last.signal(libc::SIGKILL);
    let last = last.wait(Duration::from_secs(10));
    assert!(
        joins(&client, &last.stdout)
            .iter()
            .any(|s| ticks_upto(s).is_some_and(|n| n > 0)),
        "a gap in the client's stream after the last takeover:\n{client}\n---\n{}",
        last.stdout
    );
    drop(sides);
    drop(etcd);
}

/// The flags of host `i`'s side: its own API socket.
fn api_args(dir: &Path, i: usize) -> [String; 2] {
    [
        "--api-socket".to_string(),
        sock(dir, i).display().to_string(),
    ]
}

/// A standby on host `i` with its own API socket.
fn standby_on(pair: &Pair<'_>, dir: &Path, i: usize) -> Proc {
    let args = api_args(dir, i);
    pair.standby_on(i, &args.each_ref().map(String::as_str))
}

/// A primary on host 0 and standbys on hosts 1 and 2, each with its own API socket; the
/// primary listens when this returns.
fn primary_and_two_standbys(pair: &Pair<'_>, dir: &Path) -> Vec<Option<Proc>> {
    let own = |i: usize| {
        [
            "--api-socket".to_string(),
            sock(dir, i).display().to_string(),
        ]
    };
    let p = pair.clone().primary_args(own(0)).primary_on(0);
    pair.wait_listening(&p);
    let mut sides = vec![Some(p)];
    for i in [1, 2] {
        sides.push(Some(standby_on(pair, dir, i)));
    }
    sides
}

#[test]
fn standbys_reprotect_the_survivor_five_times_in_a_row_file_lock() {
    reprotected_five_times("file", false);
}

#[test]
fn standbys_reprotect_the_survivor_five_times_in_a_row_etcd_lock() {
    reprotected_five_times("etcd", true);
}

/// Two standbys started together: one attaches, the other is refused and waits, quietly (one
/// refusal, no second try while the lock stays), and the primary reports one backup. When that
/// backup dies, the primary takes the next epoch and the waiting standby attaches.
#[test]
fn two_standbys_never_both_attach() {
    let dir = scratch("sb-two");
    let hosts = Hosts::new("st", 3);
    let lock = format!("file:{}", dir.join("pair.lock").display());
    let pair = tiny_pair(&hosts, &dir, &lock);
    let mut sides = primary_and_two_standbys(&pair, &dir);
    let attached = wait_protected(&hosts, &dir, 0, false, &sides);
    let waiting = 3 - attached;
    let refused = |s: &Value| {
        s["role"] == "standby" && s["state"] == "waiting" && s["refusals"].as_u64() >= Some(1)
    };
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
            refused(&status(&dir, waiting))
        }),
        "the standby on host {waiting} was not refused and waiting:\n{}\n{}",
        status(&dir, waiting),
        logs(&sides)
    );
    // A while later: still one backup, the other still waiting, and it did not try again.
    let before = status(&dir, waiting);
    std::thread::sleep(Duration::from_secs(5));
    let (p, w, b) = (
        status(&dir, 0),
        status(&dir, waiting),
        status(&dir, attached),
    );
    assert_eq!(p["attaches"], 1, "{p}");
    assert_eq!(
        p["peer"].as_str().and_then(|a| host_of(&hosts, 3, a)),
        Some(attached),
        "{p}"
    );
    assert!(refused(&w), "{w}");
    assert_eq!(
        (&w["attach_attempts"], &w["refusals"]),
        (&before["attach_attempts"], &before["refusals"]),
        "the waiting standby tried again while the lock stayed: {before}\n{w}"
    );
    assert_eq!(b["role"], "backup", "{b}");
    assert_eq!(b["standby"]["attaches"], 1, "{b}");
    for (i, side) in sides.iter_mut().enumerate() {
        assert!(!side.as_mut().expect("a side").exited(), "host {i} exited");
    }
    // The backup dies: the primary takes the next epoch and the waiting standby attaches.
    let gone = sides[attached].take().expect("the backup");
    gone.signal(libc::SIGKILL);
    let _ = gone.wait(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(120), Duration::from_millis(50), || {
            let p = status(&dir, 0);
            p["attaches"] == 2
                && p["protected"] == true
                && p["peer"].as_str().and_then(|a| host_of(&hosts, 3, a)) == Some(waiting)
        }),
        "the waiting standby never attached after the backup died:\n{}\n{}",
        status(&dir, 0),
        logs(&sides)
    );
    // The primary counts the backup attached a moment before the standby's own status says so.
    let became_backup = wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
        status(&dir, waiting)["role"] == "backup"
    });
    let w = status(&dir, waiting);
    assert!(
        became_backup,
        "the attached standby never said it is a backup: {w}"
    );
    assert!(w["standby"]["refusals"].as_u64() >= Some(1), "{w}");
}
