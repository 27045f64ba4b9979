//! The TCP proxy a test puts between a backup and its primary, to hold back or alter what the
//! backup sends.

use std::io::{Read, Write};
use std::time::Duration;

/// A TCP proxy between a backup and its primary, on 127.0.0.1, that the test controls: it can
/// hold back what the backup sends (acknowledgements) and flip one byte of it.
pub struct Proxy {
    addr: std::net::SocketAddr,
    /// While set, bytes from the backup wait in the proxy.
    hold_upstream: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// When non-zero, the byte at this offset of the backup's stream (from 1) is flipped.
    flip_upstream_at: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Proxies connections made to [`Proxy::addr`] to `target`.
    pub fn start(target: &str) -> Proxy {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = Arc::new(AtomicBool::new(false));
        let flip = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, f, s, target) = (hold.clone(), flip.clone(), stop.clone(), target.to_string());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Acquire) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = down.set_nonblocking(false);
                let Ok(up) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (h, f) = (h.clone(), f.clone());
                // backup -> primary, with hold and flip
                std::thread::spawn(move || pump(down, up, Some((h, f))));
                // primary -> backup
                std::thread::spawn(move || pump(u2, d2, None));
            }
        });
        Proxy {
            addr,
            hold_upstream: hold,
            flip_upstream_at: flip,
            stop,
        }
    }

    /// Where the backup should connect.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Holds back what the backup sends (`true`), or lets it through again (`false`).
    pub fn hold(&self, on: bool) {
        self.hold_upstream
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// Flips one bit of the byte at `offset` (from 1) of what the backup sends.
    pub fn flip_at(&self, offset: u64) {
        self.flip_upstream_at
            .store(offset, std::sync::atomic::Ordering::Release);
    }
}

type Controls = (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
);

fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, ctl: Option<Controls>) {
    use std::sync::atomic::Ordering;
    let mut buf = [0u8; 16384];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((hold, flip)) = &ctl {
            while hold.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let at = flip.load(Ordering::Acquire);
            if at > offset && at <= offset + n as u64 {
                buf[(at - offset - 1) as usize] ^= 0x01;
                flip.store(0, Ordering::Release);
            }
        }
        offset += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}
