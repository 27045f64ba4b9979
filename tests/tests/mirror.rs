//! Mirrored disks (`--disk-mode mirrored`): a pair that shares no storage. Each simulated host
//! (tests/src/net.rs `Hosts`) keeps its own copy of the guest's disk in a directory of its own;
//! the lock is etcd on a third host, over the storage network. The backup's copy starts as
//! zeros of the right size: the attach copies the primary's into it.
//!
//! `FTVMM_MIRROR_TRIALS=N` runs N kill trials instead of the default.

use ftvmm_tests::{
    assert_synced_records_kept, ctl, key_file, last_synced, linux_machine, linux_ready, numbers,
    scratch, trials, wait_synced, Etcd, Ftvmm, Hosts, Pair, Proc, Sides, LINUX_CMDLINE,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Linux guest's two copies for a trial in `dir`: the primary's (the booted guest's disk,
/// with pseudo-random bytes past its first MiB, where `diskwrite` never reaches in a test: what
/// the attach must carry) and the backup's (zeros).
fn copies(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let ready = linux_ready()?;
    let (a, b) = (dir.join("host-a"), dir.join("host-b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (da, db) = (a.join("disk.img"), b.join("disk.img"));
    let mut data = std::fs::read(&ready.disk).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for byte in data.iter_mut().skip(1 << 20) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    std::fs::write(&da, &data).unwrap();
    let size = data.len() as u64;
    std::fs::File::create(&db).unwrap().set_len(size).unwrap();
    Some((da, db))
}

/// What a mirrored test runs on: its directory, the two copies ([`copies`]), etcd on host 2 of
/// three simulated hosts (dropped in this order: etcd before its host's namespace).
struct Rig {
    dir: PathBuf,
    disks: (PathBuf, PathBuf),
    etcd: Etcd,
    hosts: Hosts,
}

/// A [`Rig`] in scratch directory `name`, its hosts named after `tag` (None without the Linux
/// guest).
fn rig(name: &str, tag: &str) -> Option<Rig> {
    let dir = scratch(name);
    let disks = copies(&dir)?;
    let hosts = Hosts::new(tag, 3);
    let etcd = Etcd::start(Some(hosts.ns(2)), &hosts.storage_addr(2), 2380, &dir);
    Some(Rig {
        dir,
        disks,
        etcd,
        hosts,
    })
}

/// A mirrored pair of the Linux guest on the rig's hosts (0: primary, 1: backup), the lock on
/// its etcd, `diskwrite` typed at its shell once the backup attached; waits for its first
/// synced record.
fn mirrored_diskwrite(rig: &Rig, primary_extra: &[&str], backup_extra: &[&str]) -> Sides {
    let disks = &rig.disks;
    let ready = linux_ready().expect("checked by copies()");
    let machine = |disk: &Path| linux_machine(LINUX_CMDLINE, disk).unwrap();
    let mut sides = pair_of(rig)
        .primary_args(machine(&disks.0))
        .backup_args(machine(&disks.1))
        .primary_args(["--restore", ready.snapshot.to_str().unwrap()])
        .primary_args(["--serial-input", "-"])
        .primary_args(primary_extra)
        .backup_args(["--serial-input", "none"])
        .backup_args(backup_extra)
        .start();
    sides.p.type_input(b"/workloads/diskwrite\n");
    assert!(
        sides
            .p
            .wait_stdout("record 1 synced\r\n", Duration::from_secs(300)),
        "the workload never started:\n{}\n--- primary ---\n{}\n--- backup ---\n{}",
        sides.p.stdout(),
        sides.p.stderr(),
        sides.b.stderr()
    );
    sides
}

fn wait_live(b: &Proc) {
    assert!(
        b.wait_stderr("LIVE: took over", Duration::from_secs(60)),
        "the backup never went live:\n{}",
        b.stderr()
    );
}

/// The primary's host dies at a random moment while the guest writes and syncs records: the
/// backup takes over on its own copy, the client's record lines have no gap, and every record
/// the client saw synced is on the survivor's copy (the dead host's copy is not looked at).
#[test]
fn mirrored_diskwrite_survives_the_primary_host_dying_with_every_synced_record_on_the_survivor() {
    for trial in 0..trials("FTVMM_MIRROR_TRIALS", 3) {
        let Some(rig) = rig(&format!("mirror-kill-{trial}"), &format!("mk{trial}")) else {
            return;
        };
        let Sides { p, b, .. } = mirrored_diskwrite(&rig, &[], &[]);
        let ms = (trial as u64 * 7919 + std::process::id() as u64) % 3000;
        std::thread::sleep(Duration::from_millis(ms));
        p.signal(libc::SIGKILL);
        let p = p.wait(Duration::from_secs(10));
        wait_live(&b);
        let next = last_synced(&p.stdout) + 2;
        assert!(
            wait_synced(&b, next, Duration::from_secs(300)),
            "trial {trial}: the workload did not go on on the backup's copy:\n{}",
            b.stderr()
        );
        b.signal(libc::SIGKILL);
        let b = b.wait(Duration::from_secs(10));
        assert_synced_records_kept(trial, &p.stdout, &b.stdout, &rig.disks.1);
    }
}

/// A mirrored pair stopped cleanly (`ftvmm ctl stop`) ends both sides at the same point, with
/// two copies equal byte for byte: the backup applied every write the primary made, and
/// nothing else.
#[test]
fn a_mirrored_pair_stopped_cleanly_leaves_two_identical_copies() {
    let Some(rig) = rig("mirror-stop", "ms") else {
        return;
    };
    let (dir, disks) = (&rig.dir, &rig.disks);
    let sock = dir.join("p.sock");
    let sock_arg = sock.to_str().unwrap();
    let sides = mirrored_diskwrite(&rig, &["--api-socket", sock_arg], &[]);
    assert!(
        sides
            .p
            .wait_stdout("record 5 synced\r\n", Duration::from_secs(300)),
        "{}",
        sides.p.stdout()
    );
    let (code, out, err) = ctl(&["--api-socket", sock_arg, "stop"]);
    assert_eq!(code, 0, "{out}{err}");
    let (copy, _) = stopped_alike(sides.p, sides.b, disks);
    assert!(
        records_in(&copy) >= 5,
        "the copies hold {} records",
        records_in(&copy)
    );
}

/// Waits for both sides of a stopped pair: each exits 0, both at the same point, and the two
/// copies are equal byte for byte; returns the copy and both sides' serial output.
fn stopped_alike(p: Proc, b: Proc, disks: &(PathBuf, PathBuf)) -> (Vec<u8>, String) {
    let (p, b) = (
        p.wait(Duration::from_secs(120)),
        b.wait(Duration::from_secs(120)),
    );
    p.assert_code(0);
    b.assert_code(0);
    assert_eq!(
        p.digest_line(),
        b.digest_line(),
        "{}\n{}",
        p.stderr,
        b.stderr
    );
    let (a, c) = (
        std::fs::read(&disks.0).unwrap(),
        std::fs::read(&disks.1).unwrap(),
    );
    let differ = a.iter().zip(&c).position(|(x, y)| x != y);
    assert!(
        a.len() == c.len() && differ.is_none(),
        "the copies differ (first at byte {differ:?})"
    );
    (a, format!("{}{}", p.stdout, b.stdout))
}

/// The records `diskwrite` left on a disk (record n in sector n-1).
fn records_in(disk: &[u8]) -> usize {
    disk.chunks(512)
        .take_while(|s| s.starts_with(b"FTVMMREC "))
        .count()
}

/// A mirrored pair needs a lock that does not live on one host's storage: `--lock file:` (or
/// none) is refused before anything runs, with the reason.
#[test]
fn a_mirrored_pair_refuses_a_lock_on_one_hosts_storage() {
    let dir = scratch("mirror-lock");
    let Some(disks) = copies(&dir) else {
        return;
    };
    let machine = linux_machine(LINUX_CMDLINE, &disks.0).unwrap();
    let key = key_file(&dir, "key", 52);
    let lock_file = dir.join("pair.lock");
    let file_lock = format!("file:{}", lock_file.display());
    for lock in [Some(file_lock.as_str()), None] {
        let mut args = vec!["--role", "primary", "--listen", "127.0.0.1:0"];
        args.extend([
            "--key-file",
            key.to_str().unwrap(),
            "--disk-mode",
            "mirrored",
        ]);
        if let Some(l) = lock {
            args.extend(["--lock", l]);
        }
        let run = Ftvmm::raw(&args).args(machine.iter()).run();
        assert_eq!(run.code(), 2, "{lock:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("needs --lock etcd:"),
            "{lock:?}: {}",
            run.stderr
        );
        assert!(!lock_file.exists(), "the refused primary created its lock");
    }
}

/// A planned switchover of a mirrored pair, then back: the guest moves to the backup's copy
/// with nothing lost, the old primary re-attaches as the new one's backup (its copy overwritten
/// by the new primary's, every block), and after the second switchover and a clean stop the
/// two copies are equal and hold every record the client saw synced.
#[test]
fn a_mirrored_pair_switches_over_and_back_and_its_copies_stay_equal() {
    let Some(rig) = rig("mirror-switch", "mw") else {
        return;
    };
    let (dir, disks) = (&rig.dir, &rig.disks);
    let socks = [dir.join("a.sock"), dir.join("b.sock")];
    let sock = |i: usize| socks[i].to_str().unwrap().to_string();
    let (sa, sb) = (sock(0), sock(1));
    let Sides { p, b, .. } =
        mirrored_diskwrite(&rig, &["--api-socket", &sa], &["--api-socket", &sb]);
    let procs = [p, b];
    for (round, (from, to)) in [(0usize, 1usize), (1, 0)].into_iter().enumerate() {
        let attached = procs[to].stderr().matches(" attached: ").count();
        let (code, out, err) = ctl(&[
            "--api-socket",
            &sock(from),
            "switchover",
            "--then",
            "backup",
        ]);
        assert!(
            code == 0 && out.contains("\"done\""),
            "round {round}: {out}{err}\n--- from ---\n{}",
            procs[from].stderr()
        );
        assert!(
            ftvmm_tests::wait_until(Duration::from_secs(120), Duration::from_millis(20), || {
                procs[to].stderr().matches(" attached: ").count() > attached
            }),
            "round {round}: the old primary never attached again:\n--- old ---\n{}\n--- new ---\n{}",
            procs[from].stderr(),
            procs[to].stderr()
        );
        assert!(
            procs[to].stderr().contains("disk blocks"),
            "round {round}: the attach did not carry the disk:\n{}",
            procs[to].stderr()
        );
        // The workload goes on on the new primary's copy.
        let seen = last_synced(&procs[to].stdout());
        assert!(
            wait_synced(&procs[to], seen + 1, Duration::from_secs(300)),
            "round {round}: the workload did not go on after the switchover:\n{}",
            procs[to].stdout()
        );
    }
    for (side, p) in ["a", "b"].iter().zip(&procs) {
        for line in p.stderr().lines().filter(|l| l.contains(" attached: ")) {
            eprintln!("{side}: {line}");
        }
    }
    let (code, out, err) = ctl(&["--api-socket", &sa, "stop"]);
    assert_eq!(code, 0, "{out}{err}");
    let [a, b] = procs;
    let (ca, said) = stopped_alike(a, b, disks);
    let synced = numbers(&said, "record ", " synced");
    let last = synced.iter().copied().max().unwrap_or(0) as usize;
    assert!(
        records_in(&ca) >= last,
        "the client saw record {last} synced, the copies hold {}",
        records_in(&ca)
    );
}

/// Both sides must keep the disk alike: a backup with a shared disk is refused by a mirrored
/// primary at its hello, with both summaries in the reason (and the primary runs on).
#[test]
fn a_backup_of_the_other_disk_mode_is_refused_at_its_hello() {
    let dir = scratch("mirror-modes");
    let hosts = Hosts::new("mm", 3);
    let etcd = Etcd::start(Some(hosts.ns(2)), &hosts.storage_addr(2), 2380, &dir);
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    for d in [&a, &b] {
        std::fs::File::create(d).unwrap().set_len(1 << 20).unwrap();
    }
    let guest = ftvmm_tests::test_guest("ticks-minute");
    let pair = Pair::on_hosts(&hosts)
        .key(&key_file(&dir, "key", 53))
        .lock(&format!("etcd:{}/ftvmm/modes", etcd.endpoint))
        .args([
            "--kernel",
            guest.to_str().unwrap(),
            "--serial-input",
            "none",
        ])
        .primary_args(["--disk", a.to_str().unwrap(), "--disk-mode", "mirrored"])
        .backup_args(["--disk", b.to_str().unwrap(), "--disk-mode", "shared"]);
    let p = pair.primary();
    pair.wait_listening(&p);
    let b = pair.backup(&pair.addr(0)).wait(Duration::from_secs(60));
    assert_ne!(b.code(), 0, "{}", b.stderr);
    assert!(
        b.stderr.contains("refused") && b.stderr.contains("disk mirrored"),
        "the refusal does not say why:\n{}",
        b.stderr
    );
    assert!(
        p.wait_stderr("refused backup", Duration::from_secs(30)),
        "the primary did not refuse it:\n{}",
        p.stderr()
    );
    p.signal(libc::SIGKILL);
}

/// Re-protection by the old primary's host after a failover: its copy shares history with the
/// survivor's, so the attach sends only the blocks that differ (those written since, and any
/// the dead primary wrote that the survivor never replayed); after a clean stop the copies are
/// equal.
#[test]
fn the_old_primarys_copy_re_protects_with_the_blocks_that_differ() {
    let Some(rig) = rig("mirror-reprotect", "mr") else {
        return;
    };
    let (Sides { p, b, .. }, sock) = backup_with_socket(&rig, 4);
    let sock_arg = sock.to_str().unwrap();
    p.signal(libc::SIGKILL);
    let p = p.wait(Duration::from_secs(10));
    wait_live(&b);
    // The new primary writes past what the old one's copy holds.
    let seen = last_synced(&p.stdout);
    assert!(
        wait_synced(&b, seen + 3, Duration::from_secs(300)),
        "the workload did not go on on the survivor:\n{}",
        b.stderr()
    );
    // Host 0 comes back with its old copy and attaches to the new primary on host 1.
    let old = host0_pair(&rig);
    let a = old.backup_on(0, &old.addr(1));
    assert!(
        ftvmm_tests::wait_until(Duration::from_secs(120), Duration::from_millis(20), || {
            b.stderr().contains(" attached: ")
        }),
        "the old primary's host never attached:\n--- it ---\n{}\n--- new primary ---\n{}",
        a.stderr(),
        b.stderr()
    );
    let (line, sent, had) = attach_line(&b, 1);
    eprintln!("re-protection: {line}");
    assert!(
        sent.is_some_and(|s| s > 0) && had.is_some_and(|h| h > 0),
        "the attach did not send just the blocks that differ (some, not all): {line}"
    );
    let (code, out, err) = ctl(&["--api-socket", sock_arg, "stop"]);
    assert_eq!(code, 0, "{out}{err}");
    stopped_alike(b, a, &rig.disks);
}

/// A mirrored pair on the rig ([`mirrored_diskwrite`]), each side with an API socket
/// (`a.sock`, `b.sock`).
fn sockets_pair(rig: &Rig) -> (Sides, [PathBuf; 2]) {
    let socks = [rig.dir.join("a.sock"), rig.dir.join("b.sock")];
    let side = |i: usize| ["--api-socket", socks[i].to_str().unwrap()];
    let sides = mirrored_diskwrite(rig, &side(0), &side(1));
    (sides, socks)
}

/// `ftvmm ctl verify-disk` on the primary's socket `sock`, its answer printed as `what`: checks
/// that it says `result` (`match`, exit status 0; `mismatch`, 1) and returns it.
fn verified(sides: &Sides, sock: &str, result: &str, what: &str) -> serde_json::Value {
    let (code, out, err) = ctl(&["--api-socket", sock, "verify-disk"]);
    let answer = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    eprintln!("{what}: {answer}");
    let want = if result == "match" { 0 } else { 1 };
    assert!(
        code == want && answer["result"] == result,
        "{what}: exit {code}, {answer:#}{err}\n--- primary ---\n{}\n--- backup ---\n{}",
        sides.p.stderr(),
        sides.b.stderr()
    );
    answer
}

/// A side's status document parsed.
fn status_of(sock: &Path) -> serde_json::Value {
    serde_json::from_str(&ftvmm_tests::ctl_status(sock)).unwrap_or(serde_json::Value::Null)
}

/// Waits until the backup's status reports verification `id`, and returns that report.
fn backup_check(sock: &Path, id: u64) -> serde_json::Value {
    let status = status_when(sock, &format!("verification {id}"), |s| {
        s["last_disk_check"]["id"].as_u64() == Some(id)
    });
    status["last_disk_check"].clone()
}

/// Waits until the status on `sock` satisfies `ok` (`what` names it in the failure) and
/// returns it.
fn status_when(
    sock: &Path,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let seen = ftvmm_tests::wait_until(Duration::from_secs(120), Duration::from_millis(50), || {
        last = status_of(sock);
        ok(&last)
    });
    assert!(seen, "the status never showed {what}: {last:#}");
    last
}

/// `ctl verify-disk` on a healthy mirrored pair: both copies compared at one log position say
/// they match, both sides report the same position, digest and block count, the second verification
/// hashes only the blocks written since the first; then a clean stop leaves equal copies.
#[test]
fn verify_disk_on_a_healthy_mirrored_pair_matches_at_one_position() {
    let Some(rig) = rig("mirror-verify", "mv") else {
        return;
    };
    let (sides, socks) = sockets_pair(&rig);
    let sa = socks[0].to_str().unwrap();
    for id in 1..=2u64 {
        assert!(
            wait_synced(
                &sides.p,
                last_synced(&sides.p.stdout()) + 1,
                Duration::from_secs(300)
            ),
            "{}",
            sides.p.stdout()
        );
        let answer = verified(&sides, sa, "match", &format!("verify-disk {id}"));
        assert_eq!(answer["id"], id, "{answer:#}");
        let theirs = backup_check(&socks[1], id);
        eprintln!("backup's verification {id}: {theirs}");
        assert_eq!(theirs["result"], "match", "{theirs:#}");
        for field in ["position", "digest", "blocks"] {
            assert_eq!(
                answer[field], theirs[field],
                "{field}: {answer:#}\n{theirs:#}"
            );
        }
        let p = status_of(&socks[0]);
        assert_eq!(p["last_disk_check"]["result"], "match", "{p:#}");
        assert_eq!(p["disk_checks"], id, "{p:#}");
        if id == 2 {
            let blocks = answer["blocks"].as_u64().unwrap();
            assert!(
                answer["hashed_blocks"].as_u64().unwrap() < blocks,
                "the second verification hashed the whole copy again: {answer:#}"
            );
        }
    }
    let (code, out, err) = ctl(&["--api-socket", sa, "stop"]);
    assert_eq!(code, 0, "{out}{err}");
    stopped_alike(sides.p, sides.b, &rig.disks);
}

/// The `n`-th (from 1) attach line of primary `p`, with the disk blocks it sent and those the
/// backup had ("..., N disk blocks sent (M the backup had), ...").
fn attach_line(p: &Proc, n: usize) -> (String, Option<u64>, Option<u64>) {
    let line = p
        .stderr()
        .lines()
        .filter(|l| l.contains(" attached: "))
        .nth(n - 1)
        .unwrap_or_default()
        .to_string();
    let figure = |before: &str| -> Option<u64> {
        let head = line.split(before).next()?;
        head.rsplit(' ')
            .next()?
            .trim_start_matches('(')
            .parse()
            .ok()
    };
    let (sent, had) = (figure(" disk blocks sent"), figure(" the backup had"));
    (line, sent, had)
}

/// A byte of the backup's copy altered on disk while the pair runs, in a block the guest never
/// writes (past `diskwrite`'s records): `ctl verify-disk` reports a mismatch naming that
/// block; the backup heals by attaching again (the attach sends the blocks that differ) while
/// the primary's guest runs on; then verify-disk says match, and after a clean stop the copies
/// are equal byte for byte.
#[test]
fn a_backup_copy_altered_by_one_byte_is_found_by_verify_disk_and_healed() {
    let Some(rig) = rig("mirror-heal", "mh") else {
        return;
    };
    let (sides, socks) = sockets_pair(&rig);
    let sa = socks[0].to_str().unwrap();
    // A block the guest does not write: 8 MiB in (diskwrite's records are in the first MiB).
    let at: u64 = 8 << 20 | 4321;
    let block = at / (64 << 10);
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&rig.disks.1)
            .unwrap();
        let mut byte = [0u8; 1];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut byte).unwrap();
        byte[0] ^= 0x5a;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&byte).unwrap();
    }
    let answer = verified(&sides, sa, "mismatch", "verify-disk after the alteration");
    assert_eq!(answer["differing"], 1, "{answer:#}");
    assert_eq!(answer["first_differing"][0], block, "{answer:#}");
    // The backup attaches again, and only what differs travels.
    sides_reattached(&sides.p, &sides.b);
    let (line, sent, had) = attach_line(&sides.p, 2);
    eprintln!("healed: {line}");
    assert!(
        sent.is_some_and(|s| s >= 1) && had.is_some_and(|h| h > sent.unwrap_or(0)),
        "the heal did not send just the blocks that differ: {line}"
    );
    let b = status_when(&socks[1], "what the backup healed", |b| {
        b["healing"].as_str().is_some_and(|h| h.contains("differ"))
    });
    eprintln!(
        "backup after the heal: healing {}, attach_disk_blocks {}",
        b["healing"], b["attach_disk_blocks"]
    );
    // The primary's guest ran on throughout.
    let seen = last_synced(&sides.p.stdout());
    assert!(
        wait_synced(&sides.p, seen + 1, Duration::from_secs(300)),
        "the workload stopped:\n{}",
        sides.p.stdout()
    );
    verified(&sides, sa, "match", "verify-disk after the heal");
    let (code, out, err) = ctl(&["--api-socket", sa, "stop"]);
    assert_eq!(code, 0, "{out}{err}");
    stopped_alike(sides.p, sides.b, &rig.disks);
}

