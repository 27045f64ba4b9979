//! Failover between hosts that are real machines: each host is a stock-KVM machine of its own
//! (scripts/stock-host: QEMU's TCG with SVM and nested paging, Debian's kernel and `kvm_amd`),
//! with its own kernel and TCP stack. The machines are joined by two bridges on this machine:
//! the pair network (the logging channel) and the storage network, where etcd (Debian's
//! `etcd-server`, on this machine) is the arbiter. The guest's disk, its serial files and the
//! key are in one directory of this machine that every host mounts (9p), as hosts share a
//! network filesystem: what a host wrote there before it died is there, and nothing a host
//! still buffered is (docs/HARDWARE.md, "Two hosts that are real machines").
//!
//! "Kill a host" is SIGKILL of its QEMU: its kernel sends no FIN and no RST, and only silence
//! tells the survivor. "Partition" takes one host's pair-network link down; both still reach
//! etcd.
//!
//! Runs on this machine (it starts the machines itself); `FTVMM_SKIP_STOCK=1` leaves it out.
//! `FTVMM_MACHINE_TRIALS=N` runs N kill trials of each Linux workload (default 2; 1 mirrored);
//! `FTVMM_MACHINES_REPORT=FILE` appends one JSON line per kill trial (the bench reads them).

use ftvmm_tests::{
    assert_counter_across, assert_synced_records_kept, assert_ticks_across, client_result,
    consecutive, ftvmm_bin, http_get, joins, net_client, numbers, root, sh, test_guest, trials,
    Etcd, GUEST_MAC, LINUX_NET_CMDLINE, LINUX_PROMPT,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The machines of one test at a time: each is a whole emulated computer.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
const PORT: u16 = 7000;

fn skipped() -> bool {
    let skip = std::env::var_os("FTVMM_SKIP_STOCK").is_some();
    if skip {
        eprintln!("FTVMM_SKIP_STOCK is set: skipping the tests on real machines");
    }
    skip
}

/// The two networks on this machine: a bridge each, a tap per host on each.
struct Lan {
    tag: String,
    subnet: u32,
    hosts: usize,
}

impl Lan {
    fn new(tag: &str, hosts: usize) -> Lan {
        let subnet = std::process::id() % 200 + 20;
        let lan = Lan {
            tag: format!("{tag}{}", std::process::id() % 1000),
            subnet,
            hosts,
        };
        lan.cleanup();
        let setup = || -> Result<(), String> {
            for net in ["p", "s"] {
                let br = lan.bridge(net);
                sh(&["ip", "link", "add", &br, "type", "bridge"])?;
                sh(&["ip", "link", "set", &br, "up"])?;
                for i in 0..hosts {
                    let tap = lan.tap(net, i);
                    sh(&["ip", "tuntap", "add", "dev", &tap, "mode", "tap"])?;
                    sh(&["ip", "link", "set", &tap, "master", &br])?;
                    sh(&["ip", "link", "set", &tap, "up"])?;
                }
            }
            // This machine on the storage network: etcd listens there.
            let gw = format!("{}/24", lan.storage_gateway());
            sh(&["ip", "addr", "add", &gw, "dev", &lan.bridge("s")])?;
            // A client of the guest's services, on the storage network too (the guest LAN:
            // each host bridges the guest's tap with its storage NIC, tests/guest-lan.sh).
            let (ns, veth) = (lan.client_ns(), format!("ftcv{}", lan.tag));
            sh(&["ip", "netns", "add", &ns])?;
            sh(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            sh(&["ip", "link", "set", &veth, "master", &lan.bridge("s")])?;
            sh(&["ip", "link", "set", &veth, "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                "10.240.0.2/16",
                "dev",
                "eth0",
            ])
        };
        if let Err(e) = setup() {
            lan.cleanup();
            panic!("cannot build the machines' networks (root needed): {e}");
        }
        lan
    }

    /// The namespace of the guest's client: 10.240.0.2/16 on the storage network.
    fn client_ns(&self) -> String {
        format!("ftc{}", self.tag)
    }

    fn bridge(&self, net: &str) -> String {
        format!("ft{net}b{}", self.tag)
    }

    fn tap(&self, net: &str, host: usize) -> String {
        format!("ft{net}{host}{}", self.tag)
    }

    /// Host `i`'s address on the pair network.
    fn pair_addr(&self, i: usize) -> String {
        format!("10.202.{}.{}", self.subnet, 10 + i)
    }

    fn storage_addr(&self, i: usize) -> String {
        format!("10.203.{}.{}", self.subnet, 10 + i)
    }

    fn storage_gateway(&self) -> String {
        format!("10.203.{}.1", self.subnet)
    }

    /// The `scripts/stock-host --net` arguments of host `i`.
    fn nics(&self, i: usize) -> Vec<String> {
        vec![
            "--net".into(),
            format!("{}={}/24", self.tap("p", i), self.pair_addr(i)),
            "--net".into(),
            format!("{}={}/24", self.tap("s", i), self.storage_addr(i)),
        ]
    }

    /// Takes host `i`'s pair-network link down (its end on this machine).
    fn cut(&self, i: usize) {
        sh(&["ip", "link", "set", &self.tap("p", i), "down"]).expect("cut the link");
    }

    fn cleanup(&self) {
        let _ = sh(&["ip", "netns", "del", &self.client_ns()]);
        let _ = sh(&["ip", "link", "del", &format!("ftcv{}", self.tag)]);
        for net in ["p", "s"] {
            for i in 0..self.hosts {
                let _ = sh(&["ip", "link", "del", &self.tap(net, i)]);
            }
            let _ = sh(&["ip", "link", "del", &self.bridge(net)]);
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// etcd on this machine, on the storage network of `lan`, its data in `target/machines`.
fn etcd(lan: &Lan) -> Etcd {
    let dir = root()
        .join("target/machines")
        .join(format!("etcd-{}", lan.tag));
    std::fs::create_dir_all(&dir).expect("etcd directory");
    Etcd::start(
        None,
        &lan.storage_gateway(),
        24000 + lan.subnet as u16,
        &dir,
    )
}

/// One host: a stock-KVM machine running one command (ftvmm), its console in a file.
struct Machine {
    name: String,
    child: Child,
    pidfile: PathBuf,
    console: PathBuf,
    status: Option<i32>,
}

impl Machine {
    /// Starts host `i` of `lan`, with `shared` mounted, running `argv`.
    fn start(lan: &Lan, i: usize, shared: &Path, argv: &[String]) -> Machine {
        let name = format!("host{i}");
        let pidfile = shared.join(format!("{name}.qemu.pid"));
        let console = shared.join(format!("{name}.console"));
        let _ = std::fs::remove_file(&pidfile);
        let out = std::fs::File::create(&console).expect("console file");
        let child = Command::new(root().join("scripts/stock-host"))
            .args(["--name", &name, "--memory", "1536M", "--timeout", "1200"])
            .args([
                "--smp",
                &std::env::var("FTVMM_MACHINES_SMP").unwrap_or("1".into()),
            ])
            .arg("--out")
            .arg(shared)
            .arg("--pidfile")
            .arg(&pidfile)
            .args(lan.nics(i))
            .arg("--")
            .args(std::env::var("FTVMM_MACHINES_WRAP").ok().filter(|_| i == 0))
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("console file"))
            .stderr(out)
            .spawn()
            .expect("start scripts/stock-host");
        Machine {
            name,
            child,
            pidfile,
            console,
            status: None,
        }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    fn wait_console(&self, marker: &str, limit: Duration) -> bool {
        wait_until(limit, || self.console().contains(marker))
    }

    fn expect_console(&self, marker: &str, limit: Duration) {
        assert!(
            self.wait_console(marker, limit),
            "{}: no '{marker}' within {limit:?}:\n{}",
            self.name,
            self.console()
        );
    }

    fn qemu_pid(&self) -> Option<libc::pid_t> {
        std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL of the machine's QEMU: the host dies, mid-instruction, with no goodbye. The
    /// moment it was sent.
    fn kill(&mut self) -> Instant {
        let pid = self.qemu_pid().expect("the machine's QEMU pid");
        // SAFETY: kill(2) of the QEMU this machine started: scripts/stock-host waits for it, so
        // its pid is not reused while our child (the script) runs, which it does until QEMU ends.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        Instant::now()
    }

    /// Waits for the machine to end: the exit status of its command (scripts/stock-host's:
    /// 126 when the machine was killed).
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while self.status.is_none() && start.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = s.code();
                return self.status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.status
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            if self.qemu_pid().is_some() {
                self.kill();
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for `what`, polling every 5 ms (fine enough to time a failover from outside).
fn wait_until(limit: Duration, what: impl FnMut() -> bool) -> bool {
    ftvmm_tests::wait_until(limit, Duration::from_millis(5), what)
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Where a Linux pair's disk lives: one image on the shared directory that both hosts open
/// (`--disk-mode shared`, the default), or a copy per host (`--disk-mode mirrored`): host `i`'s
/// is `host{i}.img`, which only host `i` opens; the shared directory is only how the test
/// reads it afterwards.
#[derive(Clone, Copy, PartialEq)]
enum Disk {
    None,
    Shared,
    Mirrored,
}

/// A pair's directory on this machine, which every host mounts: the key, the disk, the serial
/// input and each host's serial output.
struct Shared {
    dir: PathBuf,
    lock: String,
    machine: Vec<String>,
    disk: Disk,
    /// The guest has a NIC (tap `tapg`, bridged inside each host with its storage NIC).
    net: bool,
}

/// A Linux pair: its workload, its disk, whether its guest has a NIC.
#[derive(Clone, Copy)]
struct Linux<'a> {
    workload: &'a str,
    disk: Disk,
    net: bool,
}

impl Linux<'_> {
    fn counter() -> Linux<'static> {
        Linux {
            workload: "counter",
            disk: Disk::Shared,
            net: false,
        }
    }

    fn diskwrite(disk: Disk) -> Linux<'static> {
        Linux {
            workload: "diskwrite",
            disk,
            net: false,
        }
    }
}

impl Shared {
    fn new(name: &str, etcd: &Etcd, machine: &[&str]) -> Shared {
        // Not under target/test-scratch: that is each stock host's own tmpfs.
        let dir = root().join("target/machines").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("shared directory");
        let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(29) ^ 0x5a).collect();
        std::fs::write(dir.join("key"), key).expect("key");
        Shared {
            lock: format!("etcd:{}/ftvmm/{name}", etcd.endpoint),
            machine: machine.iter().map(|s| s.to_string()).collect(),
            dir,
            disk: Disk::None,
            net: false,
        }
    }

    /// The directory of a pair of the Linux guest (zeroed disks in it) that types
    /// `/workloads/{workload}` once the guest's prompt is up (nothing when the workload is
    /// empty); and the serial-input flags that type it.
    fn linux(name: &str, etcd: &Etcd, guest: Linux) -> (Shared, [String; 4]) {
        let mut shared = Shared::new(name, etcd, &[]);
        let dir = root().join("images/out/linux");
        shared.disk = guest.disk;
        shared.net = guest.net;
        let copies = if guest.disk == Disk::Mirrored { 3 } else { 1 };
        for host in 0..copies {
            std::fs::write(shared.disk(host), vec![0u8; 16 << 20]).expect("disk");
        }
        let cmdline = if guest.net {
            LINUX_NET_CMDLINE
        } else {
            "console=ttyS0 panic=-1"
        };
        shared.machine = vec![
            "--kernel".to_string(),
            dir.join("vmlinux").display().to_string(),
            "--initrd".into(),
            dir.join("initramfs.cpio").display().to_string(),
            "--cmdline".into(),
            cmdline.into(),
        ];
        if guest.net {
            shared
                .machine
                .extend(["--net".into(), format!("tap=tapg,mac={GUEST_MAC}")]);
        }
        let input = shared.path("input");
        let typed = if guest.workload.is_empty() {
            String::new()
        } else {
            format!("/workloads/{}\n", guest.workload)
        };
        std::fs::write(&input, typed).expect("serial input");
        let typed = [
            "--serial-input".to_string(),
            input.display().to_string(),
            "--serial-input-after".into(),
            LINUX_PROMPT.into(),
        ];
        (shared, typed)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The disk host `host` opens: the shared image, or its own copy.
    fn disk(&self, host: usize) -> PathBuf {
        match self.disk {
            Disk::Mirrored => self.path(&format!("host{host}.img")),
            _ => self.path("disk.img"),
        }
    }

    /// The command host `host` runs for a standalone run (`role_args` empty) or a side of the
    /// pair: the role, then what every run shares, then what a pair's sides share. A guest with
    /// a NIC starts behind tests/guest-lan.sh, which gives the host its guest LAN.
    fn ftvmm(
        &self,
        lan: &Lan,
        host: usize,
        role_args: &[String],
        serial: &str,
        input: &[impl AsRef<str>],
    ) -> Vec<String> {
        let mut argv = Vec::new();
        if self.net {
            argv.extend([
                "sh".to_string(),
                root().join("tests/guest-lan.sh").display().to_string(),
                format!("{}/24", lan.storage_addr(host)),
            ]);
        }
        argv.push(ftvmm_bin().display().to_string());
        if role_args.is_empty() {
            argv.extend(["--role".to_string(), "standalone".to_string()]);
        }
        argv.extend(role_args.iter().cloned());
        argv.extend(
            [
                "--log-level",
                "info",
                "--serial",
                &format!("file:{}", self.path(serial).display()),
            ]
            .map(String::from),
        );
        argv.extend(input.iter().map(|s| s.as_ref().to_string()));
        argv.extend(self.machine.iter().cloned());
        if self.disk != Disk::None {
            argv.extend(["--disk".to_string(), self.disk(host).display().to_string()]);
        }
        if role_args.is_empty() {
            return argv;
        }
        if self.disk == Disk::Mirrored {
            argv.extend(["--disk-mode".to_string(), "mirrored".to_string()]);
        }
        argv.extend(
            [
                "--key-file",
                self.path("key").to_str().unwrap(),
                "--lock",
                &self.lock,
            ]
            .map(String::from),
        );
        if let Ok(t) = std::env::var("FTVMM_MACHINES_FAILOVER_TIMEOUT") {
            argv.extend(["--failover-timeout".into(), t]);
        }
        argv
    }

    /// Host `host` as a standalone run of the guest.
    fn standalone(
        &self,
        lan: &Lan,
        host: usize,
        serial: &str,
        input: &[impl AsRef<str>],
    ) -> Machine {
        let argv = self.ftvmm(lan, host, &[], serial, input);
        Machine::start(lan, host, &self.dir, &argv)
    }

    fn primary(&self, lan: &Lan, host: usize, serial: &str, input: &[impl AsRef<str>]) -> Machine {
        let role = [
            "--role".into(),
            "primary".into(),
            "--listen".into(),
            format!("{}:{PORT}", lan.pair_addr(host)),
        ];
        let argv = self.ftvmm(lan, host, &role, serial, input);
        let m = Machine::start(lan, host, &self.dir, &argv);
        m.expect_console("listening for a backup on ", Duration::from_secs(120));
        m
    }

    fn backup(&self, lan: &Lan, host: usize, of: usize, serial: &str) -> Machine {
        let role = [
            "--role".into(),
            "backup".into(),
            "--primary".into(),
            format!("{}:{PORT}", lan.pair_addr(of)),
            "--listen".into(),
            format!("{}:{PORT}", lan.pair_addr(host)),
        ];
        let input = ["--serial-input", "none"];
        let argv = self.ftvmm(lan, host, &role, serial, &input);
        Machine::start(lan, host, &self.dir, &argv)
    }
}
/// Waits for the `n`th backup to attach to `primary`.
fn wait_attached(primary: &Machine, n: usize) {
    assert!(
        wait_until(Duration::from_secs(300), || primary
            .console()
            .matches(" attached: ")
            .count()
            >= n),
        "backup {n} never attached:\n{}",
        primary.console()
    );
}

/// What every test here sets up: its networks and etcd, one test at a time. Dropped in this
/// order: etcd, the networks, then the next test may start.
struct Rig {
    etcd: Etcd,
    lan: Lan,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl Rig {
    /// None when the tests on machines are skipped (`FTVMM_SKIP_STOCK`).
    fn new(tag: &str, hosts: usize) -> Option<Rig> {
        if skipped() {
            return None;
        }
        let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let lan = Lan::new(tag, hosts);
        Some(Rig {
            etcd: etcd(&lan),
            lan,
            _one: one,
        })
    }
}

/// How a failover went, seen from outside the hosts.
struct Failover {
    /// From the SIGKILL of the primary's QEMU to the first byte of output from the new
    /// primary in the shared directory.
    to_first_output: Duration,
    /// The survivor's own account: "detected N ms after its last message, live M ms later".
    detected_ms: u64,
    live_ms: u64,
}

/// Kills `primary`'s host and waits until `backup` is live and has printed; the figures.
fn kill_and_take_over(primary: &mut Machine, backup: &Machine, serial: &Path) -> Failover {
    let killed = primary.kill();
    assert!(
        wait_until(Duration::from_secs(120), || std::fs::metadata(serial)
            .is_ok_and(|m| m.len() > 0)),
        "no output from the new primary within 120 s:\n{}",
        backup.console()
    );
    let to_first_output = killed.elapsed();
    backup.expect_console("LIVE: took over", Duration::from_secs(60));
    let console = backup.console();
    let after = |word: &str| -> u64 {
        console
            .split(word)
            .nth(1)
            .and_then(|s| s.trim_start().split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Failover {
        to_first_output,
        detected_ms: after("(detected"),
        live_ms: after("message, live"),
    }
}

fn report(workload: &str, trial: usize, f: &Failover) {
    eprintln!(
        "{workload} trial {trial}: host death to first new output {} ms (detected {} ms after the last message, live {} ms later)",
        f.to_first_output.as_millis(),
        f.detected_ms,
        f.live_ms
    );
    if let Ok(path) = std::env::var("FTVMM_MACHINES_REPORT") {
        let line = format!(
            "{{\"workload\":\"{workload}\",\"trial\":{trial},\"first_output_ms\":{},\"detected_ms\":{},\"live_ms\":{}}}\n",
            f.to_first_output.as_millis(),
            f.detected_ms,
            f.live_ms
        );
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("report file");
        file.write_all(line.as_bytes()).expect("report");
    }
}

/// One kill trial of a Linux workload on hosts 0 (primary) and 1 (backup): the workload shows
/// `progress`, the primary's host dies 0-3 s later, the backup prints `after_lines` lines.
/// Returns what the client saw from each, and the survivor's disk (the shared image, or the
/// backup's own copy).
fn linux_trial(
    lan: &Lan,
    etcd: &Etcd,
    guest: Linux,
    trial: usize,
    progress: &str,
    after_lines: usize,
) -> (String, String, PathBuf) {
    let label = match guest.disk {
        Disk::Mirrored => format!("{}-mirrored", guest.workload),
        _ => guest.workload.to_string(),
    };
    let (shared, typed) = Shared::linux(&format!("{label}-{trial}"), etcd, guest);
    let mut p = shared.primary(lan, 0, "p.serial", &typed);
    let mut b = shared.backup(lan, 1, 0, "b.serial");
    wait_attached(&p, 1);
    assert!(
        wait_until(Duration::from_secs(300), || read(&shared.path("p.serial"))
            .contains(progress)),
        "trial {trial}: the workload never started:\n{}\n{}",
        read(&shared.path("p.serial")),
        p.console()
    );
    let ms = (trial as u64 * 7919 + u64::from(std::process::id())) % 3000;
    std::thread::sleep(Duration::from_millis(ms));
    let failover = kill_and_take_over(&mut p, &b, &shared.path("b.serial"));
    report(&label, trial, &failover);
    assert!(
        wait_until(Duration::from_secs(300), || read(&shared.path("b.serial"))
            .matches('\n')
            .count()
            >= after_lines),
        "trial {trial}: the new primary stopped:\n{}",
        b.console()
    );
    b.kill();
    b.wait(Duration::from_secs(30));
    p.wait(Duration::from_secs(30));
    (
        read(&shared.path("p.serial")),
        read(&shared.path("b.serial")),
        shared.disk(1),
    )
}

#[test]
fn linux_counter_survives_its_primary_host_dying() {
    let Some(rig) = Rig::new("c", 2) else {
        return;
    };
    let (lan, etcd) = (&rig.lan, &rig.etcd);
    for trial in 0..trials("FTVMM_MACHINE_TRIALS", 2) {
        let (before, after, _) = linux_trial(lan, etcd, Linux::counter(), trial, "n=3\r\n", 12);
        assert_counter_across(trial, &before, &after);
    }
}

#[test]
fn linux_diskwrite_survives_its_primary_host_dying_and_keeps_every_synced_record() {
    let Some(rig) = Rig::new("d", 2) else {
        return;
    };
    let (lan, etcd) = (&rig.lan, &rig.etcd);
    for trial in 0..trials("FTVMM_MACHINE_TRIALS", 2) {
        let guest = Linux::diskwrite(Disk::Shared);
        let (before, after, disk) = linux_trial(lan, etcd, guest, trial, "record 1 synced\r\n", 2);
        assert_synced_records_kept(trial, &before, &after, &disk);
    }
}

/// Mirrored disks on two machines that share no disk: each host writes its own copy, and every
/// record the client saw synced is on the survivor's copy after its partner's host died. One
/// trial by default (CI's time; tests/tests/mirror.rs kills three on the main lane).
#[test]
fn mirrored_diskwrite_survives_its_primary_host_dying_with_every_synced_record_on_the_survivor() {
    let Some(rig) = Rig::new("m", 2) else {
        return;
    };
    let (lan, etcd) = (&rig.lan, &rig.etcd);
    for trial in 0..trials("FTVMM_MACHINE_TRIALS", 1) {
        let guest = Linux::diskwrite(Disk::Mirrored);
        let (before, after, disk) = linux_trial(lan, etcd, guest, trial, "record 1 synced\r\n", 2);
        assert_synced_records_kept(trial, &before, &after, &disk);
    }
}

/// The test client on the guest LAN, in the background.
fn client(lan: &Lan, args: &[&str]) -> Child {
    net_client(&lan.client_ns(), args)
}

fn finish(c: Child) -> (bool, String) {
    client_result(c)
}

/// The networked Linux guest on two machines, its NIC bridged inside each host with the host's
/// storage NIC: transfers both ways and a request/response stream are under way when the
/// primary's host dies (its QEMU killed: no FIN, no RST from its kernel or the guest's); each
/// completes on the backup, live, with every byte right.
#[test]
fn tcp_connections_survive_their_primary_host_dying() {
    let Some(rig) = Rig::new("t", 2) else {
        return;
    };
    let (lan, etcd) = (&rig.lan, &rig.etcd);
    for trial in 0..trials("FTVMM_MACHINE_TRIALS", 2) {
        let guest = Linux {
            workload: "",
            disk: Disk::Shared,
            net: true,
        };
        let (shared, typed) = Shared::linux(&format!("tcp-{trial}"), etcd, guest);
        let mut p = shared.primary(lan, 0, "p.serial", &typed);
        let mut b = shared.backup(lan, 1, 0, "b.serial");
        wait_attached(&p, 1);
        assert!(
            wait_until(Duration::from_secs(300), || read(&shared.path("p.serial"))
                .contains(LINUX_PROMPT)),
            "trial {trial}: the guest never came up:\n{}\n{}",
            read(&shared.path("p.serial")),
            p.console()
        );
        let (ok, out) = finish(client(lan, &["echo", "3"]));
        assert!(
            ok,
            "trial {trial}: the guest does not answer: {out}\n{}",
            p.console()
        );
        let up = client(lan, &["sink", "300000"]);
        let down = client(lan, &["source", "300000"]);
        let talk = client(lan, &["echo", "200"]);
        let ms = 500 + (trial as u64 * 613 + u64::from(std::process::id())) % 2000;
        std::thread::sleep(Duration::from_millis(ms));
        p.kill();
        b.expect_console("LIVE: took over", Duration::from_secs(120));
        for (what, c) in [
            ("guest<-client", up),
            ("guest->client", down),
            ("echo", talk),
        ] {
            let (ok, out) = finish(c);
            assert!(
                ok,
                "trial {trial} (kill after {ms} ms): {what}: {out}\n--- backup ---\n{}",
                b.console()
            );
            eprintln!("trial {trial}: {what}: {}", out.trim());
        }
        b.kill();
        b.wait(Duration::from_secs(30));
        p.wait(Duration::from_secs(30));
    }
}

/// A partition of the pair network at a random moment: exactly one side stays live (exit
/// status 0 when the guest ends), the other stops with status 5 and emits nothing the client
/// would see as a contradiction.
#[test]
fn a_partition_between_machines_leaves_exactly_one_live_side() {
    let Some(rig) = Rig::new("p", 2) else {
        return;
    };
    let (lan, etcd) = (&rig.lan, &rig.etcd);
    // A minute of guest: the backup's machine boots after the primary's guest started, and
    // `ticks-long` (10 s) once ended about a second after the attach, before the cut.
    let guest = test_guest("ticks-minute").display().to_string();
    let shared = Shared::new("partition", etcd, &["--kernel", &guest]);
    let input = ["--serial-input", "none"];
    let mut p = shared.primary(lan, 0, "p.serial", &input);
    let mut b = shared.backup(lan, 1, 0, "b.serial");
    wait_attached(&p, 1);
    std::thread::sleep(Duration::from_millis(
        300 + u64::from(std::process::id()) % 1500,
    ));
    lan.cut(1);
    let limit = Duration::from_secs(600);
    let (pc, bc) = (p.wait(limit), b.wait(limit));
    let (before, after) = (
        read(&shared.path("p.serial")),
        read(&shared.path("b.serial")),
    );
    let (pcons, bcons) = (p.console(), b.console());
    let live = [pc, bc].iter().filter(|c| **c == Some(0)).count();
    assert_eq!(
        live,
        1,
        "not exactly one live side\n--- primary ({pc:?}) ---\n{pcons}\n--- backup ({bc:?}) ---\n{bcons}"
    );
    if pc == Some(0) {
        assert_eq!(bc, Some(5), "{bcons}");
        assert!(after.is_empty(), "the losing backup emitted output");
        assert_ticks_across(&before, "", 6000);
    } else {
        assert_eq!(pc, Some(5), "{pcons}");
        assert_ticks_across(&before, &after, 6000);
    }
}

/// After a failover, a third machine attaches to the new primary as its backup; that primary's
/// host dies in turn, and the third carries on: the client's counter has no gap across both.
#[test]
fn a_third_machine_reprotects_the_survivor_and_takes_over_from_it() {
    let Some(rig) = Rig::new("r", 3) else {
        return;
    };
    let (lan, etcd) = (&rig.lan, &rig.etcd);
    let (shared, typed) = Shared::linux("reprotect", etcd, Linux::counter());
    let mut first = shared.primary(lan, 0, "0.serial", &typed);
    let mut second = shared.backup(lan, 1, 0, "1.serial");
    wait_attached(&first, 1);
    assert!(
        wait_until(Duration::from_secs(300), || read(&shared.path("0.serial"))
            .contains("n=3\r\n")),
        "the counter never started:\n{}",
        first.console()
    );
    let f = kill_and_take_over(&mut first, &second, &shared.path("1.serial"));
    report("reprotect-1", 0, &f);
    let mut third = shared.backup(lan, 2, 1, "2.serial");
    wait_attached(&second, 1);
    assert!(
        wait_until(Duration::from_secs(120), || read(&shared.path("1.serial"))
            .matches('\n')
            .count()
            >= 5),
        "the second primary stopped:\n{}",
        second.console()
    );
    let f = kill_and_take_over(&mut second, &third, &shared.path("2.serial"));
    report("reprotect-2", 0, &f);
    third.expect_console("at epoch 3", Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(120), || read(&shared.path("2.serial"))
            .matches('\n')
            .count()
            >= 8),
        "the third primary stopped:\n{}",
        third.console()
    );
    third.kill();
    let [a, b, c] = ["0.serial", "1.serial", "2.serial"].map(|s| read(&shared.path(s)));
    let ok = joins(&a, &b).iter().any(|ab| {
        joins(ab, &c).iter().any(|s| {
            let n = numbers(s, "n=", "");
            !n.is_empty() && n[0] == 1 && consecutive(&n)
        })
    });
    assert!(
        ok,
        "the counter has a gap across two failovers\n--- 0 ---\n{a}\n--- 1 ---\n{b}\n--- 2 ---\n{c}"
    );
}

/// Progress of a Linux workload in `seconds` of host time from its first `marker` line, on
/// host 0 alone (standalone) and with a backup on host 1 (a primary): the lines each printed.
/// How a throughput window runs: standalone on one machine, standalone with the second machine
/// busy (a shell loop: both machines share this machine's two cores, as a busy backup's machine
/// does), standalone and recorded to the machine's memory (what recording alone costs), or as a
/// pair with the backup on the second machine.
#[derive(Clone, Copy, PartialEq)]
enum Window {
    Solo,
    SoloBesideBusy,
    Recorded,
    Ft,
}

fn window_name(mode: Window) -> &'static str {
    match mode {
        Window::Solo => "solo",
        Window::SoloBesideBusy => "busy",
        Window::Recorded => "recorded",
        Window::Ft => "ft",
    }
}

/// What a throughput window counts: lines with a marker on the serial line, or what a client on
/// the guest LAN got through (tests/net_client.py): requests answered on one connection
/// (`talk`), or KB/s into the guest (`sink`) or out of it (`source`).
#[derive(Clone, Copy, PartialEq)]
enum Measure<'a> {
    Serial(&'a str),
    Talk,
    Sink,
    Source,
}

fn window_on_machines(
    lan: &Lan,
    etcd: &Etcd,
    label: &str,
    guest: Linux,
    measure: Measure,
    mode: Window,
    seconds: u64,
) -> usize {
    let ft = mode == Window::Ft;
    let marker = match measure {
        Measure::Serial(m) => m,
        // The guest is ready at its prompt.
        _ => LINUX_PROMPT,
    };
    let name = format!("bench-{label}-{}", window_name(mode));
    let (shared, typed) = Shared::linux(&name, etcd, guest);
    let serial = shared.path("0.serial");
    let count = || read(&serial).matches(marker).count();
    let metrics = format!("{}:9464", lan.storage_addr(0));
    let (mut p, b) = if ft {
        let mut args = typed.to_vec();
        args.extend(["--metrics".to_string(), metrics.clone()]);
        if let Ok(extra) = std::env::var("FTVMM_MACHINES_PRIMARY_ARGS") {
            args.extend(extra.split_whitespace().map(String::from));
        }
        let p = shared.primary(lan, 0, "0.serial", &args);
        let b = shared.backup(lan, 1, 0, "1.serial");
        wait_attached(&p, 1);
        (p, Some(b))
    } else {
        let mut args = typed.to_vec();
        if mode == Window::Recorded {
            // The machine's own memory (target/test-scratch is a tmpfs inside each machine).
            let log = root().join("target/test-scratch/bench.ftl");
            args.extend(["--record".to_string(), log.display().to_string()]);
        }
        let busy = (mode == Window::SoloBesideBusy).then(|| {
            let spin = ["sh", "-c", "while :; do :; done"].map(String::from);
            Machine::start(lan, 1, &shared.dir, &spin)
        });
        (shared.standalone(lan, 0, "0.serial", &args), busy)
    };
    assert!(
        wait_until(Duration::from_secs(300), || count() > 0),
        "{name}: the workload never started:\n{}",
        p.console()
    );
    // The client's answer, checked, and the number in it after `word` (e.g. "OK talk 1532
    // lines in 20.0 s ...", "OK sink 1000000 bytes in 9.8 s").
    let ask = |request: &[&str]| -> String {
        let (ok, out) = finish(client(lan, request));
        assert!(ok, "{name}: {out}\n{}", p.console());
        out
    };
    let number_after = |out: &str, word: &str| -> f64 {
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .iter()
            .position(|w| *w == word)
            .and_then(|i| words.get(i + 1)?.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no number after '{word}' in: {out}"))
    };
    let lines = match measure {
        Measure::Serial(_) => {
            let start = count();
            std::thread::sleep(Duration::from_secs(seconds));
            count() - start
        }
        Measure::Talk => number_after(&ask(&["talk", &seconds.to_string()]), "talk") as usize,
        Measure::Sink | Measure::Source => {
            let what = if measure == Measure::Sink {
                "sink"
            } else {
                "source"
            };
            let bytes = 1_000_000;
            let out = ask(&[what, &bytes.to_string()]);
            (bytes as f64 / 1000.0 / number_after(&out, "in")) as usize
        }
    };
    if ft {
        // Where the primary's time went: the pair's counters at the window's end.
        // Not a check: a primary that does not answer prints no counters.
        let scrape = http_get(&metrics, "/metrics").unwrap_or_default();
        let wanted = [
            "throttled",
            "lag_seconds",
            "outputs_released",
            "log_records_sent",
            "log_bytes",
            "channel_sent_bytes",
            "checkpoints",
        ];
        for line in scrape.lines().filter(|l| {
            !l.starts_with('#') && wanted.iter().any(|w| l.starts_with(&format!("ftvmm_{w}")))
        }) {
            eprintln!("{name}: {line}");
        }
    }
    p.kill();
    if let Some(mut b) = b {
        b.kill();
    }
    lines
}

/// The throughput bench's workloads: lines on the serial line, or TCP (requests answered, KB/s
/// in and out).
const WORKLOADS: [&str; 6] = [
    "counter",
    "diskwrite",
    "diskwrite-mirrored",
    "tcp-echo",
    "tcp-in",
    "tcp-out",
];

/// Whether `FTVMM_MACHINES_BENCH` names one workload (any other value: all of them).
fn workloads_named(only: &str) -> bool {
    WORKLOADS.contains(&only)
}

/// Not a check: FT against standalone throughput with the backup on a machine of its own, as
/// users run a pair (`FTVMM_MACHINES_BENCH=1`; scripts/bench --lanes prints it).
#[test]
fn throughput_on_two_machines_ft_against_standalone() {
    if std::env::var_os("FTVMM_MACHINES_BENCH").is_none() {
        eprintln!("FTVMM_MACHINES_BENCH is not set: no throughput figures");
        return;
    }
    let Some(rig) = Rig::new("b", 2) else {
        return;
    };
    let (lan, etcd) = (&rig.lan, &rig.etcd);
    // FTVMM_MACHINES_BENCH=diskwrite (or another of WORKLOADS) measures that one only.
    let only = std::env::var("FTVMM_MACHINES_BENCH").unwrap_or_default();
    let tcp = Linux {
        workload: "",
        disk: Disk::Shared,
        net: true,
    };
    let workloads = [
        ("counter", Linux::counter(), Measure::Serial("n=")),
        (
            "diskwrite",
            Linux::diskwrite(Disk::Shared),
            Measure::Serial(" synced"),
        ),
        (
            "diskwrite-mirrored",
            Linux::diskwrite(Disk::Mirrored),
            Measure::Serial(" synced"),
        ),
        ("tcp-echo", tcp, Measure::Talk),
        ("tcp-in", tcp, Measure::Sink),
        ("tcp-out", tcp, Measure::Source),
    ];
    for (workload, guest, measure) in workloads {
        if workloads_named(&only) && only != workload {
            continue;
        }
        let modes = [
            (Window::Solo, "standalone"),
            (Window::SoloBesideBusy, "standalone beside a busy machine"),
            (Window::Recorded, "standalone, recorded"),
            (Window::Ft, "FT"),
        ];
        let mut lines = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        // FTVMM_MACHINES_BENCH_WINDOWS=solo,ft: only those windows.
        let only_windows = std::env::var("FTVMM_MACHINES_BENCH_WINDOWS").ok();
        for _ in 0..2 {
            for (i, (mode, _)) in modes.iter().enumerate() {
                if only_windows
                    .as_ref()
                    .is_some_and(|w| !w.split(',').any(|w| w == window_name(*mode)))
                {
                    continue;
                }
                let n = window_on_machines(lan, etcd, workload, guest, measure, *mode, 20);
                lines[i].push(n);
            }
        }
        let unit = match measure {
            Measure::Serial(_) => "lines in 20 s windows",
            Measure::Talk => "answers in 20 s windows",
            Measure::Sink | Measure::Source => "KB/s over 1 MB",
        };
        let solo: usize = lines[0].iter().sum();
        for (i, (_, what)) in modes.iter().enumerate().skip(1) {
            if lines[i].is_empty() {
                continue;
            }
            let sum: usize = lines[i].iter().sum();
            eprintln!(
                "{workload}: {what} / standalone {:.3} ({:?} against {:?} {unit})",
                sum as f64 / solo.max(1) as f64,
                lines[i],
                lines[0]
            );
        }
        // The two rows scripts/bench --lanes prints: FT against the guest alone on one machine,
        // and against it beside a busy second machine (both machines share this machine's two
        // cores, as the pair's do: the fair baseline).
        let ft: usize = lines[3].iter().sum();
        for (base, against) in [(0, "on two machines"), (1, "beside a busy machine")] {
            let b: usize = lines[base].iter().sum();
            if !lines[3].is_empty() && !lines[base].is_empty() {
                eprintln!(
                    "{workload}: FT / standalone {against} {:.3} ({:?} against {:?} {unit})",
                    ft as f64 / b.max(1) as f64,
                    lines[3],
                    lines[base]
                );
            }
        }
    }
}
