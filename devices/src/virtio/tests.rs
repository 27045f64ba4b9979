//! virtio-mmio + virtio-blk + virtio-net tests: a driver written by hand against guest memory.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::*;
use crate::disk::{Disk, ImageFile};
use crate::persist::{Persist, RestoreError};

const MEM_SIZE: usize = 0x10_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const HDR: u64 = 0x8000;
const STATUS_BUF: u64 = 0x8100;
const DATA: u64 = 0x1_0000;
const SECTORS: u64 = 64;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_VENDOR: u64 = 0x00c;
const R_DEV_FEATURES: u64 = 0x010;
const R_DEV_FEATURES_SEL: u64 = 0x014;
const R_DRV_FEATURES: u64 = 0x020;
const R_DRV_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_NOTIFY: u64 = 0x050;
const R_INT_STATUS: u64 = 0x060;
const R_INT_ACK: u64 = 0x064;
const R_STATUS: u64 = 0x070;
const R_DESC_LOW: u64 = 0x080;
const R_DESC_HIGH: u64 = 0x084;
const R_DRIVER_LOW: u64 = 0x090;
const R_DRIVER_HIGH: u64 = 0x094;
const R_DEVICE_LOW: u64 = 0x0a0;
const R_DEVICE_HIGH: u64 = 0x0a4;
const R_SHM_LEN_LOW: u64 = 0x0b0;
const R_CONFIG_GEN: u64 = 0x0fc;
const R_CONFIG: u64 = 0x100;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A temporary disk image of `SECTORS` sectors; byte i of sector s is (s * 7 + i) as u8.
struct TempImage(PathBuf);

impl TempImage {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ftvmm-devices-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let data: Vec<u8> = (0..SECTORS * 512)
            .map(|i| ((i / 512) * 7 + i % 512) as u8)
            .collect();
        std::fs::write(&path, data).unwrap();
        TempImage(path)
    }

    fn disk(&self, read_only: bool) -> Box<dyn Disk> {
        let image = if read_only {
            ImageFile::open_read_only(&self.0)
        } else {
            ImageFile::open(&self.0)
        };
        Box::new(image.unwrap())
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn expected_sector(s: u64) -> Vec<u8> {
    (0..512u64).map(|i| (s * 7 + i) as u8).collect()
}

/// A disk whose every operation fails.
struct BrokenDisk;

impl Disk for BrokenDisk {
    fn size(&self) -> u64 {
        SECTORS * 512
    }
    fn read_at(&mut self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("broken"))
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("broken"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::other("broken"))
    }
}

fn r32<D: VirtioDevice>(dev: &mut VirtioMmio<D>, mem: &GuestMemoryMmap, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.mmio_read(offset, &mut b, mem);
    u32::from_le_bytes(b)
}

fn w32<D: VirtioDevice>(dev: &mut VirtioMmio<D>, mem: &GuestMemoryMmap, offset: u64, v: u32) {
    dev.mmio_write(offset, &v.to_le_bytes(), mem);
}

fn features<D: VirtioDevice>(dev: &mut VirtioMmio<D>, mem: &GuestMemoryMmap) -> u64 {
    w32(dev, mem, R_DEV_FEATURES_SEL, 0);
    let lo = r32(dev, mem, R_DEV_FEATURES);
    w32(dev, mem, R_DEV_FEATURES_SEL, 1);
    let hi = r32(dev, mem, R_DEV_FEATURES);
    u64::from(hi) << 32 | u64::from(lo)
}

