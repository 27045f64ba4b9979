//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2).
//!
//! Registers (32-bit accesses only; other widths are ignored with a warning and read 0):
//!
//! | offset | register | |
//! | --- | --- | --- |
//! | 0x000 | MagicValue | "virt" (0x74726976) |
//! | 0x004 | Version | 2 |
//! | 0x008 | DeviceID | from the device (1 = net, 2 = block) |
//! | 0x00c | VendorID | "FTVM" (0x4654564d) |
//! | 0x010 / 0x014 | DeviceFeatures / DeviceFeaturesSel | 32 feature bits per page |
//! | 0x020 / 0x024 | DriverFeatures / DriverFeaturesSel | ignored after FEATURES_OK |
//! | 0x030 | QueueSel | |
//! | 0x034 | QueueNumMax | 0 for a queue that does not exist |
//! | 0x038 | QueueNum | a power of two up to QueueNumMax |
//! | 0x044 | QueueReady | |
//! | 0x050 | QueueNotify | processes the queue's requests at once |
//! | 0x060 / 0x064 | InterruptStatus / InterruptACK | bit 0 used buffer, bit 1 config change |
//! | 0x070 | Status | writing 0 resets the device |
//! | 0x080-0x0a4 | QueueDesc / QueueDriver / QueueDevice Low/High | only while not ready |
//! | 0x0b0-0x0bc | SHMLen / SHMBase | no shared memory: all ones |
//! | 0x0fc | ConfigGeneration | the configuration never changes: 0 |
//! | 0x100- | device configuration | any width |
//!
//! Feature negotiation: FEATURES_OK sticks only if the driver accepted VIRTIO_F_VERSION_1 and
//! nothing the device did not offer. Queues are processed only with FEATURES_OK and DRIVER_OK
//! set. A ring the device cannot use (outside guest memory, an available index that runs more
//! than a queue ahead, a used ring it cannot write) puts the device in the DEVICE_NEEDS_RESET
//! state with a configuration change interrupt; it then ignores notifications until the driver
//! resets it.
//!
//! A device may also complete buffers outside a notification, when the VMM pushes an input
//! into it (a received network frame): [`VirtioMmio::with_queue`] gives it the queue under the
//! same conditions, raises the used-buffer interrupt for what it completed and puts the device
//! in DEVICE_NEEDS_RESET if the ring is broken.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::block::{VirtioBlk, VirtioBlkState};
use super::net::{VirtioNet, VirtioNetState};
use super::{QueueSnapshot, VirtioDevice, VirtioError};
use crate::disk::Disk;
use crate::persist::{Persist, RestoreError};
use crate::GuestMemoryMmap;

/// "virt".
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2 (modern).
pub const MMIO_VERSION: u32 = 2;
/// "FTVM".
pub const VENDOR_ID: u32 = 0x4654_564d;
/// QueueReset (virtio 1.2; VIRTIO_F_RING_RESET is not offered, so writes are ignored).
const QUEUE_RESET: u64 = 0x0c0;

const fn reg(r: u32) -> u64 {
    r as u64
}

