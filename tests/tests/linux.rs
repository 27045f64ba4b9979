//! The Linux guest (images/build-linux) under the real ftvmm: boot to `ftvmm-guest: ready`,
//! run shell commands, use the disk, boot twice identically, record and replay a boot.
//!
//! A Linux boot takes about a minute here (guest kernel code is emulated), so the suite boots
//! once, saves a snapshot at the shell prompt, and restores it for every further trial. Only the
//! tests that are about booting boot again.
//!
//! The images must exist (`images/build-linux`, which `scripts/test` runs first); set
//! `FTVMM_SKIP_LINUX=1` to skip these tests on purpose.

use ftvmm_tests::{root, scratch, Ftvmm, Run};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

const CMDLINE: &str = "console=ttyS0 panic=-1";
const PROMPT: &str = "ftvmm# ";
const BOOT_LIMIT: Duration = Duration::from_secs(600);

fn skip() -> bool {
    if std::env::var_os("FTVMM_SKIP_LINUX").is_some() {
        eprintln!("FTVMM_SKIP_LINUX is set: skipping the Linux guest tests");
        return true;
    }
    false
}

fn images() -> (PathBuf, PathBuf) {
    let dir = root().join("images/out/linux");
    let (k, i) = (dir.join("vmlinux"), dir.join("initramfs.cpio"));
    assert!(
        k.exists() && i.exists(),
        "{} or {} missing: run images/build-linux (or set FTVMM_SKIP_LINUX=1)",
        k.display(),
        i.display()
    );
    (k, i)
}

/// ftvmm on the Linux guest with the suite's disk.
fn linux(disk: &std::path::Path) -> Ftvmm {
    let (k, i) = images();
    Ftvmm::standalone(&k)
        .args([
            "--initrd",
            i.to_str().unwrap(),
            "--cmdline",
            CMDLINE,
            "--disk",
            disk.to_str().unwrap(),
        ])
        .timeout(BOOT_LIMIT)
}

fn blank_disk(path: &std::path::Path) {
    std::fs::write(path, vec![0u8; 16 << 20]).unwrap();
}

struct Booted {
    run: Run,
    snapshot: PathBuf,
    disk: PathBuf,
}

/// Boots once (per test binary) to the shell prompt and saves a snapshot there.
fn booted() -> &'static Booted {
    static BOOTED: OnceLock<Booted> = OnceLock::new();
    BOOTED.get_or_init(|| {
        let dir = scratch("linux-booted");
        let disk = dir.join("disk.img");
        blank_disk(&disk);
        let snapshot = dir.join("ready.snap");
        let run = linux(&disk)
            .args(["--snapshot-on-exit", snapshot.to_str().unwrap()])
            .args(["--serial-input", "none"])
            .run_until_output(PROMPT);
        run.assert_code(0);
        assert!(snapshot.exists(), "no snapshot saved:\n{}", run.stderr);
        Booted {
            run,
            snapshot,
            disk,
        }
    })
}