/// What Linux's virtio_mmio + virtio_blk probe does, accepting all offered features.
fn driver_init(dev: &mut MmioBlock, mem: &GuestMemoryMmap) {
    assert_eq!(r32(dev, mem, R_MAGIC), 0x7472_6976);
    assert_eq!(r32(dev, mem, R_VERSION), 2);
    assert_eq!(r32(dev, mem, R_DEVICE_ID), 2);
    w32(dev, mem, R_STATUS, 0);
    w32(dev, mem, R_STATUS, S_ACK);
    w32(dev, mem, R_STATUS, S_ACK | S_DRIVER);
    let f = features(dev, mem);
    w32(dev, mem, R_DRV_FEATURES_SEL, 0);
    w32(dev, mem, R_DRV_FEATURES, f as u32);
    w32(dev, mem, R_DRV_FEATURES_SEL, 1);
    w32(dev, mem, R_DRV_FEATURES, (f >> 32) as u32);
    w32(dev, mem, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_ne!(r32(dev, mem, R_STATUS) & S_FEATURES_OK, 0);
    w32(dev, mem, R_QUEUE_SEL, 0);
    assert_eq!(r32(dev, mem, R_QUEUE_READY), 0);
    assert_eq!(r32(dev, mem, R_QUEUE_NUM_MAX), 256);
    w32(dev, mem, R_QUEUE_NUM, u32::from(QSIZE));
    w32(dev, mem, R_DESC_LOW, DESC as u32);
    w32(dev, mem, R_DESC_HIGH, 0);
    w32(dev, mem, R_DRIVER_LOW, AVAIL as u32);
    w32(dev, mem, R_DRIVER_HIGH, 0);
    w32(dev, mem, R_DEVICE_LOW, USED as u32);
    w32(dev, mem, R_DEVICE_HIGH, 0);
    w32(dev, mem, R_QUEUE_READY, 1);
    w32(
        dev,
        mem,
        R_STATUS,
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
}

/// The driver side of the queue.
struct Driver {
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Self {
        Driver {
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn write_desc(
        mem: &GuestMemoryMmap,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = table + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Puts a chain of (addr, len, device-writable) buffers in the table; returns its head.
    fn chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == bufs.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            Self::write_desc(mem, DESC, i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.next_desc = (head + bufs.len() as u16) % QSIZE;
        head
    }

    /// Offers chain `head` in the available ring.
    fn offer(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// A virtio-blk request: header, data buffers, status byte.
    fn request(
        &mut self,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        data: &[(u64, u32, bool)],
    ) -> u16 {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS_BUF)).unwrap();
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((STATUS_BUF, 1, true));
        let head = self.chain(mem, &bufs);
        self.offer(mem, head);
        head
    }
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

/// Used ring element `i`: (id, len).
fn used_elem(mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
    let at = USED + 4 + 8 * u64::from(i % QSIZE);
    (
        mem.read_obj(GuestAddress(at)).unwrap(),
        mem.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

fn status_byte(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS_BUF)).unwrap()
}

fn notify(dev: &mut MmioBlock, mem: &GuestMemoryMmap) {
    w32(dev, mem, R_NOTIFY, 0);
}

fn ready_device(image: &TempImage) -> (MmioBlock, GuestMemoryMmap, Driver) {
    let mem = memory();
    let mut dev = MmioBlock::new(image.disk(false), false);
    driver_init(&mut dev, &mem);
    (dev, mem, Driver::new())
}

#[test]
fn identification_registers_and_config() {
    let image = TempImage::new();
    let mem = memory();
    let mut dev = MmioBlock::new(image.disk(false), false);
    assert_eq!(r32(&mut dev, &mem, R_MAGIC), 0x7472_6976);
    assert_eq!(r32(&mut dev, &mem, R_VERSION), 2);
    assert_eq!(r32(&mut dev, &mem, R_DEVICE_ID), 2);
    assert_eq!(r32(&mut dev, &mem, R_VENDOR), 0x4654_564d);
    let f = features(&mut dev, &mem);
    assert_eq!(f, 1 << 32 | 1 << 28 | 1 << 9 | 1 << 2);
    w32(&mut dev, &mem, R_DEV_FEATURES_SEL, 7);
    assert_eq!(r32(&mut dev, &mem, R_DEV_FEATURES), 0);
    assert_eq!(r32(&mut dev, &mem, R_CONFIG_GEN), 0);
    assert_eq!(r32(&mut dev, &mem, R_SHM_LEN_LOW), u32::MAX);
    assert_eq!(r32(&mut dev, &mem, R_INT_STATUS), 0);
    assert!(!dev.irq_level());
    // Capacity, as Linux reads it (two 32-bit halves) and as one 64-bit access.
    assert_eq!(r32(&mut dev, &mem, R_CONFIG), SECTORS as u32);
    assert_eq!(r32(&mut dev, &mem, R_CONFIG + 4), 0);
    let mut cap = [0u8; 8];
    dev.mmio_read(R_CONFIG, &mut cap, &mem);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    assert_eq!(r32(&mut dev, &mem, R_CONFIG + 12), 254, "seg_max");
    let mut b = [0u8; 1];
    dev.mmio_read(R_CONFIG + 0x800, &mut b, &mem);
    assert_eq!(b, [0]);
    // A queue that does not exist.
    w32(&mut dev, &mem, R_QUEUE_SEL, 1);
    assert_eq!(r32(&mut dev, &mem, R_QUEUE_NUM_MAX), 0);

    let ro = MmioBlock::new(image.disk(true), true);
    let mut ro = ro;
    assert_ne!(features(&mut ro, &mem) & 1 << 5, 0, "VIRTIO_BLK_F_RO");
}

#[test]
fn read_request_fills_guest_memory_and_interrupts() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    // Two sectors, split over two descriptors.
    let head = drv.request(
        &mem,
        T_IN,
        2,
        &[(DATA, 512, true), (DATA + 0x3000, 512, true)],
    );
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 0);
    assert_eq!(used_idx(&mem), 1);
    assert_eq!(used_elem(&mem, 0), (u32::from(head), 1025));
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, expected_sector(2));
    mem.read_slice(&mut got, GuestAddress(DATA + 0x3000))
        .unwrap();
    assert_eq!(got, expected_sector(3));
    assert_eq!(r32(&mut dev, &mem, R_INT_STATUS), 1);
    assert!(dev.irq_level());
    w32(&mut dev, &mem, R_INT_ACK, 1);
    assert!(!dev.irq_level());
    // The writes went through vm-memory: the dirty bitmap has the data pages.
    let region = mem.find_region(GuestAddress(0)).unwrap();
    assert!(region.bitmap().dirty_at(DATA as usize));
    assert!(region.bitmap().dirty_at((DATA + 0x3000) as usize));
    assert!(region.bitmap().dirty_at(USED as usize));
}

#[test]
fn write_flush_and_get_id() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
    drv.request(&mem, T_OUT, 5, &[(DATA, 1024, false)]);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 0);
    assert_eq!(used_elem(&mem, 0).1, 1);
    let contents = image.contents();
    assert!(contents[5 * 512..7 * 512].iter().all(|&b| b == 0xab));
    assert_eq!(contents[4 * 512..5 * 512], expected_sector(4)[..]);
    assert_eq!(contents[7 * 512..8 * 512], expected_sector(7)[..]);

    drv.request(&mem, T_FLUSH, 0, &[]);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 0);
    assert_eq!(used_elem(&mem, 1).1, 1);

    drv.request(&mem, T_GET_ID, 0, &[(DATA, 20, true)]);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 0);
    assert_eq!(used_elem(&mem, 2).1, 21);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"ftvmm-disk");
    assert!(id[10..].iter().all(|&b| b == 0));
    assert_eq!(used_idx(&mem), 3);
}

#[test]
fn several_requests_in_one_notify() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    for i in 0..5u64 {
        // Requests share the header buffer; all ask for sector 9.
        drv.request(&mem, T_IN, 9, &[(DATA + i * 0x1000, 512, true)]);
    }
    notify(&mut dev, &mem);
    assert_eq!(used_idx(&mem), 5);
    let mut got = vec![0u8; 512];
    for i in 0..5u64 {
        mem.read_slice(&mut got, GuestAddress(DATA + i * 0x1000))
            .unwrap();
        assert_eq!(got, expected_sector(9));
    }
}

#[test]
fn request_errors_get_ioerr_or_unsupp() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    let cases: [(u32, u64, u32, bool, u8); 6] = [
        (T_IN, SECTORS - 1, 1024, true, 1),   // past the end
        (T_IN, u64::MAX / 256, 512, true, 1), // sector * 512 overflows
        (T_IN, 0, 100, true, 1),              // not a multiple of 512
        (T_OUT, SECTORS, 512, false, 1),      // past the end
        (T_OUT, 0, 512, true, 1),             // data in the wrong direction
        (99, 0, 0, true, 2),                  // unsupported
    ];
    for (i, &(kind, sector, len, write, status)) in cases.iter().enumerate() {
        let data: Vec<(u64, u32, bool)> = if len > 0 {
            vec![(DATA, len, write)]
        } else {
            vec![]
        };
        drv.request(&mem, kind, sector, &data);
        notify(&mut dev, &mem);
        assert_eq!(status_byte(&mem), status, "case {i}");
        assert_eq!(used_idx(&mem), i as u16 + 1);
    }
    assert_eq!(
        image.contents()[..512],
        expected_sector(0)[..],
        "nothing written"
    );
    assert_eq!(
        dev.status() & S_NEEDS_RESET,
        0,
        "request errors do not break the device"
    );
}

