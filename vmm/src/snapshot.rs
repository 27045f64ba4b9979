//! Snapshots: everything needed to resume a VM exactly where it was, in one serializable value.
//!
//! A full snapshot holds all vCPU state KVM exposes, every device's state, virtual time and the
//! non-zero pages of guest RAM. An incremental snapshot (a checkpoint) holds only the pages
//! written since the previous one: the guest's writes, from the KVM dirty log, and the VMM's
//! own writes (device DMA, boot structures), from vm-memory's dirty bitmap. The same code
//! serves `--snapshot-on-exit`/`--restore` and the recorder's checkpoints.

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The magic at the start of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"FTVMMSNP";
/// Snapshot format version (2: the body is LZ4-compressed; 3: the halted state; 4: the NIC;
/// 5: page deltas against the page cache, [`PageCache`]).
pub const SNAPSHOT_VERSION: u16 = 5;
/// The largest uncompressed snapshot body: all of the largest guest RAM, plus room for state.
const MAX_SNAPSHOT_BYTES: usize = (crate::config::MAX_MEMORY_BYTES as usize) + (64 << 20);
const PAGE: u64 = 4096;

/// Errors saving or restoring state.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A KVM ioctl that saves or restores vCPU or VM state failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl's name, e.g. `KVM_GET_REGS`.
        what: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Reading or writing a page of guest RAM for a snapshot failed.
    #[error("guest memory at {addr:#x}: {why}")]
    Memory {
        /// The guest physical address of the access.
        addr: u64,
        /// vm-memory's error.
        why: String,
    },
    /// The snapshot's bytes are not a valid encoded snapshot (truncated or corrupted); the
    /// string is the decoder's error.
    #[error("snapshot does not decode: {0}")]
    Decode(String),
    /// The snapshot does not encode (postcard's error).
    #[error("cannot encode the snapshot: {0}")]
    Encode(String),
    /// Not a snapshot, or another version.
    #[error("not an ftvmm snapshot of version {SNAPSHOT_VERSION}")]
    BadMagic,
    /// The snapshot was taken of a different machine.
    #[error("snapshot was taken with {taken} of RAM, this VM has {ours}")]
    MemoryMismatch {
        /// The snapshot's guest RAM size, in bytes.
        taken: u64,
        /// This VM's guest RAM size, in bytes.
        ours: u64,
    },
    /// Reading or writing a snapshot file failed.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file's path as given.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, SnapshotError> {
    r.map_err(|source| SnapshotError::Kvm { what, source })
}

/// `kvm_fpu`, field by field (kvm-bindings does not serialize it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FpuState {
    fpr: Vec<[u8; 16]>,
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: Vec<[u8; 16]>,
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

/// All the vCPU state KVM exposes (with no in-kernel LAPIC there is none to save).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: FpuState,
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

/// The MSRs this KVM lets the VMM read, from its index list.
pub fn saveable_msrs(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm("KVM_GET_MSR_INDEX_LIST", kvm_fd.get_msr_index_list())?;
    let mut ok = Vec::new();
    // KVM's paravirtual MSRs (kvmclock, async PF, ...) belong to the hypervisor leaves the guest
    // never sees (crate::cpuid), and KVM refuses to set them then.
    let paravirt = |i: u32| (0x4b56_4d00..=0x4b56_4dff).contains(&i) || i == 0x11 || i == 0x12;
    for &index in list.as_slice().iter().filter(|i| !paravirt(**i)) {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| SnapshotError::Decode(format!("{e:?}")))?;
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            ok.push(index);
        }
    }
    Ok(ok)
}