/// Restores the booted snapshot with a copy of its disk, types `input`, and stops once
/// `marker` appears.
fn restore_and_type(name: &str, input: &str, marker: &str) -> (Run, PathBuf) {
    let b = booted();
    let dir = scratch(name);
    let disk = dir.join("disk.img");
    std::fs::copy(&b.disk, &disk).unwrap();
    let run = linux(&disk)
        .args(["--restore", b.snapshot.to_str().unwrap()])
        .input(input.as_bytes(), Duration::from_millis(300))
        .timeout(Duration::from_secs(120))
        .run_until_output(marker);
    assert!(
        run.stdout.contains(marker),
        "`{marker}` never appeared:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    (run, disk)
}

#[test]
fn boots_to_ready_and_a_shell() {
    if skip() {
        return;
    }
    let out = &booted().run.stdout;
    assert!(out.contains("Run /init as init process"), "{out}");
    assert!(out.contains("ftvmm-guest: ready\r\n"), "{out}");
    assert!(out.contains(PROMPT), "{out}");
}

#[test]
fn a_shell_command_runs_and_answers() {
    if skip() {
        return;
    }
    let (run, _) = restore_and_type("linux-shell", "echo hello-$((6*7))\n", "hello-42");
    assert!(run.stdout.contains("hello-42"), "{}", run.stdout);
}

/// The profile's `clearcpuid=` fits the kernel's 127 characters because clearing a feature
/// clears its dependants (arch/x86/kernel/cpu/cpuid-deps.c): `sse2` takes SSE3 (`pni`) up to
/// SSE4.2, AES and PCLMULQDQ with it, `xsave` takes AVX. The guest's own view says so.
#[test]
fn clearcpuid_hides_the_dependent_features_too() {
    if skip() {
        return;
    }
    let (run, _) = restore_and_type(
        "linux-cpuflags",
        "grep -m1 ^flags /proc/cpuinfo; echo flags-$((2+3))-done\n",
        "flags-5-done",
    );
    let flags: Vec<&str> = run
        .stdout
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_else(|| panic!("no flags line:\n{}", run.stdout))
        .split_whitespace()
        .collect();
    for hidden in [
        "sse2",
        "pni",
        "ssse3",
        "sse4_1",
        "sse4_2",
        "aes",
        "pclmulqdq",
        "cx16",
        "xsave",
        "avx",
        "avx2",
        "popcnt",
        "movbe",
        "rdrand",
        "bmi1",
        "erms",
    ] {
        assert!(!flags.contains(&hidden), "{hidden} is visible: {flags:?}");
    }
    for kept in ["fpu", "fxsr", "sse", "cx8", "cmov"] {
        assert!(flags.contains(&kept), "{kept} is gone: {flags:?}");
    }
}

#[test]
fn the_disk_is_dev_vda_and_keeps_what_is_written() {
    if skip() {
        return;
    }
    let script = "mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && \
                  echo payload-$((40+2)) > /mnt/f && umount /mnt && mount /dev/vda /mnt && \
                  cat /mnt/f && umount /mnt && sync && echo disk-$((1+1))-done\n";
    // The marker is computed, so the shell's echo of the command line does not contain it.
    let (run, disk) = restore_and_type("linux-disk", script, "disk-2-done");
    assert!(run.stdout.contains("payload-42"), "{}", run.stdout);
    // The filesystem reached the host's image: look for the ext2 magic and the file's bytes.
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(
        &data[1024 + 56..1024 + 58],
        &[0x53, 0xef],
        "no ext2 superblock on the image"
    );
    let needle = b"payload-42\n";
    assert!(
        data.windows(needle.len()).any(|w| w == needle),
        "the file's contents are not on the host's image"
    );
}

/// Boots with the virtual clock and a script, until the script's marker.
fn scripted_boot(name: &str, extra: &[&str]) -> Run {
    let dir = scratch(name);
    let disk = dir.join("disk.img");
    blank_disk(&disk);
    let script = dir.join("script.txt");
    // `reboot -f` does not wait for the console: give the tty a moment to send the answer.
    std::fs::write(&script, "echo scripted-$((6*7))\nsleep 1; reboot -f\n").unwrap();
    let run = linux(&disk)
        .args(["--serial-input", script.to_str().unwrap()])
        .args(["--serial-input-after", PROMPT])
        .args(extra)
        .run();
    run.assert_code(0);
    assert!(run.stdout.contains("scripted-42"), "{}", run.stdout);
    run
}

#[test]
fn two_boots_with_the_same_script_take_the_same_exits() {
    if skip() {
        return;
    }
    let a = std::thread::spawn(|| scripted_boot("linux-det-a", &["--clock", "virtual"]));
    let b = scripted_boot("linux-det-b", &["--clock", "virtual"]);
    let a = a.join().unwrap();
    assert!(a.exits().unwrap() > 10_000, "{}", a.stderr);
    assert_eq!(
        a.digest_line(),
        b.digest_line(),
        "two Linux boots took different exits"
    );
    assert_eq!(a.stdout, b.stdout);
}

fn record_and_replay(name: &str, clock: &str) {
    let dir = scratch(name);
    let log = dir.join("boot.ftl");
    let rec = scripted_boot(name, &["--clock", clock, "--record", log.to_str().unwrap()]);
    let disk = scratch(&format!("{name}-replay")).join("disk.img");
    blank_disk(&disk);
    let (k, i) = images();
    let rep = Ftvmm::raw(&["--role", "replay", "--kernel", k.to_str().unwrap()])
        .args(["--initrd", i.to_str().unwrap(), "--cmdline", CMDLINE])
        .args([
            "--disk",
            disk.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ])
        .timeout(BOOT_LIMIT)
        .run();
    rep.assert_code(0);
    assert_eq!(rep.stdout, rec.stdout, "replayed output differs");
    assert_eq!(rep.digest_line(), rec.digest_line());
}

/// A whole Linux boot, a command and a reset, recorded and replayed: every exit checked.
/// On the virtual clock, so every input arrives at an exit (no checkpoints: the `spin` test
/// covers those).
#[test]
fn a_recorded_boot_replays_exactly() {
    if skip() {
        return;
    }
    record_and_replay("linux-record", "virtual");
}

/// The same on the host clock: hundreds of checkpoints, taken wherever a kick lands (this is
/// how a checkpoint right after an MMIO read was found to need `Vm::restore`'s settle: about
/// one boot in three has one).
#[test]
fn a_recorded_boot_with_checkpoints_replays_exactly() {
    if skip() {
        return;
    }
    record_and_replay("linux-record-host", "host");
}

/// One process of [`a_backup_replaying_a_workload_ends_with_the_primarys_ram`]: output in files
/// of `dir`, guest RAM dumped to `<name>.ram` at the end, pinned to host CPU `cpu`.
struct Pinned {
    child: std::process::Child,
    out: PathBuf,
    err: PathBuf,
    ram: PathBuf,
}

impl Pinned {
    fn spawn(dir: &std::path::Path, name: &str, cpu: usize, args: &[&str]) -> Pinned {
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let (out, err, ram) = (
            dir.join(format!("{name}.out")),
            dir.join(format!("{name}.err")),
            dir.join(format!("{name}.ram")),
        );
        let mut cmd = Command::new(ftvmm_tests::ftvmm_bin());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        cmd.args(ftvmm_tests::lane_args(&args))
            .env("FTVMM_DUMP_RAM", &ram)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        // SAFETY: between fork and exec the closure only calls sched_setaffinity(2), which is
        // async-signal-safe, on a CPU set it owns.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn ftvmm");
        Pinned {
            child,
            out,
            err,
            ram,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits until stderr contains `text`.
    fn wait_stderr(&self, text: &str, limit: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if self.stderr().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits for the process to end (killing it after `limit`) and returns what it did.
    fn finish(mut self, limit: Duration) -> (Run, Vec<u8>) {
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break Some(s);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let run = Run {
            status,
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: self.stderr(),
            elapsed: start.elapsed(),
        };
        (run, std::fs::read(&self.ram).unwrap_or_default())
    }
}

/// The host CPUs this process may run on, lowest first.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity(2) fills the cpu_set_t it is given, of the size it is told.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        set
    };
    // SAFETY: CPU_ISSET reads the set, for a CPU number below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// The lowest host CPU this process may run on.
fn first_cpu() -> usize {
    *allowed_cpus().first().expect("no CPU to run on")
}

/// The highest host CPU this process may run on.
fn last_cpu() -> usize {
    *allowed_cpus().last().expect("no CPU to run on")
}

/// The guest-physical addresses of the pages that differ.
fn differing_pages(a: &[u8], b: &[u8]) -> Vec<String> {
    assert_eq!(a.len(), b.len(), "RAM dumps of different sizes");
    a.chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| format!("{:#x}", i * 4096))
        .collect()
}

/// A workload recorded by a primary (restored from the booted snapshot) and replayed by its
/// backup: both end with the same exits *and the same RAM, page for page*. The guest kernel
/// reads the TSC for entropy on every interrupt and every fork and exit; without the VMM's TSC
/// sites (vmm/src/tsc.rs) the `irq_randomness` page differed.
///
/// Both processes run on one host CPU: guest user space's CPUID is not intercepted on this KVM
/// and leaf 1 EBX carries the initial APIC ID of the host CPU it ran on, which glibc keeps in
/// every process (a known divergence source, ENVIRONMENT.md, that this test is not about).
#[test]
fn a_backup_replaying_a_workload_ends_with_the_primarys_ram() {
    if skip() {
        return;
    }
    let b = booted();
    let dir = scratch("linux-ft-ram");
    let disk = dir.join("disk.img");
    std::fs::copy(&b.disk, &disk).unwrap();
    let key = dir.join("key");
    std::fs::write(&key, [0x5au8; 32]).unwrap();
    let (k, i) = images();
    let machine = [
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--cmdline",
        CMDLINE,
        "--disk",
        disk.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--log-level",
        "info",
    ];
    let cpu = first_cpu();
    let mut primary_args = vec!["--role", "primary", "--listen", "127.0.0.1:0"];
    primary_args.extend(machine);
    primary_args.extend(["--restore", b.snapshot.to_str().unwrap()]);
    primary_args.extend(["--serial-input", "-"]);
    let mut primary = Pinned::spawn(&dir, "primary", cpu, &primary_args);
    const LISTENING: &str = "listening for a backup on ";
    assert!(
        primary.wait_stderr(LISTENING, Duration::from_secs(60)),
        "the primary never listened:\n{}",
        primary.stderr()
    );
    let err = primary.stderr();
    // "... listening for a backup on 127.0.0.1:PORT: no backup attached ..."
    let addr = err.split(LISTENING).nth(1).unwrap();
    let addr = addr.split(':').take(2).collect::<Vec<_>>().join(":");
    let mut backup_args = vec!["--role", "backup", "--primary", addr.as_str()];
    backup_args.extend(machine);
    let backup = Pinned::spawn(&dir, "backup", cpu, &backup_args);
    assert!(
        primary.wait_stderr(" attached: ", Duration::from_secs(120)),
        "the backup never attached:\n{}\n{}",
        primary.stderr(),
        backup.stderr()
    );
    // Forks and exits (usleep), interrupts, output: a few seconds of it, then off (`poweroff -f`
    // does not wait for the console: give the tty a moment to send the marker).
    let mut stdin = primary.child.stdin.take().unwrap();
    std::io::Write::write_all(
        &mut stdin,
        b"/workloads/counter & sleep 3; kill $!; echo stopped-$((6*7)); sleep 1; poweroff -f\n",
    )
    .unwrap();
    let (p, p_ram) = primary.finish(Duration::from_secs(300));
    drop(stdin);
    let (b, b_ram) = backup.finish(Duration::from_secs(120));
    p.assert_code(0);
    b.assert_code(0);
    assert!(p.stdout.contains("stopped-42"), "{}", p.stdout);
    assert_eq!(
        p.digest_line(),
        b.digest_line(),
        "{}\n{}",
        p.stderr,
        b.stderr
    );
    assert!(
        b.stat("tsc-reads") > 0,
        "the backup completed no TSC site:\n{}",
        b.stderr
    );
    let differ = differing_pages(&p_ram, &b_ram);
    assert!(
        differ.is_empty(),
        "{} pages of guest RAM differ between primary and backup: {}\n{}\n{}",
        differ.len(),
        differ.join(" "),
        p.stderr,
        b.stderr
    );
}

/// A CPU hog on host CPU `cpu` (a shell spinning), paused and resumed at random moments by a
/// thread of the test, so that the load beside the VMM changes unpredictably. Started and
/// stopped by the test, by PID.
struct Hog {
    pid: libc::pid_t,
    child: std::process::Child,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hog {
    fn start(cpu: usize) -> Hog {
        use std::os::unix::process::CommandExt;
        use std::sync::atomic::Ordering;
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "while :; do :; done"]);
        // SAFETY: between fork and exec the closure only calls sched_setaffinity(2), which is
        // async-signal-safe, on a CPU set it owns.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn the CPU hog");
        let pid = child.id() as libc::pid_t;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let mut seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("CPU hog pid {pid} on CPU {cpu}, seed {seed:#x}");
        let thread = std::thread::spawn(move || {
            let mut running = true;
            while !flag.load(Ordering::Acquire) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                std::thread::sleep(Duration::from_millis(1 + seed % 40));
                running = !running;
                let sig = if running {
                    libc::SIGCONT
                } else {
                    libc::SIGSTOP
                };
                // SAFETY: kill(2) on the hog's own PID, which this test started and has not
                // reaped yet (`Hog::drop` stops this thread before it waits for the child).
                unsafe { libc::kill(pid, sig) };
            }
        });
        Hog {
            pid,
            child,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: kill(2) on the hog's PID, not yet reaped (the wait follows).
        unsafe {
            libc::kill(self.pid, libc::SIGCONT);
            libc::kill(self.pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A workload recorded on the host clock while a CPU hog competes for the same host CPU at
/// random moments: kicks, interrupt-window hits and late timer ticks (reinjected) fall wherever
/// the host's scheduling puts them, and the replay (restored from the same snapshot) still
/// takes the same exits, prints the same output and ends with the same RAM, page for page.
/// Recorder, hog and replay share one host CPU (see the test above for why the RAM comparison
/// needs one CPU): the last one, so that the hog does not starve the pair of the test above,
/// pinned to the first, when both run at once (its peer timeout is 300 ms).
#[test]
fn a_workload_recorded_under_a_competing_cpu_hog_replays_exactly() {
    if skip() {
        return;
    }
    let b = booted();
    let dir = scratch("linux-hog");
    let (rec_disk, rep_disk, log) = (
        dir.join("record.img"),
        dir.join("replay.img"),
        dir.join("counter.ftl"),
    );
    std::fs::copy(&b.disk, &rec_disk).unwrap();
    std::fs::copy(&b.disk, &rep_disk).unwrap();
    let (k, i) = images();
    let machine = |disk: &std::path::Path| {
        vec![
            "--kernel".to_string(),
            k.display().to_string(),
            "--initrd".into(),
            i.display().to_string(),
            "--cmdline".into(),
            CMDLINE.into(),
            "--disk".into(),
            disk.display().to_string(),
            "--restore".into(),
            b.snapshot.display().to_string(),
            "--log-level".into(),
            "info".into(),
        ]
    };
    let cpu = last_cpu();
    let hog = Hog::start(cpu);
    let mut rec_args = vec!["--role".to_string(), "standalone".into()];
    rec_args.extend(machine(&rec_disk));
    rec_args.extend(["--serial-input", "-", "--record"].map(String::from));
    rec_args.push(log.display().to_string());
    let rec_args: Vec<&str> = rec_args.iter().map(String::as_str).collect();
    let mut recorder = Pinned::spawn(&dir, "record", cpu, &rec_args);
    let mut stdin = recorder.child.stdin.take().unwrap();
    std::io::Write::write_all(
        &mut stdin,
        b"/workloads/counter & sleep 4; kill $!; echo stopped-$((6*7)); sleep 1; poweroff -f\n",
    )
    .unwrap();
    let (rec, rec_ram) = recorder.finish(Duration::from_secs(300));
    drop(stdin);
    drop(hog);
    rec.assert_code(0);
    assert!(rec.stdout.contains("stopped-42"), "{}", rec.stdout);
    // The sites are breakpoints: where they fire (the probe says), busy kernel code hits them.
    if ftvmm_tests::host()["mechanisms"]["breakpoints"] == true {
        assert!(
            rec.stat("window-hits") > 0,
            "no interrupt-window site was hit:\n{}",
            rec.stderr
        );
    }
    let mut rep_args = vec!["--role".to_string(), "replay".into()];
    rep_args.extend(machine(&rep_disk));
    rep_args.push("--log".into());
    rep_args.push(log.display().to_string());
    let rep_args: Vec<&str> = rep_args.iter().map(String::as_str).collect();
    let (rep, rep_ram) =
        Pinned::spawn(&dir, "replay", cpu, &rep_args).finish(Duration::from_secs(300));
    rep.assert_code(0);
    assert_eq!(rep.stdout, rec.stdout, "replayed output differs");
    assert_eq!(
        rep.digest_line(),
        rec.digest_line(),
        "{}\n{}",
        rec.stderr,
        rep.stderr
    );
    let differ = differing_pages(&rec_ram, &rep_ram);
    assert!(
        differ.is_empty(),
        "{} pages of guest RAM differ between recording and replay: {}",
        differ.len(),
        differ.join(" ")
    );
}