#[test]
fn read_only_disk_refuses_writes() {
    let image = TempImage::new();
    let mem = memory();
    let mut dev = MmioBlock::new(image.disk(true), true);
    driver_init(&mut dev, &mem);
    let mut drv = Driver::new();
    drv.request(&mem, T_OUT, 0, &[(DATA, 512, false)]);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 1);
    assert_eq!(image.contents()[..512], expected_sector(0)[..]);
    drv.request(&mem, T_IN, 1, &[(DATA, 512, true)]);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 0);
}

#[test]
fn backend_errors_are_ioerr() {
    let mem = memory();
    let mut dev = MmioBlock::new(Box::new(BrokenDisk), false);
    driver_init(&mut dev, &mem);
    let mut drv = Driver::new();
    for kind in [T_IN, T_OUT, T_FLUSH] {
        let data: Vec<(u64, u32, bool)> = match kind {
            T_IN => vec![(DATA, 512, true)],
            T_OUT => vec![(DATA, 512, false)],
            _ => vec![],
        };
        drv.request(&mem, kind, 0, &data);
        notify(&mut dev, &mem);
        assert_eq!(status_byte(&mem), 1, "type {kind}");
    }
}

#[test]
fn buffer_outside_guest_memory_is_ioerr() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    drv.request(&mem, T_IN, 0, &[(MEM_SIZE as u64 - 256, 512, true)]);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 1);
    drv.request(&mem, T_IN, 0, &[(u64::MAX - 100, 512, true)]);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 1);
    // The header itself outside memory.
    let head = drv.chain(&mem, &[(0xffff_0000, 16, false), (STATUS_BUF, 1, true)]);
    mem.write_obj(0xffu8, GuestAddress(STATUS_BUF)).unwrap();
    drv.offer(&mem, head);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 1);
    assert_eq!(used_idx(&mem), 3);
}

#[test]
fn write_only_header_is_ioerr() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    mem.write_obj(0xffu8, GuestAddress(STATUS_BUF)).unwrap();
    let head = drv.chain(
        &mem,
        &[(HDR, 16, true), (DATA, 512, true), (STATUS_BUF, 1, true)],
    );
    drv.offer(&mem, head);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 1);
    assert_eq!(used_elem(&mem, 0), (u32::from(head), 1));
}

#[test]
fn broken_chains_are_skipped() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    // A loop: 0 -> 1 -> 0.
    Driver::write_desc(&mem, DESC, 0, HDR, 16, F_NEXT, 1);
    Driver::write_desc(&mem, DESC, 1, DATA, 512, F_NEXT | F_WRITE, 0);
    drv.offer(&mem, 0);
    // A next index beyond the queue.
    Driver::write_desc(&mem, DESC, 2, HDR, 16, F_NEXT, 200);
    drv.offer(&mem, 2);
    // A readable descriptor after a writable one.
    Driver::write_desc(&mem, DESC, 3, DATA, 512, F_NEXT | F_WRITE, 4);
    Driver::write_desc(&mem, DESC, 4, HDR, 16, 0, 0);
    drv.offer(&mem, 3);
    // Nothing writable for the status.
    Driver::write_desc(&mem, DESC, 5, HDR, 16, 0, 0);
    drv.offer(&mem, 5);
    // An indirect table of a length that is not a multiple of 16.
    Driver::write_desc(&mem, DESC, 6, 0x9000, 20, F_INDIRECT, 0);
    drv.offer(&mem, 6);
    // A head index beyond the queue: dropped, no used entry.
    drv.offer(&mem, 300);
    drv.next_desc = 7;
    notify(&mut dev, &mem);
    assert_eq!(used_idx(&mem), 5);
    for (i, head) in [0u32, 2, 3, 5, 6].into_iter().enumerate() {
        assert_eq!(used_elem(&mem, i as u16), (head, 0));
    }
    // The device still works.
    drv.request(&mem, T_IN, 4, &[(DATA, 512, true)]);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 0);
    assert_eq!(used_idx(&mem), 6);
    assert_eq!(dev.status() & S_NEEDS_RESET, 0);
}

#[test]
fn indirect_descriptors() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    let table = 0x9000;
    mem.write_obj(T_IN, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(11u64, GuestAddress(HDR + 8)).unwrap();
    Driver::write_desc(&mem, table, 0, HDR, 16, F_NEXT, 1);
    Driver::write_desc(&mem, table, 1, DATA, 512, F_NEXT | F_WRITE, 2);
    Driver::write_desc(&mem, table, 2, STATUS_BUF, 1, F_WRITE, 0);
    Driver::write_desc(&mem, DESC, 0, table, 48, F_INDIRECT, 0);
    drv.offer(&mem, 0);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 0);
    assert_eq!(used_elem(&mem, 0), (0, 513));
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, expected_sector(11));
}

#[test]
fn runaway_avail_index_needs_reset() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    notify(&mut dev, &mem);
    assert_ne!(dev.status() & S_NEEDS_RESET, 0);
    assert_eq!(
        r32(&mut dev, &mem, R_INT_STATUS) & 2,
        2,
        "config change interrupt"
    );
    assert!(dev.irq_level());
    // Ignored until reset.
    mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    drv.request(&mem, T_IN, 0, &[(DATA, 512, true)]);
    notify(&mut dev, &mem);
    assert_eq!(used_idx(&mem), 0);
    // Reset and start over.
    w32(&mut dev, &mem, R_STATUS, 0);
    assert_eq!(dev.status(), 0);
    assert!(!dev.irq_level());
    mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).unwrap();
    driver_init(&mut dev, &mem);
    let mut drv = Driver::new();
    drv.request(&mem, T_IN, 0, &[(DATA, 512, true)]);
    notify(&mut dev, &mem);
    assert_eq!(status_byte(&mem), 0);
    assert_eq!(used_idx(&mem), 1);
}

