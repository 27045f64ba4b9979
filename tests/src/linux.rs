//! The Linux guest: its images and machine flags, and its boot to the shell prompt (with and
//! without a NIC), done once and shared as a snapshot (`LinuxReady`); fault reports in its output.

use crate::{ftvmm_bin, root, Ftvmm, Hosts, Run};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
