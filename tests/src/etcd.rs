//! A real etcd, the lock service of a pair in the multi-host tests.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A real etcd (Debian's `etcd-server`): the lock service of a pair. It listens on `addr`:2379
/// (inside network namespace `netns` when given), keeps its data in `dir`/etcd (emptied first)
/// and its log in `dir`/etcd.log; it is killed (only it) when dropped, and its data (~120 MB of
/// preallocated write-ahead log) removed, the log kept.
pub struct Etcd {
    child: std::process::Child,
    data: std::path::PathBuf,
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
        let etcd = Etcd {
            child,
            endpoint,
            data,
        };
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
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
