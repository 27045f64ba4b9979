//! Synchronous exits: the positions of the instruction stream, and the digest over them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of a synchronous VM exit: one that happens at the same instruction in every
/// execution from the same state with the same inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum ExitKind {
    /// `IN` from a port.
    PioIn = 1,
    /// `OUT` to a port.
    PioOut = 2,
    /// A read from an address outside guest RAM.
    MmioRead = 3,
    /// A write to an address outside guest RAM.
    MmioWrite = 4,
    /// `HLT`.
    Hlt = 5,
    /// The interrupt window the VMM asked for opened.
    IrqWindow = 6,
    /// A debug exit the VMM's compatibility paths asked for (breakpoint or single step).
    Debug = 7,
    /// An instruction the host KVM could not emulate and the VMM completed.
    Emulated = 8,
}

impl ExitKind {
    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::PioIn => "PIO read",
            ExitKind::PioOut => "PIO write",
            ExitKind::MmioRead => "MMIO read",
            ExitKind::MmioWrite => "MMIO write",
            ExitKind::Hlt => "HLT",
            ExitKind::IrqWindow => "IRQ window",
            ExitKind::Debug => "debug",
            ExitKind::Emulated => "emulated instruction",
        }
    }
}

/// What the vCPU did at one synchronous exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncExit {
    /// What kind of exit.
    pub kind: ExitKind,
    /// Port, guest-physical address, or (for `Emulated`/`Debug`) a kind-specific code.
    pub addr: u64,
    /// The data read or written, little-endian, zero-extended (up to 8 bytes).
    pub data: u64,
    /// Access size in bytes (0 where there is none).
    pub len: u8,
    /// The guest RIP at the exit.
    pub rip: u64,
}

impl fmt::Display for SyncExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ExitKind::PioIn | ExitKind::PioOut | ExitKind::MmioRead | ExitKind::MmioWrite => {
                write!(
                    f,
                    "{} {:#x}={:#x} ({} bytes) at rip {:#x}",
                    self.kind.name(),
                    self.addr,
                    self.data,
                    self.len,
                    self.rip
                )
            }
            ExitKind::Debug | ExitKind::Emulated => write!(
                f,
                "{} (code {:#x}, data {:#x}) at rip {:#x}",
                self.kind.name(),
                self.addr,
                self.data,
                self.rip
            ),
            _ => write!(f, "{} at rip {:#x}", self.kind.name(), self.rip),
        }
    }
}

/// Packs up to 8 little-endian bytes into a u64 (extra bytes are ignored: port and MMIO
/// accesses are at most 8 bytes wide).
pub fn le_bytes_to_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(buf)
}

/// A running hash over the ordered synchronous exits of one execution (FNV-1a, 64 bits:
/// stable across builds and platforms, no dependencies). Two executions with the same exits in
/// the same order have the same digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitDigest {
    count: u64,
    hash: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Default for ExitDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl ExitDigest {
    /// An empty digest.
    pub fn new() -> Self {
        ExitDigest {
            count: 0,
            hash: FNV_OFFSET,
        }
    }

    fn mix(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.hash ^= u64::from(*b);
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
    }

    /// Adds one exit.
    pub fn add(&mut self, exit: &SyncExit) {
        self.count += 1;
        self.mix(&[exit.kind as u8, exit.len]);
        self.mix(&exit.addr.to_le_bytes());
        self.mix(&exit.data.to_le_bytes());
        self.mix(&exit.rip.to_le_bytes());
    }

    /// Number of exits added so far: the ordinal of the next exit.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The hash value.
    pub fn value(&self) -> u64 {
        self.hash
    }
}

impl fmt::Display for ExitDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exits={} exit-digest={:016x}", self.count, self.hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(kind: ExitKind, addr: u64, data: u64) -> SyncExit {
        SyncExit {
            kind,
            addr,
            data,
            len: 1,
            rip: 0x1000,
        }
    }

    #[test]
    fn digest_depends_on_order_and_content() {
        let a = exit(ExitKind::PioOut, 0x3f8, 0x41);
        let b = exit(ExitKind::PioIn, 0x3fd, 0x60);
        let mut d1 = ExitDigest::new();
        d1.add(&a);
        d1.add(&b);
        let mut d2 = ExitDigest::new();
        d2.add(&b);
        d2.add(&a);
        let mut d3 = ExitDigest::new();
        d3.add(&a);
        d3.add(&b);
        assert_ne!(d1, d2);
        assert_eq!(d1, d3);
        assert_eq!(d1.count(), 2);
        let mut d4 = ExitDigest::new();
        d4.add(&a);
        d4.add(&exit(ExitKind::PioIn, 0x3fd, 0x61));
        assert_ne!(d1.value(), d4.value());
    }

    #[test]
    fn digest_is_stable() {
        // A fixed value: the digest is part of what the tests and logs compare across builds.
        let mut d = ExitDigest::new();
        d.add(&exit(ExitKind::Hlt, 0, 0));
        assert_eq!(format!("{d}"), "exits=1 exit-digest=e16b81822f30bca3");
        assert_eq!(ExitDigest::new().value(), FNV_OFFSET);
    }

    #[test]
    fn le_bytes() {
        assert_eq!(le_bytes_to_u64(&[0x41]), 0x41);
        assert_eq!(le_bytes_to_u64(&[1, 2, 3, 4]), 0x0403_0201);
        assert_eq!(le_bytes_to_u64(&[]), 0);
    }
}