#[test]
fn rings_outside_memory_need_reset() {
    let image = TempImage::new();
    let mem = memory();
    let mut dev = MmioBlock::new(image.disk(false), false);
    driver_init(&mut dev, &mem);
    w32(&mut dev, &mem, R_STATUS, 0);
    w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER);
    w32(&mut dev, &mem, R_DRV_FEATURES_SEL, 1);
    w32(&mut dev, &mem, R_DRV_FEATURES, 1);
    w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    w32(&mut dev, &mem, R_QUEUE_NUM, 16);
    w32(&mut dev, &mem, R_DESC_LOW, 0);
    w32(&mut dev, &mem, R_DESC_HIGH, 0x10);
    w32(&mut dev, &mem, R_DRIVER_LOW, AVAIL as u32);
    w32(&mut dev, &mem, R_DEVICE_LOW, USED as u32);
    w32(&mut dev, &mem, R_QUEUE_READY, 1);
    w32(
        &mut dev,
        &mem,
        R_STATUS,
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    notify(&mut dev, &mem);
    assert_ne!(dev.status() & S_NEEDS_RESET, 0);
}

#[test]
fn no_interrupt_flag_is_honoured() {
    let image = TempImage::new();
    let (mut dev, mem, mut drv) = ready_device(&image);
    mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
    drv.request(&mem, T_IN, 0, &[(DATA, 512, true)]);
    notify(&mut dev, &mem);
    assert_eq!(used_idx(&mem), 1);
    assert!(!dev.irq_level());
}

#[test]
fn feature_negotiation() {
    let image = TempImage::new();
    let mem = memory();
    let mut dev = MmioBlock::new(image.disk(false), false);
    // Without VERSION_1: refused.
    w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER);
    w32(&mut dev, &mem, R_DRV_FEATURES_SEL, 0);
    w32(&mut dev, &mem, R_DRV_FEATURES, 1 << 9);
    w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(r32(&mut dev, &mem, R_STATUS) & S_FEATURES_OK, 0);
    // A feature the device did not offer: refused.
    w32(&mut dev, &mem, R_STATUS, 0);
    w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER);
    w32(&mut dev, &mem, R_DRV_FEATURES_SEL, 1);
    w32(&mut dev, &mem, R_DRV_FEATURES, 1 | 1 << 2);
    w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(r32(&mut dev, &mem, R_STATUS) & S_FEATURES_OK, 0);
    // VERSION_1 alone: accepted; later feature writes are ignored.
    w32(&mut dev, &mem, R_STATUS, 0);
    w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER);
    w32(&mut dev, &mem, R_DRV_FEATURES_SEL, 1);
    w32(&mut dev, &mem, R_DRV_FEATURES, 1);
    w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_ne!(r32(&mut dev, &mem, R_STATUS) & S_FEATURES_OK, 0);
    w32(&mut dev, &mem, R_DRV_FEATURES, 0);
    assert_eq!(dev.state().driver_features, 1 << 32);
}

#[test]
fn notify_before_driver_ok_is_ignored() {
    let image = TempImage::new();
    let mem = memory();
    let mut dev = MmioBlock::new(image.disk(false), false);
    let mut drv = Driver::new();
    drv.request(&mem, T_IN, 0, &[(DATA, 512, true)]);
    notify(&mut dev, &mem);
    assert_eq!(used_idx(&mem), 0);
    assert!(!dev.irq_level());
}

#[test]
fn queue_registers_reject_bad_values() {
    let image = TempImage::new();
    let mem = memory();
    let mut dev = MmioBlock::new(image.disk(false), false);
    w32(&mut dev, &mem, R_QUEUE_NUM, 100);
    assert_eq!(
        r32(&mut dev, &mem, R_QUEUE_NUM),
        256,
        "not a power of two: ignored"
    );
    w32(&mut dev, &mem, R_QUEUE_NUM, 512);
    assert_eq!(
        r32(&mut dev, &mem, R_QUEUE_NUM),
        256,
        "beyond the maximum: ignored"
    );
    w32(&mut dev, &mem, R_QUEUE_NUM, 0x1_0010);
    assert_eq!(r32(&mut dev, &mem, R_QUEUE_NUM), 256);
    w32(&mut dev, &mem, R_DESC_LOW, 0x1008);
    assert_eq!(dev.state().queues[0].desc_table, 0, "misaligned: ignored");
    w32(&mut dev, &mem, R_DESC_LOW, 0x1010);
    w32(&mut dev, &mem, R_QUEUE_READY, 1);
    w32(&mut dev, &mem, R_DESC_LOW, 0x2000);
    assert_eq!(dev.state().queues[0].desc_table, 0x1010, "ready: ignored");
    // Narrow register accesses are ignored; narrow reads read 0.
    dev.mmio_write(R_STATUS, &[1], &mem);
    assert_eq!(dev.status(), 0);
    let mut two = [0xffu8; 2];
    dev.mmio_read(R_MAGIC, &mut two, &mem);
    assert_eq!(two, [0, 0]);
}

#[test]
fn garbage_registers_never_panic() {
    let image = TempImage::new();
    let mem = memory();
    let mut dev = MmioBlock::new(image.disk(false), false);
    let mut x = 0x2545_f491u32;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for round in 0..50_000 {
        let r = next();
        let offset = u64::from(r % 0x140) & if round % 2 == 0 { !3 } else { !0 };
        let width = [1usize, 2, 4, 8, 3][(r >> 16) as usize % 5];
        let v = next();
        let bytes = &v.to_le_bytes().repeat(2)[..width];
        if r & 0x8000_0000 != 0 {
            dev.mmio_write(offset, bytes, &mem);
        } else {
            let mut buf = vec![0u8; width];
            dev.mmio_read(offset, &mut buf, &mem);
        }
        if round % 1000 == 0 {
            // Scribble over the rings and descriptors too.
            let junk: Vec<u8> = (0..0x3000).map(|_| next() as u8).collect();
            mem.write_slice(&junk, GuestAddress(DESC)).unwrap();
            driver_init(&mut dev, &mem);
            notify(&mut dev, &mem);
        }
    }
}

