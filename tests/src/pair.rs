//! The fault-tolerant pair: `Pair` holds what a primary and its backup share and where they run
//! (on loopback, or on simulated hosts), and starts either side as a `Proc`, or both, the backup
//! attached (`Sides`); `key_file` writes the key they share.

use crate::{wait_until, Ftvmm, Hosts, Proc, Proxy, Run};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The port a side listens on, on its simulated host.
pub const PAIR_PORT: u16 = 7000;

/// What a primary prints once it listens, before the address.
const LISTENING: &str = "listening for a backup on ";
/// What a primary prints when a backup attached.
const ATTACHED: &str = " attached: ";

/// A primary and its backup: the flags both sides take, what each side adds, where they run.
/// On loopback ([`Pair::local`]) the primary listens on 127.0.0.1 at a port it picks; on
/// simulated hosts ([`Pair::on_hosts`]) a side runs in its host's namespace and listens on its
/// pair-network address at [`PAIR_PORT`]. Every side it starts has the same flags, so a second
/// backup, or the next one after a failover, starts as the first did.
#[derive(Clone)]
pub struct Pair<'h> {
    hosts: Option<&'h Hosts>,
    cpu: Option<u32>,
    both: Vec<String>,
    primary: Vec<String>,
    backup: Vec<String>,
    primary_env: Vec<(String, String)>,
    backup_env: Vec<(String, String)>,
    failover_timeout: Option<String>,
    proxied: bool,
    listen_limit: Duration,
    attach_limit: Duration,
}

impl Pair<'static> {
    /// A pair on loopback.
    pub fn local() -> Self {
        Pair::new(None)
    }
}

impl<'h> Pair<'h> {
    /// A pair on simulated hosts: the primary on host 0 and the backup on host 1, unless a test
    /// says otherwise ([`Pair::primary_on`], [`Pair::backup_on`]).
    pub fn on_hosts(hosts: &'h Hosts) -> Self {
        Pair::new(Some(hosts))
    }

    fn new(hosts: Option<&'h Hosts>) -> Self {
        Pair {
            hosts,
            cpu: None,
            both: Vec::new(),
            primary: Vec::new(),
            backup: Vec::new(),
            primary_env: Vec::new(),
            backup_env: Vec::new(),
            failover_timeout: None,
            proxied: false,
            listen_limit: Duration::from_secs(60),
            attach_limit: Duration::from_secs(90),
        }
    }

    /// Both sides on host CPU `cpu` only (see [`Ftvmm::on_cpu`]).
    pub fn on_cpu(mut self, cpu: u32) -> Self {
        self.cpu = Some(cpu);
        self
    }

