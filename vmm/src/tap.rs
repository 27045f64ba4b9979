//! The host side of the guest's NIC: a tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`), one
//! Ethernet frame per `read` and per `write`.
//!
//! Received frames are inputs: a reader thread puts them in the boundary's bounded queue
//! (`ft_core::live::NetQueue`), which drops what the guest does not take in time, as a NIC
//! would; the boundary delivers them at exits. Transmitted frames are outputs: written to the
//! tap by the boundary (standalone) or, under fault tolerance, by the output rule's releaser.

use ft_core::live::NetQueue;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap interface `name` (created by the administrator, e.g.
    /// `ip tuntap add NAME mode tap`, or created here if this process may).
    pub fn open(name: &str) -> io::Result<Tap> {
        if name.is_empty() || name.len() >= 16 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tap name `{name}` must have 1 to 15 characters"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // struct ifreq: the name (16 bytes), then the flags (a short), padded to 40 bytes.
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes on 64-bit Linux),
        // which `ifreq` is and which outlives the call; the fd is open.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("tap {name}: {e}")));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle for writing frames (one `write` each).
    pub fn writer(&self) -> io::Result<TapWriter> {
        Ok(TapWriter(self.file.try_clone()?))
    }

    /// Starts the thread that reads frames into `queue` (until the tap goes away).
    pub fn start_reader(&self, queue: Arc<NetQueue>) -> io::Result<()> {
        let mut file = self.file.try_clone()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if !queue.push(buf[..n].to_vec()) {
                                tracing::debug!(
                                    "tap {name}: the guest is not keeping up, frame dropped"
                                );
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::warn!("tap {name}: {e}: no more frames from it");
                            break;
                        }
                    }
                }
            })?;
        Ok(())
    }
}

/// Writes whole frames to a tap.
pub struct TapWriter(File);

impl Write for TapWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A gratuitous ARP request announcing that `ip` is at `mac` (sent by a backup that goes live,
/// so that switches learn the guest's MAC on the new host's port and neighbours refresh their
/// caches).
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]); // to everyone
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(60, 0); // minimum frame size, padded
    f
}

/// The guest's IPv4 address from an `ftvmm.ip=ADDR/PREFIX` word of a kernel command line.
pub fn guest_ip(cmdline: &str) -> Option<[u8; 4]> {
    let v = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ftvmm.ip="))?;
    let addr: std::net::Ipv4Addr = v.split('/').next()?.parse().ok()?;
    Some(addr.octets())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_and_parsing() {
        let mac = parse_mac("52:54:00:12:34:56").unwrap();
        assert_eq!(mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert!(parse_mac("52:54:00:12:34").is_none());
        assert!(parse_mac("52:54:00:12:34:56:78").is_none());
        assert_eq!(
            guest_ip("console=ttyS0 ftvmm.ip=10.0.0.5/24 quiet"),
            Some([10, 0, 0, 5])
        );
        assert_eq!(guest_ip("console=ttyS0"), None);
        let f = gratuitous_arp(mac, [10, 0, 0, 5]);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[28..32], &[10, 0, 0, 5]);
        assert_eq!(&f[38..42], &[10, 0, 0, 5]);
    }
}