const MAGIC_VALUE: u64 = reg(VIRTIO_MMIO_MAGIC_VALUE);
const VERSION: u64 = reg(VIRTIO_MMIO_VERSION);
const DEVICE_ID: u64 = reg(VIRTIO_MMIO_DEVICE_ID);
const VENDOR: u64 = reg(VIRTIO_MMIO_VENDOR_ID);
const DEVICE_FEATURES: u64 = reg(VIRTIO_MMIO_DEVICE_FEATURES);
const DEVICE_FEATURES_SEL: u64 = reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL);
const DRIVER_FEATURES: u64 = reg(VIRTIO_MMIO_DRIVER_FEATURES);
const DRIVER_FEATURES_SEL: u64 = reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL);
const QUEUE_SEL: u64 = reg(VIRTIO_MMIO_QUEUE_SEL);
const QUEUE_NUM_MAX: u64 = reg(VIRTIO_MMIO_QUEUE_NUM_MAX);
const QUEUE_NUM: u64 = reg(VIRTIO_MMIO_QUEUE_NUM);
const QUEUE_READY: u64 = reg(VIRTIO_MMIO_QUEUE_READY);
const QUEUE_NOTIFY: u64 = reg(VIRTIO_MMIO_QUEUE_NOTIFY);
const INTERRUPT_STATUS: u64 = reg(VIRTIO_MMIO_INTERRUPT_STATUS);
const INTERRUPT_ACK: u64 = reg(VIRTIO_MMIO_INTERRUPT_ACK);
const STATUS: u64 = reg(VIRTIO_MMIO_STATUS);
const QUEUE_DESC_LOW: u64 = reg(VIRTIO_MMIO_QUEUE_DESC_LOW);
const QUEUE_DESC_HIGH: u64 = reg(VIRTIO_MMIO_QUEUE_DESC_HIGH);
const QUEUE_DRIVER_LOW: u64 = reg(VIRTIO_MMIO_QUEUE_AVAIL_LOW);
const QUEUE_DRIVER_HIGH: u64 = reg(VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
const QUEUE_DEVICE_LOW: u64 = reg(VIRTIO_MMIO_QUEUE_USED_LOW);
const QUEUE_DEVICE_HIGH: u64 = reg(VIRTIO_MMIO_QUEUE_USED_HIGH);
const SHM_SEL: u64 = reg(VIRTIO_MMIO_SHM_SEL);
const SHM_LEN_LOW: u64 = reg(VIRTIO_MMIO_SHM_LEN_LOW);
const SHM_LEN_HIGH: u64 = reg(VIRTIO_MMIO_SHM_LEN_HIGH);
const SHM_BASE_LOW: u64 = reg(VIRTIO_MMIO_SHM_BASE_LOW);
const SHM_BASE_HIGH: u64 = reg(VIRTIO_MMIO_SHM_BASE_HIGH);
const CONFIG_GENERATION: u64 = reg(VIRTIO_MMIO_CONFIG_GENERATION);
const CONFIG: u64 = reg(VIRTIO_MMIO_CONFIG);

const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// Which ring address register a write goes to.
#[derive(Clone, Copy, Debug)]
enum Ring {
    Desc,
    Driver,
    Device,
}

/// The saved state of a virtio-mmio device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState<S> {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The virtqueues.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: S,
}

/// The saved state of [`MmioBlock`].
pub type MmioBlockState = VirtioMmioState<VirtioBlkState>;

/// The saved state of [`MmioNet`].
pub type MmioNetState = VirtioMmioState<VirtioNetState>;

/// A virtio device `D` on the virtio-mmio transport.
#[derive(Debug)]
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

/// virtio-blk on virtio-mmio: the device in a virtio-mmio slot.
pub type MmioBlock = VirtioMmio<VirtioBlk>;

impl MmioBlock {
    /// A virtio-blk device over `disk` (read-only if `read_only`: it offers VIRTIO_BLK_F_RO
    /// and fails writes).
    pub fn new(disk: Box<dyn Disk>, read_only: bool) -> Self {
        VirtioMmio::with_device(VirtioBlk::new(disk, read_only))
    }
}

/// virtio-net on virtio-mmio: the device in a virtio-mmio slot (its own methods are in
/// [`super::net`]).
pub type MmioNet = VirtioMmio<VirtioNet>;