    /// Flags both sides take: the machine, the log level...
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, args: I) -> Self {
        self.both
            .extend(args.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// The pre-shared key file both sides take (`--key-file`).
    pub fn key(self, key: &Path) -> Self {
        self.args(["--key-file", key.to_str().unwrap()])
    }

    /// The lock both sides arbitrate with (`--lock file:PATH` or `etcd:ENDPOINT/KEY`).
    pub fn lock(self, spec: &str) -> Self {
        self.args(["--lock", spec])
    }

    /// Flags only the primary takes.
    pub fn primary_args<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, args: I) -> Self {
        self.primary
            .extend(args.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// Flags only a backup takes.
    pub fn backup_args<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, args: I) -> Self {
        self.backup
            .extend(args.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// An environment variable only the primary gets (a test hook).
    pub fn primary_env(mut self, key: &str, value: &str) -> Self {
        self.primary_env.push((key.to_string(), value.to_string()));
        self
    }

    /// An environment variable only a backup gets.
    pub fn backup_env(mut self, key: &str, value: &str) -> Self {
        self.backup_env.push((key.to_string(), value.to_string()));
        self
    }

    /// `--failover-timeout t` for a side whose flags choose no timeout of their own.
    pub fn failover_timeout(mut self, t: &str) -> Self {
        self.failover_timeout = Some(t.to_string());
        self
    }

    /// [`Pair::start`] puts a [`Proxy`] the test controls between the backup and the primary
    /// (a pair on loopback: the proxy listens on 127.0.0.1).
    pub fn proxied(mut self) -> Self {
        assert!(self.hosts.is_none(), "a proxy is on loopback: a local pair");
        self.proxied = true;
        self
    }

    /// How long [`Pair::wait_listening`] and [`Pair::wait_attached`] wait (60 s and 90 s
    /// unless set).
    pub fn limits(mut self, listen: Duration, attach: Duration) -> Self {
        self.listen_limit = listen;
        self.attach_limit = attach;
        self
    }

    /// Where a side on simulated host `host` listens.
    pub fn addr(&self, host: usize) -> String {
        let hosts = self.hosts.expect("a pair on simulated hosts");
        format!("{}:{PAIR_PORT}", hosts.addr(host))
    }

    /// Starts the primary (on host 0).
    pub fn primary(&self) -> Proc {
        self.primary_on(0)
    }

    /// Starts the primary on simulated host `host` (on loopback, `host` is not used).
    pub fn primary_on(&self, host: usize) -> Proc {
        let listen = match self.hosts {
            Some(_) => self.addr(host),
            None => "127.0.0.1:0".to_string(),
        };
        self.side(
            host,
            &["--role", "primary", "--listen", &listen],
            &self.primary,
        )
        .spawn_with_env(&env_of(&self.primary_env))
    }

    /// Starts a backup (on host 1) of the primary at `primary`.
    pub fn backup(&self, primary: &str) -> Proc {
        self.backup_on(1, primary)
    }

    /// Starts a backup on simulated host `host` (on loopback, `host` is not used) of the
    /// primary at `primary`.
    pub fn backup_on(&self, host: usize, primary: &str) -> Proc {
        let mut role = vec!["--role", "backup", "--primary", primary];
        let listen = self.hosts.map(|_| self.addr(host));
        if let Some(listen) = &listen {
            role.extend(["--listen", listen.as_str()]);
        }
        self.side(host, &role, &self.backup)
            .spawn_with_env(&env_of(&self.backup_env))
    }

    /// Starts a standby on simulated host `host` (`--role standby`, listening on its pair
    /// address), with `own` flags of its own (its API socket): it waits for the side the lock
    /// names live and attaches as its backup.
    pub fn standby_on(&self, host: usize, own: &[&str]) -> Proc {
        let listen = self.addr(host);
        let mut flags: Vec<String> = own.iter().map(|s| s.to_string()).collect();
        flags.extend(self.backup.iter().cloned());
        self.side(host, &["--role", "standby", "--listen", &listen], &flags)
            .spawn_with_env(&env_of(&self.backup_env))
    }

    /// One side: its role flags, what both sides take, its own flags, the failover timeout
    /// unless those chose one; in its host's namespace, on the CPU asked for.
    fn side(&self, host: usize, role: &[&str], own: &[String]) -> Ftvmm {
        let mut args: Vec<String> = role.iter().map(|s| s.to_string()).collect();
        args.extend(self.both.iter().chain(own).cloned());
        let chosen = args
            .iter()
            .any(|a| a == "--failover-timeout" || a == "--peer-timeout");
        if let (Some(t), false) = (&self.failover_timeout, chosen) {
            args.extend(["--failover-timeout".to_string(), t.clone()]);
        }
        let mut side = Ftvmm::raw(&[]).args(args);
        if let Some(hosts) = self.hosts {
            side = side.in_netns(hosts.ns(host));
        }
        if let Some(cpu) = self.cpu {
            side = side.on_cpu(cpu);
        }
        side
    }

    /// Waits until primary `p` listens for a backup; the address it printed.
    pub fn wait_listening(&self, p: &Proc) -> String {
        assert!(
            p.wait_stderr(LISTENING, self.listen_limit),
            "the primary never listened:\n{}",
            p.stderr()
        );
        p.stderr_word_after(LISTENING).expect("the address")
    }

    /// Waits until `n` backups have attached to primary `p`, the last of them `b`.
    pub fn wait_attached(&self, p: &Proc, b: &Proc, n: usize) {
        assert!(
            wait_until(self.attach_limit, Duration::from_millis(10), || p
                .stderr()
                .matches(ATTACHED)
                .count()
                >= n),
            "backup {n} never attached:\n--- primary ---\n{}\n--- backup ---\n{}",
            p.stderr(),
            b.stderr()
        );
    }

    /// Starts the primary (on host 0), then once it listens a backup (on host 1, through the
    /// proxy if [`Pair::proxied`]), and waits until the backup attached.
    pub fn start(&self) -> Sides {
        let p = self.primary();
        let printed = self.wait_listening(&p);
        let addr = match self.hosts {
            Some(_) => self.addr(0),
            None => printed,
        };
        let proxy = self.proxied.then(|| Proxy::start(&addr));
        let b = self.backup(&proxy.as_ref().map_or(addr.clone(), Proxy::addr));
        self.wait_attached(&p, &b, 1);
        Sides { p, b, addr, proxy }
    }
}

/// A primary and its backup, attached ([`Pair::start`]).
pub struct Sides {
    /// The primary.
    pub p: Proc,
    /// The backup.
    pub b: Proc,
    /// Where the primary listens (for another backup).
    pub addr: String,
    proxy: Option<Proxy>,
}

impl Sides {
    /// The proxy between the backup and the primary ([`Pair::proxied`]).
    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("a proxied pair")
    }

    /// Waits for both to end, the primary first, each for up to `limit` (see [`Proc::wait`]).
    pub fn finish(self, limit: Duration) -> (Run, Run) {
        (self.p.wait(limit), self.b.wait(limit))
    }
}

/// A pre-shared key file for a pair, in `dir`.
pub fn key_file(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(&p, key).expect("write key");
    p
}

/// Environment pairs as `spawn_with_env` takes them.
fn env_of(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}