/// Waits until backup `b` attached to primary `p` a second time.
fn sides_reattached(p: &Proc, b: &Proc) {
    assert!(
        ftvmm_tests::wait_until(Duration::from_secs(180), Duration::from_millis(20), || {
            p.stderr().matches(" attached: ").count() >= 2
        }),
        "the backup never attached again:\n--- primary ---\n{}\n--- backup ---\n{}",
        p.stderr(),
        b.stderr()
    );
}

/// What the sidecar of the copy at `image` says (`IMAGE.ftvmm`), parsed.
fn sidecar(image: &Path) -> serde_json::Value {
    let mut p = image.as_os_str().to_owned();
    p.push(".ftvmm");
    let text = std::fs::read_to_string(PathBuf::from(p)).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// A primary frozen past the failover timeout loses the guest to its backup; run again, it
/// loses the race for the lock, is fenced and marks its copy stale before it stops. A primary
/// refuses to start on that copy (naming its sidecar) until the copy is attached as a backup
/// of the new primary, which makes it current again; after a clean stop a primary starts on it.
#[test]
fn a_fenced_primarys_copy_is_refused_as_a_primary_until_attached_as_a_backup() {
    let Some(rig) = rig("mirror-stale", "mst") else {
        return;
    };
    let (Sides { p, b, .. }, sock) = backup_with_socket(&rig, 2);
    let sock_arg = sock.to_str().unwrap();
    assert_eq!(sidecar(&rig.disks.0)["state"], "current");
    p.signal(libc::SIGSTOP);
    wait_live(&b);
    p.signal(libc::SIGCONT);
    let p = p.wait(Duration::from_secs(60));
    p.assert_code(5);
    let stale = sidecar(&rig.disks.0);
    eprintln!("the fenced side's sidecar: {stale}");
    assert_eq!(stale["state"], "stale", "{stale:#}\n{}", p.stderr);
    // The same flags as the pair's, on host 0 again.
    let again = host0_pair(&rig);
    let refused = again.primary_on(0).wait(Duration::from_secs(60));
    assert_eq!(refused.code(), 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("stale") && refused.stderr.contains("disk.img.ftvmm"),
        "the refusal does not say why: {}",
        refused.stderr
    );
    eprintln!(
        "refused: {}",
        refused.stderr.lines().last().unwrap_or_default()
    );
    // Attached as the new primary's backup, the copy is current again.
    let a = again.backup_on(0, &again.addr(1));
    again.wait_attached(&b, &a, 1);
    assert!(
        ftvmm_tests::wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
            sidecar(&rig.disks.0)["state"] == "current"
        }),
        "the attach did not make the copy current: {:#}",
        sidecar(&rig.disks.0)
    );
    let (g0, g1) = (sidecar(&rig.disks.0), sidecar(&rig.disks.1));
    assert_eq!(g0["generation"], g1["generation"], "{g0:#}\n{g1:#}");
    let (code, out, err) = ctl(&["--api-socket", sock_arg, "stop"]);
    assert_eq!(code, 0, "{out}{err}");
    stopped_alike(b, a, &rig.disks);
    let p = again.primary_on(0);
    again.wait_listening(&p);
    p.signal(libc::SIGKILL);
}