#[test]
fn restored_device_behaves_identically() {
    let image = TempImage::new();
    let (mut a, mem_a, mut drv) = ready_device(&image);
    drv.request(&mem_a, T_IN, 1, &[(DATA, 512, true)]);
    notify(&mut a, &mem_a);
    let saved = a.state();
    assert_eq!(saved.queues[0].next_used, 1);

    // A second device over the same image, restored, with a copy of guest memory.
    let mem_b = memory();
    let mut all = vec![0u8; MEM_SIZE];
    mem_a.read_slice(&mut all, GuestAddress(0)).unwrap();
    mem_b.write_slice(&all, GuestAddress(0)).unwrap();
    let mut b = MmioBlock::new(image.disk(false), false);
    b.restore(&saved).unwrap();
    assert_eq!(b.state(), saved);

    for (dev, mem) in [(&mut a, &mem_a), (&mut b, &mem_b)] {
        let mut drv = Driver {
            next_desc: drv.next_desc,
            avail_idx: drv.avail_idx,
        };
        drv.request(mem, T_IN, 7, &[(DATA + 0x1000, 1024, true)]);
        notify(dev, mem);
        assert!(dev.irq_level());
        assert_eq!(r32(dev, mem, R_QUEUE_READY), 1);
    }
    let mut all_b = vec![0u8; MEM_SIZE];
    mem_a.read_slice(&mut all, GuestAddress(0)).unwrap();
    mem_b.read_slice(&mut all_b, GuestAddress(0)).unwrap();
    assert!(all == all_b, "same guest memory after the same request");
    assert_eq!(used_idx(&mem_b), 2);
    assert_eq!(a.state(), b.state());

    // An invalid state is refused, and the refusal changes nothing.
    let mut bad = saved.clone();
    bad.queues[0].size = 3;
    assert!(matches!(
        b.restore(&bad),
        Err(RestoreError::QueueState { queue: 0, .. })
    ));
    assert_eq!(b.state(), a.state(), "the refused restore changed nothing");
    bad.queues.pop();
    assert!(matches!(
        b.restore(&bad),
        Err(RestoreError::QueueCount {
            saved: 0,
            device: 1
        })
    ));
    assert_eq!(b.state(), a.state());
}

/// virtio-net: queue 0 (receiveq) at DESC/AVAIL/USED, queue 1 (transmitq) at the TX_* rings.
mod net {
    use super::*;
    use crate::virtio::net::{MAX_FRAME_LEN, NET_HDR_LEN};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const TX_DESC: u64 = 0x4000;
    const TX_AVAIL: u64 = 0x5000;
    const TX_USED: u64 = 0x6000;
    const RX_BUF: u64 = 0x2_0000;
    const TX_BUF: u64 = 0x4_0000;
    const F_MRG_RXBUF: u64 = 1 << 15;

    /// The driver side of one queue of the net device.
    struct NetQueue {
        desc: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
        avail_idx: u16,
    }