impl VcpuSnapshot {
    /// Reads the vCPU's state.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, SnapshotError> {
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| SnapshotError::Decode(format!("{e:?}")))?;
        let n = kvm("KVM_GET_MSRS", vcpu.get_msrs(&mut msrs))?;
        Ok(VcpuSnapshot {
            regs: kvm("KVM_GET_REGS", vcpu.get_regs())?,
            sregs: kvm("KVM_GET_SREGS", vcpu.get_sregs())?,
            fpu: FpuState::from(&kvm("KVM_GET_FPU", vcpu.get_fpu())?),
            xcrs: vcpu.get_xcrs().ok(),
            msrs: msrs.as_slice()[..n].to_vec(),
            events: kvm("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?,
            mp_state: kvm("KVM_GET_MP_STATE", vcpu.get_mp_state())?,
            debugregs: kvm("KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?,
        })
    }

    /// Writes the state back into a vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        kvm("KVM_SET_SREGS", vcpu.set_sregs(&self.sregs))?;
        kvm("KVM_SET_REGS", vcpu.set_regs(&self.regs))?;
        kvm("KVM_SET_FPU", vcpu.set_fpu(&self.fpu.to_kvm()))?;
        if let Some(x) = &self.xcrs {
            kvm("KVM_SET_XCRS", vcpu.set_xcrs(x))?;
        }
        // KVM_SET_MSRS stops at the first MSR it refuses: go on past each refusal.
        let mut rest: &[kvm_msr_entry] = &self.msrs;
        while !rest.is_empty() {
            let msrs =
                Msrs::from_entries(rest).map_err(|e| SnapshotError::Decode(format!("{e:?}")))?;
            let n = kvm("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
            if n < rest.len() {
                tracing::warn!("KVM refused to restore MSR {:#x}", rest[n].index);
            }
            rest = &rest[(n + 1).min(rest.len())..];
        }
        kvm("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&self.events))?;
        kvm("KVM_SET_MP_STATE", vcpu.set_mp_state(self.mp_state))?;
        kvm("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(&self.debugregs))?;
        Ok(())
    }

    /// A vCPU state with every register zero but the instruction pointer: not a state KVM
    /// would run, but one a [`Snapshot`] can carry where there is no vCPU (tests of the pair's
    /// protocol without KVM).
    pub fn zeroed_at(rip: u64) -> Self {
        VcpuSnapshot {
            regs: kvm_regs {
                rip,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            fpu: FpuState::default(),
            xcrs: None,
            msrs: Vec::new(),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            debugregs: kvm_debugregs::default(),
        }
    }

    /// The instruction pointer.
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// The general registers, for state digests.
    pub fn regs_only(&self) -> kvm_regs {
        self.regs
    }
}

/// A set of guest pages (a bitmap, one bit a page).
#[derive(Clone, Debug, Default)]
pub struct DirtySet {
    words: Vec<u64>,
}

impl DirtySet {
    /// An empty set for `ram_bytes` of RAM.
    pub fn new(ram_bytes: u64) -> DirtySet {
        DirtySet {
            words: vec![0; (ram_bytes / PAGE).div_ceil(64) as usize],
        }
    }

    /// Adds every page of `other`.
    pub fn merge(&mut self, other: &DirtySet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Adds page `pfn`.
    pub fn insert(&mut self, pfn: u64) {
        if let Some(w) = self.words.get_mut((pfn / 64) as usize) {
            *w |= 1 << (pfn % 64);
        }
    }

    /// The page numbers in the set, ascending.
    pub fn pfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            (0..64)
                .filter(move |b| w & (1u64 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
    }

    /// How many pages.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Empties the set, returning what it held.
    pub fn take(&mut self) -> DirtySet {
        let n = self.words.len();
        DirtySet {
            words: std::mem::replace(&mut self.words, vec![0; n]),
        }
    }

    /// The pages written since the last harvest: KVM's dirty log of slot 0 (reset by reading
    /// it; `kvm_log` false when dirty logging is off) and vm-memory's bitmap of the VMM's own
    /// writes (reset here too).
    pub fn harvest(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        kvm_log: bool,
    ) -> Result<DirtySet, SnapshotError> {
        let ram_bytes = mem.last_addr().0 + 1;
        let mut set = DirtySet::new(ram_bytes);
        if kvm_log {
            let bitmap = kvm("KVM_GET_DIRTY_LOG", vm.get_dirty_log(0, ram_bytes as usize))?;
            for (d, w) in set.words.iter_mut().zip(bitmap.iter()) {
                *d |= *w;
            }
        }
        for region in mem.iter() {
            let base = region.start_addr().0;
            // The region's own bitmap (not a slice of it), which can be reset.
            let bm: &vm_memory::bitmap::AtomicBitmap = vm_memory::MmapRegion::bitmap(region);
            for off in (0..region.len()).step_by(PAGE as usize) {
                if bm.dirty_at(off as usize) {
                    set.insert((base + off) / PAGE);
                }
            }
            bm.reset();
        }
        Ok(set)
    }
}

/// Pages of guest RAM: (guest page number, contents).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Pages {
    /// RAM size of the machine they belong to.
    pub ram_bytes: u64,
    /// The pages.
    #[serde(with = "ft_core::wire::numbered_bytes")]
    pub pages: Vec<(u64, Vec<u8>)>,
}

impl Pages {
    /// Every non-zero page of RAM.
    pub fn full(mem: &GuestMemoryMmap) -> Result<Pages, SnapshotError> {
        let ram_bytes = mem.last_addr().0 + 1;
        let mut pages = Vec::new();
        let mut buf = vec![0u8; PAGE as usize];
        for pfn in 0..ram_bytes / PAGE {
            let addr = pfn * PAGE;
            mem.read_slice(&mut buf, GuestAddress(addr))
                .map_err(|e| SnapshotError::Memory {
                    addr,
                    why: e.to_string(),
                })?;
            if buf.iter().any(|b| *b != 0) {
                pages.push((pfn, buf.clone()));
            }
        }
        Ok(Pages { ram_bytes, pages })
    }

    /// The pages of a dirty set ([`DirtySet`]), read from RAM now.
    pub fn from_set(mem: &GuestMemoryMmap, set: &DirtySet) -> Result<Pages, SnapshotError> {
        Self::from_pfns(mem, set.pfns())
    }

    /// The pages `pfns`, read from RAM now.
    pub fn from_pfns(
        mem: &GuestMemoryMmap,
        pfns: impl IntoIterator<Item = u64>,
    ) -> Result<Pages, SnapshotError> {
        let ram_bytes = mem.last_addr().0 + 1;
        let mut pages = Vec::new();
        for pfn in pfns {
            let addr = pfn * PAGE;
            let mut buf = vec![0u8; PAGE as usize];
            mem.read_slice(&mut buf, GuestAddress(addr))
                .map_err(|e| SnapshotError::Memory {
                    addr,
                    why: e.to_string(),
                })?;
            pages.push((pfn, buf));
        }
        Ok(Pages { ram_bytes, pages })
    }

    /// Writes the pages into RAM. With `full`, every page not listed is zeroed first: a full
    /// snapshot lists only the non-zero pages, and the RAM it is applied to may hold anything
    /// (a freshly built VM has its kernel and boot structures loaded).
    pub fn apply(&self, mem: &GuestMemoryMmap, full: bool) -> Result<(), SnapshotError> {
        let ours = mem.last_addr().0 + 1;
        if self.ram_bytes != ours {
            return Err(SnapshotError::MemoryMismatch {
                taken: self.ram_bytes,
                ours,
            });
        }
        if full {
            crate::memory::zero(mem).map_err(|e| SnapshotError::Memory {
                addr: 0,
                why: e.to_string(),
            })?;
        }
        for (pfn, data) in &self.pages {
            let addr = pfn.saturating_mul(PAGE);
            if data.len() != PAGE as usize {
                return Err(SnapshotError::Decode(format!(
                    "page {pfn:#x} has {} bytes, not {PAGE}",
                    data.len()
                )));
            }
            mem.write_slice(data, GuestAddress(addr))
                .map_err(|e| SnapshotError::Memory {
                    addr,
                    why: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Bytes of page data.
    pub fn bytes(&self) -> usize {
        self.pages.len() * PAGE as usize
    }
}

/// A page in a checkpoint is its contents (code [`RAW`]), its contents XOR the cached copy
/// ([`XOR`]: mostly zeros, which LZ4 packs to little), or the cached copy unchanged
/// ([`SAME`]: no bytes at all).
pub const RAW: u8 = 0;
/// See [`RAW`].
pub const XOR: u8 = 1;
/// See [`RAW`].
pub const SAME: u8 = 2;

/// The most pages a [`PageCache`] keeps (4 MiB).
pub const PAGE_CACHE_PAGES: usize = 1024;

/// The pages of the most recent checkpoints, as both sides know them: the recorder keeps what it
/// sent, the replayer (or backup) what it received, and both update it by the same rule at every
/// checkpoint, so a page written again can travel as a delta against the copy both hold.
///
/// Not the backup's RAM: at a checkpoint the backup's RAM is the primary's at the last
/// synchronous exit before the kick, which the primary never saw; the cache is what the previous
/// checkpoints carried, which both sides saw. Bounded: when full, the page cached longest ago
/// goes (ties by page number), the same choice on both sides. Emptied by a full snapshot and at
/// a backup's attach.
#[derive(Clone, Debug)]
pub struct PageCache {
    capacity: usize,
    /// Page number -> (insertion stamp, contents).
    pages: std::collections::HashMap<u64, (u64, Box<[u8]>)>,
    /// (stamp, page number), oldest first.
    order: std::collections::BTreeSet<(u64, u64)>,
    stamp: u64,
    /// Pages encoded or decoded as [`XOR`] or [`SAME`], and as [`RAW`] (measurement).
    pub hits: u64,
    /// See `hits`.
    pub misses: u64,
    /// Encode every page raw (`--checkpoint-delta off`), still keeping the cache as the other
    /// side keeps it.
    pub raw_only: bool,
}

impl Default for PageCache {
    fn default() -> Self {
        Self::new(PAGE_CACHE_PAGES)
    }
}

impl PageCache {
    /// An empty cache of at most `capacity` pages.
    pub fn new(capacity: usize) -> Self {
        PageCache {
            capacity,
            pages: Default::default(),
            order: Default::default(),
            stamp: 0,
            hits: 0,
            misses: 0,
            raw_only: false,
        }
    }

    /// Forgets everything (a full snapshot, an attach: what both sides hold is RAM itself).
    pub fn clear(&mut self) {
        self.pages.clear();
        self.order.clear();
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    fn insert(&mut self, pfn: u64, data: &[u8]) {
        self.stamp += 1;
        if let Some((old, _)) = self.pages.remove(&pfn) {
            self.order.remove(&(old, pfn));
        }
        while self.pages.len() >= self.capacity.max(1) {
            let Some(&(stamp, victim)) = self.order.iter().next() else {
                break;
            };
            self.order.remove(&(stamp, victim));
            self.pages.remove(&victim);
        }
        self.order.insert((self.stamp, pfn));
        self.pages.insert(pfn, (self.stamp, data.into()));
    }

    /// Encodes `pages` (their contents now) against the cache, in place, and caches the
    /// contents. Returns the codes, one per page.
    pub fn encode(&mut self, pages: &mut Pages) -> Vec<u8> {
        let mut codes = Vec::with_capacity(pages.pages.len());
        for (pfn, data) in &mut pages.pages {
            let code = match self.pages.get(pfn) {
                Some((_, cached)) if cached.len() == data.len() && !self.raw_only => {
                    self.hits += 1;
                    let mut xor: Vec<u8> =
                        data.iter().zip(cached.iter()).map(|(a, b)| a ^ b).collect();
                    let same = xor.iter().all(|b| *b == 0);
                    let code = if same { SAME } else { XOR };
                    if same {
                        xor.clear();
                    }
                    let now = std::mem::replace(data, xor);
                    self.insert(*pfn, &now);
                    code
                }
                _ => {
                    self.misses += 1;
                    self.insert(*pfn, data);
                    RAW
                }
            };
            codes.push(code);
        }
        codes
    }

    /// Decodes what [`PageCache::encode`] made on the other side, whose cache held what this one
    /// holds: the pages' contents, and caches them. Fails (a corrupt or foreign checkpoint)
    /// rather than guess.
    pub fn decode(&mut self, pages: &Pages, codes: &[u8]) -> Result<Pages, SnapshotError> {
        if codes.len() != pages.pages.len() {
            return Err(SnapshotError::Decode(format!(
                "{} page codes for {} pages",
                codes.len(),
                pages.pages.len()
            )));
        }
        let mut out = Vec::with_capacity(pages.pages.len());
        for ((pfn, data), &code) in pages.pages.iter().zip(codes) {
            let cached = self.pages.get(pfn).map(|(_, c)| c);
            let page: Vec<u8> = match (code, cached) {
                (RAW, _) => data.clone(),
                (XOR, Some(c)) if c.len() == data.len() => {
                    data.iter().zip(c.iter()).map(|(a, b)| a ^ b).collect()
                }
                (SAME, Some(c)) if data.is_empty() => c.to_vec(),
                _ => {
                    return Err(SnapshotError::Decode(format!(
                        "page {pfn:#x}: code {code} does not fit the page cache (a checkpoint from another stream?)"
                    )))
                }
            };
            self.insert(*pfn, &page);
            out.push((*pfn, page));
        }
        Ok(Pages {
            ram_bytes: pages.ram_bytes,
            pages: out,
        })
    }
}

/// A whole VM at one point: full (every non-zero page) or incremental (pages written since the
/// previous snapshot).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// Whether `pages` holds all of RAM.
    pub full: bool,
    /// The vCPU.
    pub vcpu: VcpuSnapshot,
    /// Every device and virtual time.
    pub platform: crate::platform::PlatformState,
    /// RAM.
    pub pages: Pages,
    /// The exit digest so far, so that a restored run ends with the uninterrupted run's digest.
    pub digest: ft_core::ExitDigest,
    /// kvm_run's request_interrupt_window, if_flag and ready_for_interrupt_injection.
    pub interrupt_flags: [u8; 3],
    /// The compatibility paths' state.
    pub compat: Option<crate::compat::SyscallFix>,
    /// The guest is halted waiting for an interrupt (taken while a halted guest waited).
    pub halted: bool,
    /// How each of `pages` is encoded against the [`PageCache`], one code per page, in a
    /// checkpoint; `None` in a base both sides start their caches from, empty (a full
    /// snapshot, a snapshot file, the final state of an attach): its pages are raw.
    #[serde(with = "serde_bytes")]
    pub delta: Option<Vec<u8>>,
}

impl Snapshot {
    /// Encodes: postcard, then LZ4 (block format, the uncompressed size first as a u32
    /// little-endian). Guest pages are most of a snapshot and compress well (page tables, zeroed
    /// and partly used pages).
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let raw = postcard::to_stdvec(self).map_err(|e| SnapshotError::Encode(e.to_string()))?;
        Ok(lz4_flex::compress_prepend_size(&raw))
    }

    /// Decodes what [`Snapshot::encode`] made.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        // A corrupt or hostile size prefix must not make the VMM allocate gigabytes.
        let raw = ft_core::log::unpack_lz4(bytes, MAX_SNAPSHOT_BYTES)
            .map_err(|e| SnapshotError::Decode(e.to_string()))?;
        postcard::from_bytes(&raw).map_err(|e| SnapshotError::Decode(e.to_string()))
    }

    /// Writes a snapshot file: magic, version, CRC32C of the body, body.
    pub fn write_file(&self, path: &std::path::Path) -> Result<(), SnapshotError> {
        let body = self.encode()?;
        let mut out = SNAPSHOT_MAGIC.to_vec();
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        let io = |source| SnapshotError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &out).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a snapshot file, checking its magic, version and CRC.
    pub fn read_file(path: &std::path::Path) -> Result<Snapshot, SnapshotError> {
        let data = std::fs::read(path).map_err(|source| SnapshotError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if data.len() < 14
            || data[..8] != SNAPSHOT_MAGIC
            || data[8..10] != SNAPSHOT_VERSION.to_le_bytes()
        {
            return Err(SnapshotError::BadMagic);
        }
        let crc = u32::from_le_bytes([data[10], data[11], data[12], data[13]]);
        let body = &data[14..];
        if crc32c::crc32c(body) != crc {
            return Err(SnapshotError::Decode(format!(
                "{}: CRC mismatch (corrupt file)",
                path.display()
            )));
        }
        Snapshot::decode(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A page: mostly one byte value, with a few runs of others.
    fn page() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u8>(),
            proptest::collection::vec((0..4096usize, 1..64usize, any::<u8>()), 0..6),
        )
            .prop_map(|(fill, runs)| {
                let mut p = vec![fill; PAGE as usize];
                for (at, len, v) in runs {
                    let end = (at + len).min(p.len());
                    p[at..end].fill(v);
                }
                p
            })
    }

    /// An edit of a page: a few bytes changed, or none.
    fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
        proptest::collection::vec((0..4096usize, any::<u8>()), 0..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// A sequence of checkpoints over a small RAM, each writing some pages (new ones or edits
        /// of earlier ones), encoded by one cache and decoded by another: every page decodes to
        /// the bytes it had, whatever the cache's size (evictions included).
        #[test]
        fn pages_encoded_against_the_cache_decode_to_the_same_bytes(
            first in proptest::collection::vec(page(), 1..12),
            rounds in proptest::collection::vec(proptest::collection::vec((0..24u64, edits()), 1..16), 1..8),
            capacity in 1..20usize,
        ) {
            let mut ram: std::collections::HashMap<u64, Vec<u8>> =
                first.into_iter().enumerate().map(|(i, p)| (i as u64, p)).collect();
            let (mut sender, mut receiver) = (PageCache::new(capacity), PageCache::new(capacity));
            let mut checkpoints: Vec<Vec<u64>> = vec![ram.keys().copied().collect()];
            for round in rounds {
                let mut written = Vec::new();
                for (pfn, edit) in round {
                    let p = ram.entry(pfn).or_insert_with(|| vec![pfn as u8; PAGE as usize]);
                    for (at, v) in edit {
                        p[at] = v;
                    }
                    written.push(pfn);
                }
                written.sort_unstable();
                written.dedup();
                checkpoints.push(written);
            }
            for pfns in checkpoints {
                let mut pages = Pages {
                    ram_bytes: 1 << 20,
                    pages: pfns.iter().map(|p| (*p, ram[p].clone())).collect(),
                };
                let codes = sender.encode(&mut pages);
                // Through the log's encoding, as a checkpoint travels.
                let wire: Pages = postcard::from_bytes(&postcard::to_stdvec(&pages).unwrap()).unwrap();
                let decoded = receiver.decode(&wire, &codes).unwrap();
                prop_assert_eq!(decoded.pages.len(), pfns.len());
                for (pfn, data) in &decoded.pages {
                    prop_assert_eq!(data, &ram[pfn]);
                }
                prop_assert_eq!(sender.len(), receiver.len());
            }
        }
    }

    #[test]
    fn an_unchanged_page_costs_no_bytes_and_a_foreign_code_is_refused() {
        let mut cache = PageCache::new(8);
        let mut pages = Pages {
            ram_bytes: 1 << 20,
            pages: vec![(3, vec![7; 4096])],
        };
        assert_eq!(cache.encode(&mut pages), vec![RAW]);
        let mut again = Pages {
            ram_bytes: 1 << 20,
            pages: vec![(3, vec![7; 4096])],
        };
        assert_eq!(cache.encode(&mut again), vec![SAME]);
        assert!(again.pages[0].1.is_empty());
        // A receiver that never saw page 3 refuses the delta rather than guess.
        let err = PageCache::new(8).decode(&again, &[SAME]).unwrap_err();
        assert!(PageCache::new(8).decode(&again, &[]).is_err());
        assert!(err.to_string().contains("page cache"), "{err}");
        assert!(PageCache::new(8).decode(&again, &[SAME, RAW]).is_err());
    }

    #[test]
    fn pages_round_trip_compressed() {
        let mem = crate::memory::create(8 << 20).unwrap();
        mem.write_slice(&[0xab; 100], GuestAddress(0x5000)).unwrap();
        let pages = Pages::full(&mem).unwrap();
        assert_eq!(pages.pages.len(), 1);
        let raw = postcard::to_stdvec(&pages).unwrap();
        let packed = lz4_flex::compress_prepend_size(&raw);
        assert!(
            packed.len() < raw.len() / 4,
            "{} -> {}",
            raw.len(),
            packed.len()
        );
    }

    /// A full snapshot applied over RAM that holds other bytes leaves exactly the snapshot's
    /// RAM: pages that were zero when it was taken are zero after.
    #[test]
    fn full_apply_zeroes_unlisted_pages() {
        let mem = crate::memory::create(8 << 20).unwrap();
        mem.write_slice(&[0xab; 100], GuestAddress(0x5000)).unwrap();
        let pages = Pages::full(&mem).unwrap();
        let before = crate::memory::digest(&mem);
        let other = crate::memory::create(8 << 20).unwrap();
        other
            .write_slice(&[0xcd; 4096], GuestAddress(0x7000))
            .unwrap();
        other
            .write_slice(&[0xcd; 10], GuestAddress(0x5000))
            .unwrap();
        pages.apply(&other, true).unwrap();
        assert_eq!(crate::memory::digest(&other), before);
    }

    #[test]
    fn lz4_claim_beyond_expansion_is_refused() {
        let mut bytes = (64u32 << 20).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let err = Snapshot::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("more than LZ4 can expand to"), "{err}");
    }

    #[test]
    fn hostile_size_prefix_is_refused() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        assert!(matches!(
            Snapshot::decode(&bytes),
            Err(SnapshotError::Decode(_))
        ));
        assert!(Snapshot::decode(&[1, 2]).is_err());
    }
}
