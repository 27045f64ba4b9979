//! A bus: address ranges, each going to one device, looked up by address (after crosvm's
//! `devices/src/bus.rs`). The VMM keeps one for I/O ports and one for MMIO, and uses the same
//! table for reads and writes.
//!
//! What a range holds is the VMM's choice: a small `Copy` key naming the device, which it then
//! calls with whatever that device's access needs (the time, guest memory). The devices stay
//! plain structs with their own access methods, with no lock or trait object around them.

use std::collections::BTreeMap;

/// A range that overlaps one already on the bus, or is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bus range {base:#x}, {len:#x} bytes, is empty or overlaps another")]
pub struct BusError {
    /// First address of the refused range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

/// Address ranges, each mapped to a device key `T`.
#[derive(Clone, Debug)]
pub struct Bus<T> {
    /// By first address: the length and the device.
    ranges: BTreeMap<u64, (u64, T)>,
}

impl<T> Default for Bus<T> {
    fn default() -> Self {
        Bus {
            ranges: BTreeMap::new(),
        }
    }
}

impl<T: Copy> Bus<T> {
    /// Maps `len` addresses from `base` to `device`. A range that is empty, wraps past the
    /// top of the address space or overlaps one already mapped is refused.
    pub fn insert(&mut self, base: u64, len: u64, device: T) -> Result<(), BusError> {
        let err = BusError { base, len };
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(err)?;
        let overlaps = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(&b, &(l, _))| b + l > base);
        if overlaps {
            return Err(err);
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device whose range holds `addr`, and the offset of `addr` in that range.
    pub fn get(&self, addr: u64) -> Option<(T, u64)> {
        let (&base, &(len, device)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < len).then_some((device, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_by_address_gives_the_device_and_the_offset() {
        let mut bus = Bus::default();
        bus.insert(0x20, 2, 'a').unwrap();
        bus.insert(0x40, 4, 'b').unwrap();
        bus.insert(0x61, 1, 'b').unwrap();
        assert_eq!(bus.get(0x1f), None);
        assert_eq!(bus.get(0x20), Some(('a', 0)));
        assert_eq!(bus.get(0x21), Some(('a', 1)));
        assert_eq!(bus.get(0x22), None);
        assert_eq!(bus.get(0x43), Some(('b', 3)));
        assert_eq!(bus.get(0x44), None);
        assert_eq!(bus.get(0x61), Some(('b', 0)));
        assert_eq!(bus.get(0x62), None);
        assert_eq!(bus.get(u64::MAX), None);
    }

    #[test]
    fn overlapping_empty_and_wrapping_ranges_are_refused() {
        let mut bus = Bus::default();
        bus.insert(0x10, 0x10, 1).unwrap();
        for (base, len) in [(0x0, 0x11), (0x1f, 1), (0x18, 2), (0x0, 0x100), (0x30, 0)] {
            assert_eq!(bus.insert(base, len, 2), Err(BusError { base, len }));
        }
        assert!(bus.insert(u64::MAX, 2, 2).is_err());
        bus.insert(0x0, 0x10, 3).unwrap();
        bus.insert(0x20, 1, 4).unwrap();
        assert_eq!(bus.get(0xf), Some((3, 0xf)));
        assert_eq!(bus.get(0x10), Some((1, 0)));
        assert_eq!(bus.get(0x20), Some((4, 0)));
    }
}