    impl NetQueue {
        fn rx() -> Self {
            NetQueue {
                desc: DESC,
                avail: AVAIL,
                used: USED,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        fn tx() -> Self {
            NetQueue {
                desc: TX_DESC,
                avail: TX_AVAIL,
                used: TX_USED,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        /// Puts a chain of (addr, len, device-writable) buffers in the table; returns its head.
        fn chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (k, &(addr, len, write)) in bufs.iter().enumerate() {
                let i = (head + k as u16) % QSIZE;
                let last = k + 1 == bufs.len();
                let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                Driver::write_desc(mem, self.desc, i, addr, len, flags, (i + 1) % QSIZE);
            }
            self.next_desc = (head + bufs.len() as u16) % QSIZE;
            head
        }

        fn offer(&mut self, mem: &GuestMemoryMmap, head: u16) {
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
            mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
            let at = self.used + 4 + 8 * u64::from(i % QSIZE);
            (
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }
    }

    /// What Linux's virtio_net probe does: VERSION_1 | MAC | INDIRECT_DESC, both queues.
    fn net_init(dev: &mut MmioNet, mem: &GuestMemoryMmap) {
        assert_eq!(r32(dev, mem, R_DEVICE_ID), 1);
        w32(dev, mem, R_STATUS, 0);
        w32(dev, mem, R_STATUS, S_ACK);
        w32(dev, mem, R_STATUS, S_ACK | S_DRIVER);
        let f = features(dev, mem);
        w32(dev, mem, R_DRV_FEATURES_SEL, 0);
        w32(dev, mem, R_DRV_FEATURES, f as u32);
        w32(dev, mem, R_DRV_FEATURES_SEL, 1);
        w32(dev, mem, R_DRV_FEATURES, (f >> 32) as u32);
        w32(dev, mem, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_ne!(r32(dev, mem, R_STATUS) & S_FEATURES_OK, 0);
        for (q, (desc, avail, used)) in [(DESC, AVAIL, USED), (TX_DESC, TX_AVAIL, TX_USED)]
            .into_iter()
            .enumerate()
        {
            w32(dev, mem, R_QUEUE_SEL, q as u32);
            assert_eq!(r32(dev, mem, R_QUEUE_NUM_MAX), 256);
            w32(dev, mem, R_QUEUE_NUM, u32::from(QSIZE));
            w32(dev, mem, R_DESC_LOW, desc as u32);
            w32(dev, mem, R_DESC_HIGH, 0);
            w32(dev, mem, R_DRIVER_LOW, avail as u32);
            w32(dev, mem, R_DRIVER_HIGH, 0);
            w32(dev, mem, R_DEVICE_LOW, used as u32);
            w32(dev, mem, R_DEVICE_HIGH, 0);
            w32(dev, mem, R_QUEUE_READY, 1);
        }
        w32(
            dev,
            mem,
            R_STATUS,
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    fn ready_net() -> (MmioNet, GuestMemoryMmap, NetQueue, NetQueue) {
        let mem = memory();
        let mut dev = MmioNet::new(MAC);
        net_init(&mut dev, &mem);
        (dev, mem, NetQueue::rx(), NetQueue::tx())
    }

    /// A frame of `len` bytes: destination MAC, source MAC, ethertype, then a pattern.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        f[..6].copy_from_slice(&MAC);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, seed]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f
    }

    /// Writes a 12-byte header of junk (the device ignores it) and `frame` at `at`.
    fn put_tx(mem: &GuestMemoryMmap, at: u64, frame: &[u8]) {
        mem.write_slice(&[0xa5; NET_HDR_LEN], GuestAddress(at))
            .unwrap();
        mem.write_slice(frame, GuestAddress(at + NET_HDR_LEN as u64))
            .unwrap();
    }

    fn notify_tx(dev: &mut MmioNet, mem: &GuestMemoryMmap) {
        w32(dev, mem, R_NOTIFY, 1);
    }

    fn read(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    #[test]
    fn identification_features_and_mac() {
        let mem = memory();
        let mut dev = MmioNet::new(MAC);
        assert_eq!(dev.mac(), MAC);
        assert_eq!(r32(&mut dev, &mem, R_DEVICE_ID), 1);
        assert_eq!(features(&mut dev, &mem), 1 << 32 | 1 << 28 | 1 << 5);
        // The MAC, as Linux reads it (byte by byte) and in wider accesses.
        for (i, &b) in MAC.iter().enumerate() {
            let mut one = [0u8; 1];
            dev.mmio_read(R_CONFIG + i as u64, &mut one, &mem);
            assert_eq!(one[0], b);
        }
        let mut eight = [0xffu8; 8];
        dev.mmio_read(R_CONFIG, &mut eight, &mem);
        assert_eq!(eight, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0]);
        // Read-only: writes are ignored.
        dev.mmio_write(R_CONFIG, &[0; 6], &mem);
        dev.mmio_read(R_CONFIG, &mut eight, &mem);
        assert_eq!(eight[..6], MAC);
        // Two queues of 256, no third.
        for q in 0..3 {
            w32(&mut dev, &mem, R_QUEUE_SEL, q);
            let max = if q < 2 { 256 } else { 0 };
            assert_eq!(r32(&mut dev, &mem, R_QUEUE_NUM_MAX), max, "queue {q}");
        }
        // Mergeable buffers (not offered): refused.
        w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER);
        w32(&mut dev, &mem, R_DRV_FEATURES_SEL, 0);
        w32(
            &mut dev,
            &mem,
            R_DRV_FEATURES,
            (1 << 5 | F_MRG_RXBUF) as u32,
        );
        w32(&mut dev, &mem, R_DRV_FEATURES_SEL, 1);
        w32(&mut dev, &mem, R_DRV_FEATURES, 1);
        w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(r32(&mut dev, &mem, R_STATUS) & S_FEATURES_OK, 0);
        // Everything offered: accepted.
        net_init(&mut dev, &mem);
        assert_eq!(
            dev.state().device.acked_features,
            1 << 32 | 1 << 28 | 1 << 5
        );
        assert_eq!(dev.status() & S_DRIVER_OK, S_DRIVER_OK);
        // A reset forgets the features.
        w32(&mut dev, &mem, R_STATUS, 0);
        assert_eq!(dev.state().device.acked_features, 0);
    }

    #[test]
    fn transmit_one_frame() {
        let (mut dev, mem, _rx, mut tx) = ready_net();
        let f = frame(60, 1);
        put_tx(&mem, TX_BUF, &f);
        let head = tx.chain(&mem, &[(TX_BUF, (NET_HDR_LEN + 60) as u32, false)]);
        tx.offer(&mem, head);
        notify_tx(&mut dev, &mem);
        assert_eq!(tx.used_idx(&mem), 1);
        assert_eq!(tx.used_elem(&mem, 0), (u32::from(head), 0));
        assert!(dev.irq_level());
        assert_eq!(dev.take_tx(), vec![f]);
        assert!(dev.take_tx().is_empty(), "taken once");
        assert_eq!(dev.status() & S_NEEDS_RESET, 0);
    }

    #[test]
    fn transmit_several_frames_split_and_indirect() {
        let (mut dev, mem, _rx, mut tx) = ready_net();
        // A: header and frame in one descriptor.
        let a = frame(100, 2);
        put_tx(&mem, TX_BUF, &a);
        let head = tx.chain(&mem, &[(TX_BUF, 112, false)]);
        tx.offer(&mem, head);
        // B: the header split over two descriptors, the frame over three.
        let b = frame(3000, 3);
        let base = TX_BUF + 0x1000;
        put_tx(&mem, base, &b);
        let head = tx.chain(
            &mem,
            &[
                (base, 5, false),
                (base + 5, 7, false),
                (base + 12, 20, false),
                (base + 32, 1000, false),
                (base + 1032, 1980, false),
            ],
        );
        tx.offer(&mem, head);
        // C: through an indirect table (header, then the frame in two pieces).
        let c = frame(1514, 4);
        let base = TX_BUF + 0x3000;
        put_tx(&mem, base, &c);
        let table = 0x9000;
        Driver::write_desc(&mem, table, 0, base, 12, F_NEXT, 1);
        Driver::write_desc(&mem, table, 1, base + 12, 14, F_NEXT, 2);
        Driver::write_desc(&mem, table, 2, base + 26, 1500, 0, 0);
        let head = tx.next_desc;
        Driver::write_desc(&mem, TX_DESC, head, table, 48, F_INDIRECT, 0);
        tx.next_desc += 1;
        tx.offer(&mem, head);
        // D: the largest frame.
        let d = frame(MAX_FRAME_LEN, 5);
        let base = TX_BUF + 0x1_0000;
        put_tx(&mem, base, &d);
        let head = tx.chain(&mem, &[(base, (NET_HDR_LEN + MAX_FRAME_LEN) as u32, false)]);
        tx.offer(&mem, head);

        notify_tx(&mut dev, &mem);
        assert_eq!(tx.used_idx(&mem), 4);
        for i in 0..4 {
            assert_eq!(tx.used_elem(&mem, i).1, 0);
        }
        assert_eq!(dev.take_tx(), vec![a, b, c, d]);
    }

    #[test]
    fn receive_into_posted_buffer() {
        let (mut dev, mem, mut rx, _tx) = ready_net();
        assert!(!dev.rx_ready(&mem), "no buffer posted yet");
        mem.write_slice(&[0xee; 0x2000], GuestAddress(RX_BUF))
            .unwrap();
        // Split: 12 bytes for the header, then room for a full frame elsewhere.
        let head = rx.chain(&mem, &[(RX_BUF, 12, true), (RX_BUF + 0x1000, 1514, true)]);
        rx.offer(&mem, head);
        w32(&mut dev, &mem, R_NOTIFY, 0);
        assert!(!dev.irq_level(), "posting buffers completes nothing");
        assert!(dev.rx_ready(&mem));
        let f = frame(100, 6);
        assert!(dev.receive(&f, &mem).unwrap());
        let mut hdr = [0u8; 12];
        hdr[10] = 1;
        assert_eq!(
            read(&mem, RX_BUF, 12),
            hdr,
            "zeroed header, num_buffers = 1"
        );
        assert_eq!(read(&mem, RX_BUF + 0x1000, 100), f);
        assert_eq!(
            read(&mem, RX_BUF + 0x1000 + 100, 1),
            [0xee],
            "nothing beyond"
        );
        assert_eq!(rx.used_idx(&mem), 1);
        assert_eq!(rx.used_elem(&mem, 0), (u32::from(head), 112));
        assert_eq!(r32(&mut dev, &mem, R_INT_STATUS), 1);
        assert!(!dev.rx_ready(&mem), "the only buffer is used");
        assert!(!dev.receive(&f, &mem).unwrap(), "no buffer: dropped");
        // Through the dirty bitmap, like every device write.
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(region.bitmap().dirty_at(RX_BUF as usize + 0x1000));

        // One buffer for header and frame together; the driver suppresses interrupts.
        w32(&mut dev, &mem, R_INT_ACK, 1);
        mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
        let head = rx.chain(&mem, &[(RX_BUF + 0x2000, 1526, true)]);
        rx.offer(&mem, head);
        let g = frame(1514, 7);
        assert!(dev.receive(&g, &mem).unwrap());
        assert_eq!(read(&mem, RX_BUF + 0x2000, 12), hdr);
        assert_eq!(read(&mem, RX_BUF + 0x2000 + 12, 1514), g);
        assert_eq!(rx.used_elem(&mem, 1), (u32::from(head), 1526));
        assert!(!dev.irq_level(), "VRING_AVAIL_F_NO_INTERRUPT honoured");
    }

    #[test]
    fn receive_without_buffer_or_driver() {
        let mem = memory();
        let mut dev = MmioNet::new(MAC);
        let f = frame(60, 8);
        assert!(!dev.rx_ready(&mem));
        assert!(!dev.receive(&f, &mem).unwrap(), "no driver");
        net_init(&mut dev, &mem);
        assert!(!dev.rx_ready(&mem));
        assert!(!dev.receive(&f, &mem).unwrap(), "no buffer");
        assert!(!dev.irq_level());
        assert_eq!(used_idx(&mem), 0);
        // Queue ready but DRIVER_OK not yet set.
        let mut rx = NetQueue::rx();
        let head = rx.chain(&mem, &[(RX_BUF, 2048, true)]);
        rx.offer(&mem, head);
        w32(&mut dev, &mem, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert!(!dev.rx_ready(&mem));
        assert!(!dev.receive(&f, &mem).unwrap());
        assert_eq!(used_idx(&mem), 0);
    }

    #[test]
    fn receive_too_small_buffer_keeps_it() {
        let (mut dev, mem, mut rx, _tx) = ready_net();
        let head = rx.chain(&mem, &[(RX_BUF, 60, true)]);
        rx.offer(&mem, head);
        // 12 + 49 > 60: dropped, the buffer stays available.
        assert!(!dev.receive(&frame(49, 9), &mem).unwrap());
        assert_eq!(rx.used_idx(&mem), 0);
        assert!(!dev.irq_level());
        assert!(dev.rx_ready(&mem));
        // Frames outside 14..=65550 bytes are dropped before looking at the ring.
        assert!(!dev.receive(&[0; 13], &mem).unwrap());
        assert!(!dev.receive(&vec![0; MAX_FRAME_LEN + 1], &mem).unwrap());
        // A frame that fits exactly goes into that same buffer.
        let f = frame(48, 10);
        assert!(dev.receive(&f, &mem).unwrap());
        assert_eq!(rx.used_elem(&mem, 0), (u32::from(head), 60));
        assert_eq!(read(&mem, RX_BUF + 12, 48), f);
        assert_eq!(dev.status() & S_NEEDS_RESET, 0);
    }

    #[test]
    fn broken_receive_buffers_are_returned_empty() {
        let (mut dev, mem, mut rx, _tx) = ready_net();
        // Device-readable: returned with length 0.
        let bad = rx.chain(&mem, &[(RX_BUF, 2048, false)]);
        rx.offer(&mem, bad);
        // Outside guest memory.
        let outside = rx.chain(&mem, &[(MEM_SIZE as u64 - 100, 2048, true)]);
        rx.offer(&mem, outside);
        // A loop.
        let looped = rx.next_desc;
        Driver::write_desc(&mem, DESC, looped, RX_BUF, 8, F_NEXT | F_WRITE, looped);
        rx.next_desc += 1;
        rx.offer(&mem, looped);
        // A head beyond the queue: skipped, no used entry.
        rx.offer(&mem, 300);
        let good = rx.chain(&mem, &[(RX_BUF + 0x1000, 2048, true)]);
        rx.offer(&mem, good);
        let f = frame(64, 11);
        for _ in 0..4 {
            assert!(!dev.receive(&f, &mem).unwrap());
        }
        assert_eq!(rx.used_idx(&mem), 3);
        for (i, head) in [bad, outside, looped].into_iter().enumerate() {
            assert_eq!(rx.used_elem(&mem, i as u16), (u32::from(head), 0));
        }
        assert!(dev.receive(&f, &mem).unwrap());
        assert_eq!(rx.used_elem(&mem, 3), (u32::from(good), 76));
        assert_eq!(read(&mem, RX_BUF + 0x1000 + 12, 64), f);
        assert_eq!(dev.status() & S_NEEDS_RESET, 0);
    }

    #[test]
    fn broken_receive_ring_needs_reset() {
        let (mut dev, mem, _rx, _tx) = ready_net();
        mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(dev.rx_ready(&mem));
        assert!(dev.receive(&frame(60, 12), &mem).is_err());
        assert_ne!(dev.status() & S_NEEDS_RESET, 0);
        assert_eq!(r32(&mut dev, &mem, R_INT_STATUS) & 2, 2);
        assert!(!dev.rx_ready(&mem));
        assert!(
            !dev.receive(&frame(60, 12), &mem).unwrap(),
            "ignored until reset"
        );
        // Reset and start over.
        mem.write_slice(&[0u8; 0x6000], GuestAddress(DESC)).unwrap();
        net_init(&mut dev, &mem);
        let mut rx = NetQueue::rx();
        let head = rx.chain(&mem, &[(RX_BUF, 2048, true)]);
        rx.offer(&mem, head);
        assert!(dev.receive(&frame(60, 13), &mem).unwrap());
    }

    #[test]
    fn bad_transmit_descriptors_are_dropped() {
        let (mut dev, mem, _rx, mut tx) = ready_net();
        let f = frame(60, 14);
        put_tx(&mem, TX_BUF, &f);
        // 0: a loop 0 -> 1 -> 0.
        Driver::write_desc(&mem, TX_DESC, 0, TX_BUF, 12, F_NEXT, 1);
        Driver::write_desc(&mem, TX_DESC, 1, TX_BUF + 12, 60, F_NEXT, 0);
        tx.offer(&mem, 0);
        // 2: a next index beyond the queue.
        Driver::write_desc(&mem, TX_DESC, 2, TX_BUF, 12, F_NEXT, 200);
        tx.offer(&mem, 2);
        // 3: a device-writable descriptor.
        Driver::write_desc(&mem, TX_DESC, 3, TX_BUF, 12, F_NEXT, 4);
        Driver::write_desc(&mem, TX_DESC, 4, TX_BUF + 12, 60, F_WRITE, 0);
        tx.offer(&mem, 3);
        // 5: a buffer outside guest memory.
        Driver::write_desc(&mem, TX_DESC, 5, TX_BUF, 12, F_NEXT, 6);
        Driver::write_desc(&mem, TX_DESC, 6, MEM_SIZE as u64 - 30, 60, 0, 0);
        tx.offer(&mem, 5);
        // 7: too short: a header and 13 bytes.
        Driver::write_desc(&mem, TX_DESC, 7, TX_BUF, 25, 0, 0);
        tx.offer(&mem, 7);
        // 8: shorter than a header.
        Driver::write_desc(&mem, TX_DESC, 8, TX_BUF, 4, 0, 0);
        tx.offer(&mem, 8);
        // 9: a huge length (beyond 65550 bytes of frame, and beyond memory).
        Driver::write_desc(&mem, TX_DESC, 9, TX_BUF, u32::MAX, 0, 0);
        tx.offer(&mem, 9);
        // 10: an indirect table of a length that is not a multiple of 16.
        Driver::write_desc(&mem, TX_DESC, 10, 0x9000, 20, F_INDIRECT, 0);
        tx.offer(&mem, 10);
        // A head beyond the queue: no used entry.
        tx.offer(&mem, 300);
        tx.next_desc = 11;
        notify_tx(&mut dev, &mem);
        let heads = [0u32, 2, 3, 5, 7, 8, 9, 10];
        assert_eq!(tx.used_idx(&mem), heads.len() as u16);
        for (i, head) in heads.into_iter().enumerate() {
            assert_eq!(tx.used_elem(&mem, i as u16), (head, 0));
        }
        assert!(dev.take_tx().is_empty(), "every frame dropped");
        assert_eq!(dev.status() & S_NEEDS_RESET, 0);
        // The device still works.
        let head = tx.chain(&mem, &[(TX_BUF, 72, false)]);
        tx.offer(&mem, head);
        notify_tx(&mut dev, &mem);
        assert_eq!(dev.take_tx(), vec![f]);
        assert_eq!(tx.used_idx(&mem), heads.len() as u16 + 1);
    }

    #[test]
    fn broken_transmit_ring_needs_reset() {
        let (mut dev, mem, _rx, _tx) = ready_net();
        mem.write_obj(1000u16, GuestAddress(TX_AVAIL + 2)).unwrap();
        notify_tx(&mut dev, &mem);
        assert_ne!(dev.status() & S_NEEDS_RESET, 0);
        assert_eq!(r32(&mut dev, &mem, R_INT_STATUS) & 2, 2);
    }

    #[test]
    fn state_round_trip() {
        let (mut a, mem_a, mut rx, mut tx) = ready_net();
        // One frame transmitted and not taken, one received.
        let sent = frame(80, 15);
        put_tx(&mem_a, TX_BUF, &sent);
        let head = tx.chain(&mem_a, &[(TX_BUF, 92, false)]);
        tx.offer(&mem_a, head);
        notify_tx(&mut a, &mem_a);
        for k in 0..2 {
            let head = rx.chain(&mem_a, &[(RX_BUF + k * 0x1000, 2048, true)]);
            rx.offer(&mem_a, head);
        }
        assert!(a.receive(&frame(70, 16), &mem_a).unwrap());
        let saved = a.state();
        assert_eq!(saved.device.mac, MAC);
        assert_eq!(saved.device.tx, vec![sent.clone()]);
        assert_eq!(saved.queues[0].next_used, 1);
        assert_eq!(saved.queues[1].next_used, 1);

        // Another device, with another MAC, restored onto a copy of guest memory.
        let mem_b = memory();
        let mut all = vec![0u8; MEM_SIZE];
        mem_a.read_slice(&mut all, GuestAddress(0)).unwrap();
        mem_b.write_slice(&all, GuestAddress(0)).unwrap();
        let mut b = MmioNet::new([2, 0, 0, 0, 0, 1]);
        b.restore(&saved).unwrap();
        assert_eq!(b.state(), saved);
        assert_eq!(b.mac(), MAC, "the saved MAC, which the guest has read");

        for (dev, mem) in [(&mut a, &mem_a), (&mut b, &mem_b)] {
            assert_eq!(dev.take_tx(), vec![sent.clone()]);
            assert!(dev.rx_ready(mem));
            assert!(dev.receive(&frame(90, 17), mem).unwrap());
            assert!(!dev.rx_ready(mem));
        }
        let mut all_b = vec![0u8; MEM_SIZE];
        mem_a.read_slice(&mut all, GuestAddress(0)).unwrap();
        mem_b.read_slice(&mut all_b, GuestAddress(0)).unwrap();
        assert!(all == all_b, "same guest memory after the same frame");
        assert_eq!(a.state(), b.state());
    }

    #[test]
    fn garbage_rings_never_panic() {
        let (mut dev, mem, _rx, _tx) = ready_net();
        let mut x = 0x9e37_79b9u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for round in 0..300 {
            let junk: Vec<u8> = (0..0x6000).map(|_| next() as u8).collect();
            mem.write_slice(&junk, GuestAddress(DESC)).unwrap();
            if round % 3 == 0 {
                // Small numbers: descriptors that point somewhere plausible.
                for i in 0..QSIZE {
                    let v = next();
                    for table in [DESC, TX_DESC] {
                        Driver::write_desc(
                            &mem,
                            table,
                            i,
                            u64::from(v & 0xf_ffff),
                            v >> 20,
                            (v >> 8) as u16 & 7,
                            (v >> 12) as u16 % 20,
                        );
                    }
                }
                mem.write_obj((next() % 20) as u16, GuestAddress(AVAIL + 2))
                    .unwrap();
                mem.write_obj((next() % 20) as u16, GuestAddress(TX_AVAIL + 2))
                    .unwrap();
            }
            net_init(&mut dev, &mem);
            notify_tx(&mut dev, &mem);
            let len = (next() % 2000) as usize;
            let _ = dev.rx_ready(&mem);
            let _ = dev.receive(&vec![0x55; len], &mem);
            let _ = dev.take_tx();
        }
    }
}
