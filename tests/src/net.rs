//! Simulated hosts (`Hosts`): network namespaces on a pair network and a storage network, which
//! a test can partition; `sh` for set-up commands; `net_client` for the guest's test client.

use std::process::{Child, Command, Stdio};

/// Simulated hosts for multi-host tests: network namespaces, each with two links: `eth0` on the
/// pair network (10.231.S.h/16), where primary and backup talk, and `eth1` on the storage
/// network (10.232.S.h/16), where a lock service lives. A partition cuts a host's pair link and
/// leaves its storage link up, as when two hosts lose each other but not their shared storage.
/// The bridges live in a namespace of their own (the "switch"). Created with unique names,
/// removed on drop even when the test fails; traffic stays inside them. Needs root (the tests
/// run as root here, see ENVIRONMENT.md).
pub struct Hosts {
    names: Vec<String>,
    bridge_ns: String,
    subnet: u8,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let mut argv = vec!["ip"];
    argv.extend(args);
    sh(&argv)
}

/// Runs `argv` (a network set-up command): Ok when it succeeded, else what it printed.
pub fn sh(argv: &[&str]) -> Result<(), String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Hosts {
    /// `n` hosts on the two networks.
    pub fn new(tag: &str, n: usize) -> Hosts {
        let id = std::process::id() % 10000;
        let subnet = (id % 200) as u8 + 20;
        let bridge_ns = format!("ftsw-{tag}-{id}");
        let names: Vec<String> = (0..n).map(|i| format!("fth{i}-{tag}-{id}")).collect();
        let hosts = Hosts {
            names,
            bridge_ns,
            subnet,
        };
        hosts.cleanup();
        let setup = || -> Result<(), String> {
            let sw = hosts.bridge_ns.as_str();
            ip(&["netns", "add", sw])?;
            for br in ["br0", "br1"] {
                ip(&["-n", sw, "link", "add", br, "type", "bridge"])?;
                ip(&["-n", sw, "link", "set", br, "up"])?;
            }
            for (i, ns) in hosts.names.iter().enumerate() {
                ip(&["netns", "add", ns])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
                for (net, br) in [(0, "br0"), (1, "br1")] {
                    let (inner, outer) = (format!("eth{net}"), format!("p{net}h{i}"));
                    ip(&[
                        "-n", ns, "link", "add", &inner, "type", "veth", "peer", "name", &outer,
                        "netns", sw,
                    ])?;
                    let addr = format!("10.{}.{}.{}/16", 231 + net, hosts.subnet, i + 1);
                    ip(&["-n", ns, "addr", "add", &addr, "dev", &inner])?;
                    ip(&["-n", ns, "link", "set", &inner, "up"])?;
                    ip(&["-n", sw, "link", "set", &outer, "master", br])?;
                    ip(&["-n", sw, "link", "set", &outer, "up"])?;
                }
            }
            Ok(())
        };
        if let Err(e) = setup() {
            hosts.cleanup();
            panic!("cannot set up the test hosts: {e}");
        }
        hosts
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The pair-network address of host `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("10.231.{}.{}", self.subnet, i + 1)
    }

    /// The storage-network address of host `i` (where a lock service listens).
    pub fn storage_addr(&self, i: usize) -> String {
        format!("10.232.{}.{}", self.subnet, i + 1)
    }

    /// Cuts host `i` off the pair network (its storage link stays up).
    pub fn cut(&self, i: usize) {
        let dev = format!("p0h{i}");
        ip(&["-n", &self.bridge_ns, "link", "set", &dev, "down"]).expect("cut");
    }

    /// Joins host `i` back to the pair network.
    pub fn heal(&self, i: usize) {
        let dev = format!("p0h{i}");
        ip(&["-n", &self.bridge_ns, "link", "set", &dev, "up"]).expect("heal");
    }

    /// Gives host `i` a tap for a guest's NIC, bridged with its storage link (the guest LAN):
    /// a local bridge `brg` takes `eth1` and its address, and the tap `tap` joins it.
    pub fn add_guest_tap(&self, i: usize, tap: &str) {
        let ns = self.ns(i);
        let addr = format!("{}/16", self.storage_addr(i));
        let steps: [&[&str]; 8] = [
            &["-n", ns, "link", "add", "brg", "type", "bridge"],
            &["-n", ns, "addr", "del", &addr, "dev", "eth1"],
            &["-n", ns, "link", "set", "eth1", "master", "brg"],
            &["-n", ns, "addr", "add", &addr, "dev", "brg"],
            &["-n", ns, "link", "set", "brg", "up"],
            &["-n", ns, "tuntap", "add", tap, "mode", "tap"],
            &["-n", ns, "link", "set", tap, "master", "brg"],
            &["-n", ns, "link", "set", tap, "up"],
        ];
        for step in steps {
            ip(step).expect("guest tap");
        }
    }

    /// Adds `addr` (e.g. `10.240.0.2/16`) to host `i`'s storage link: a client on the guest LAN.
    pub fn add_guest_lan_addr(&self, i: usize, addr: &str) {
        ip(&["-n", self.ns(i), "addr", "add", addr, "dev", "eth1"]).expect("client address");
    }

    fn cleanup(&self) {
        for ns in self.names.iter().chain(std::iter::once(&self.bridge_ns)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Starts `tests/net_client.py` against the networked guest (`GUEST_IP`) in namespace `ns`, in
/// the background, its output piped (read it with [`client_result`]).
pub fn net_client(ns: &str, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns, "python3"])
        .arg(crate::root().join("tests/net_client.py"))
        .arg(crate::GUEST_IP)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the test client")
}

/// Waits for a [`net_client`] to end: whether everything it checked was right, and what it
/// printed.
pub fn client_result(c: Child) -> (bool, String) {
    let out = c.wait_with_output().expect("the test client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