fn new_queue(max_size: u16) -> Queue {
    match Queue::new(max_size) {
        Ok(q) => q,
        Err(e) => {
            // Devices declare power-of-two sizes; fall back to a minimal queue otherwise.
            tracing::warn!("virtio: queue size {max_size} rejected ({e}); using 1");
            Queue::new(1).unwrap_or_default()
        }
    }
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// `device` on a fresh transport (status 0, queues not ready).
    pub fn with_device(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&n| new_queue(n))
            .collect();
        VirtioMmio {
            device,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, to take what it produced (e.g. transmitted frames).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether queue `index` can be used now: FEATURES_OK and DRIVER_OK set, the device not
    /// failed or needing reset, the queue ready and its rings inside guest memory.
    pub fn queue_usable(&self, index: usize, mem: &GuestMemoryMmap) -> bool {
        self.status & (DRIVER_OK | FEATURES_OK) == DRIVER_OK | FEATURES_OK
            && self.status & (NEEDS_RESET | FAILED) == 0
            && self
                .queues
                .get(index)
                .is_some_and(|q| q.ready() && q.is_valid(mem))
    }

    /// Queue `index`, to look at (e.g. whether the driver has posted buffers).
    pub fn queue(&self, index: usize) -> Option<&Queue> {
        self.queues.get(index)
    }

    /// Lets the device use queue `index` outside a notification, for an input the VMM pushes
    /// (a received frame). `f` gets the device, the queue and guest memory and returns its
    /// result and how many buffers it added to the used ring; the transport raises the
    /// used-buffer interrupt for them unless the driver suppressed it.
    ///
    /// `Ok(None)`: the queue cannot be used now (no DRIVER_OK, needs reset, not ready) and `f`
    /// did not run. `Err`: the ring is broken (its rings are outside guest memory, or `f`
    /// failed): the device goes to DEVICE_NEEDS_RESET, as for a notification.
    pub fn with_queue<R>(
        &mut self,
        index: usize,
        mem: &GuestMemoryMmap,
        f: impl FnOnce(&mut D, &mut Queue, &GuestMemoryMmap) -> Result<(R, u32), VirtioError>,
    ) -> Result<Option<R>, VirtioError> {
        if self.status & (DRIVER_OK | FEATURES_OK) != DRIVER_OK | FEATURES_OK
            || self.status & (NEEDS_RESET | FAILED) != 0
        {
            return Ok(None);
        }
        let Some(queue) = self.queues.get_mut(index).filter(|q| q.ready()) else {
            return Ok(None);
        };
        if !queue.is_valid(mem) {
            let e = VirtioError::RingsOutsideMemory { queue: index };
            self.needs_reset(&e);
            return Err(e);
        }
        match f(&mut self.device, queue, mem) {
            Ok((r, used)) => {
                if used > 0 && !Self::interrupt_suppressed(queue, mem) {
                    self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                }
                Ok(Some(r))
            }
            Err(e) => {
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                self.needs_reset(&e);
                Err(e)
            }
        }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// InterruptStatus != 0 (the VMM drives the device's IRQ line with this level after every
    /// access).
    pub fn irq_level(&self) -> bool {
        self.interrupt_status != 0
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    /// A read of `data.len()` bytes at `offset` in the device's 4 KiB window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], _mem: &GuestMemoryMmap) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(
                "virtio-mmio: {}-byte read at {offset:#x}: registers take aligned 32-bit \
                 accesses; reads 0",
                data.len()
            );
            data.fill(0);
            return;
        }
        let features = self.device.device_features();
        let value = match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_id(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| q.desc_table() as u32),
            QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> 32) as u32),
            QUEUE_DRIVER_LOW => self.selected_queue().map_or(0, |q| q.avail_ring() as u32),
            QUEUE_DRIVER_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring() >> 32) as u32),
            QUEUE_DEVICE_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            QUEUE_DEVICE_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring() >> 32) as u32),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::warn!("virtio-mmio: read of unknown register {offset:#x}; reads 0");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A write of `data` at `offset` in the device's 4 KiB window. A QueueNotify processes
    /// all available requests of the queue synchronously, here.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
        if offset >= CONFIG {
            self.device.write_config(offset - CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte write at {offset:#x}: registers take 32-bit accesses; \
                 ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            tracing::warn!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES => self.write_driver_features(v),
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM => self.write_queue_num(v),
            QUEUE_READY => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_ready(v & 1 == 1);
                } else {
                    tracing::warn!("virtio-mmio: QueueReady for a queue that does not exist");
                }
            }
            QUEUE_NOTIFY => self.notify(v & 0xffff, mem),
            INTERRUPT_ACK => self.interrupt_status &= !v,
            STATUS => self.write_status(v),
            QUEUE_DESC_LOW => self.write_ring_address(Ring::Desc, Some(v), None),
            QUEUE_DESC_HIGH => self.write_ring_address(Ring::Desc, None, Some(v)),
            QUEUE_DRIVER_LOW => self.write_ring_address(Ring::Driver, Some(v), None),
            QUEUE_DRIVER_HIGH => self.write_ring_address(Ring::Driver, None, Some(v)),
            QUEUE_DEVICE_LOW => self.write_ring_address(Ring::Device, Some(v), None),
            QUEUE_DEVICE_HIGH => self.write_ring_address(Ring::Device, None, Some(v)),
            SHM_SEL | QUEUE_RESET => {}
            _ => tracing::warn!(
                "virtio-mmio: write {v:#x} to unknown or read-only register {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & FEATURES_OK != 0 {
            tracing::warn!("virtio-mmio: DriverFeatures written after FEATURES_OK; ignored");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = self.driver_features & !0xffff_ffff | u64::from(v),
            1 => self.driver_features = self.driver_features & 0xffff_ffff | u64::from(v) << 32,
            sel => {
                if v != 0 {
                    tracing::warn!("virtio-mmio: driver features page {sel} does not exist");
                }
            }
        }
    }

    fn write_queue_num(&mut self, v: u32) {
        let Some(q) = self.selected_queue_mut() else {
            tracing::warn!("virtio-mmio: QueueNum for a queue that does not exist");
            return;
        };
        if q.ready() {
            tracing::warn!("virtio-mmio: QueueNum written while the queue is ready; ignored");
            return;
        }
        match u16::try_from(v).map(|n| q.try_set_size(n)) {
            Ok(Ok(())) => {}
            _ => tracing::warn!(
                "virtio-mmio: queue size {v} is not a power of two up to {}; ignored",
                q.max_size()
            ),
        }
    }

    fn write_ring_address(&mut self, ring: Ring, low: Option<u32>, high: Option<u32>) {
        let Some(q) = self.selected_queue_mut() else {
            tracing::warn!("virtio-mmio: ring address for a queue that does not exist");
            return;
        };
        if q.ready() {
            tracing::warn!("virtio-mmio: {ring:?} ring address written while ready; ignored");
            return;
        }
        let old = match ring {
            Ring::Desc => q.desc_table(),
            Ring::Driver => q.avail_ring(),
            Ring::Device => q.used_ring(),
        };
        let low = low.map_or(old & 0xffff_ffff, u64::from);
        let high = high.map_or(old >> 32, u64::from);
        let addr = GuestAddress(high << 32 | low);
        let result = match ring {
            Ring::Desc => q.try_set_desc_table_address(addr),
            Ring::Driver => q.try_set_avail_ring_address(addr),
            Ring::Device => q.try_set_used_ring_address(addr),
        };
        if let Err(e) = result {
            tracing::warn!(
                "virtio-mmio: {ring:?} ring address {:#x}: {e}; ignored",
                addr.0
            );
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut status = (v & 0xff) | (self.status & NEEDS_RESET);
        if status & FEATURES_OK != 0 && self.status & FEATURES_OK == 0 {
            let offered = self.device.device_features();
            let extra = self.driver_features & !offered;
            if extra != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                tracing::warn!(
                    "virtio-mmio: driver features {:#x} refused (offered {offered:#x}, \
                     VIRTIO_F_VERSION_1 required)",
                    self.driver_features
                );
                status &= !FEATURES_OK;
            } else {
                self.device.ack_features(self.driver_features);
            }
        }
        self.status = status;
    }

    /// Device reset: everything but the configuration generation returns to power-on.
    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.device.reset();
    }

    /// Marks the device broken until the driver resets it.
    fn needs_reset(&mut self, why: &dyn std::fmt::Display) {
        tracing::warn!("virtio-mmio: {why}; device needs reset");
        self.status |= NEEDS_RESET;
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
    }

    fn notify(&mut self, index: u32, mem: &GuestMemoryMmap) {
        let Some(idx) = usize::try_from(index)
            .ok()
            .filter(|&i| i < self.queues.len())
        else {
            tracing::warn!("virtio-mmio: notify for queue {index}, which does not exist");
            return;
        };
        if self.status & (DRIVER_OK | FEATURES_OK) != DRIVER_OK | FEATURES_OK {
            tracing::warn!(
                "virtio-mmio: notify with status {:#x} (FEATURES_OK and DRIVER_OK needed); ignored",
                self.status
            );
            return;
        }
        if self.status & (NEEDS_RESET | FAILED) != 0 {
            tracing::warn!(
                "virtio-mmio: notify while the device is failed or needs reset; ignored"
            );
            return;
        }
        let queue = &mut self.queues[idx];
        if !queue.ready() {
            tracing::warn!("virtio-mmio: notify for queue {idx}, which is not ready; ignored");
            return;
        }
        if !queue.is_valid(mem) {
            let why = format!("queue {idx}'s rings are not inside guest memory");
            self.needs_reset(&why);
            return;
        }
        match self.device.process_queue(idx, queue, mem) {
            Ok(0) => {}
            Ok(_) => {
                if !Self::interrupt_suppressed(queue, mem) {
                    self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                }
            }
            Err(e) => {
                // Requests completed before the fault are in the used ring: tell the driver.
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                self.needs_reset(&e);
            }
        }
    }

    /// The driver set VRING_AVAIL_F_NO_INTERRUPT (EVENT_IDX is not offered).
    fn interrupt_suppressed(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
        mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
            .is_ok_and(|flags| u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT != 0)
    }
}

impl<D: VirtioDevice> Persist for VirtioMmio<D> {
    type State = VirtioMmioState<D::State>;

    fn state(&self) -> VirtioMmioState<D::State> {
        VirtioMmioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device: self.device.state(),
        }
    }

    /// Refuses a state with another number of queues or a queue virtio-queue rejects, before
    /// anything changes.
    fn restore(&mut self, s: &VirtioMmioState<D::State>) -> Result<(), RestoreError> {
        if s.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: s.queues.len(),
                device: self.queues.len(),
            });
        }
        let queues = s
            .queues
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                Queue::try_from(QueueState::from(q))
                    .map_err(|source| RestoreError::QueueState { queue: i, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.device.restore(&s.device)?;
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        Ok(())
    }
}