/// A mirrored pair on the rig ([`mirrored_diskwrite`]) whose backup has an API socket
/// (`b.sock` in the rig's directory), once the client saw record `synced` synced.
fn backup_with_socket(rig: &Rig, synced: u64) -> (Sides, PathBuf) {
    let sock = rig.dir.join("b.sock");
    let sides = mirrored_diskwrite(rig, &[], &["--api-socket", sock.to_str().unwrap()]);
    assert!(
        sides.p.wait_stdout(
            &format!("record {synced} synced\r\n"),
            Duration::from_secs(300)
        ),
        "{}",
        sides.p.stdout()
    );
    (sides, sock)
}

/// The pair's flags again, for a side on host 0 with host 0's copy (the old primary's host
/// coming back).
fn host0_pair(rig: &Rig) -> Pair<'_> {
    pair_of(rig)
        .args(["--serial-input", "none"])
        .args(linux_machine(LINUX_CMDLINE, &rig.disks.0).unwrap())
}

/// What every side of a mirrored pair on the rig takes: its hosts, key, lock and disk mode,
/// and a failover timeout a loaded machine does not reach (these tests run nine Linux pairs at
/// once on two cores: a side stalled past the default 300 ms lost a healthy peer). The kill
/// trials do not wait for it: a killed side's kernel closes its connections at once.
fn pair_of(rig: &Rig) -> Pair<'_> {
    Pair::on_hosts(&rig.hosts)
        .key(&key_file(&rig.dir, "key", 51))
        .lock(&format!("etcd:{}/ftvmm/mirror", rig.etcd.endpoint))
        .args(["--disk-mode", "mirrored"])
        .failover_timeout("5s")
}
