//! Guest RAM: one vm-memory region at guest physical 0, registered as KVM memory slot 0.
//!
//! The region carries an `AtomicBitmap`, so every write the VMM makes through vm-memory (device
//! DMA, boot structures) is recorded; the KVM dirty log records the guest's own writes. Together
//! they are what an incremental checkpoint copies.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use devices::GuestMemoryMmap;

/// Errors setting up guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Cannot allocate guest RAM.
    #[error("cannot allocate {size} bytes of guest RAM: {reason}")]
    Allocate {
        /// Requested size, in bytes.
        size: u64,
        /// What failed: the size does not fit in this host's address space, or the mapping or
        /// its madvise failed (the system's error).
        reason: String,
    },
    /// KVM refused the memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    SetRegion(#[source] kvm_ioctls::Error),
}

/// Allocates `size` bytes of guest RAM at guest physical 0.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::Allocate {
        size,
        reason: "too large for this host".into(),
    })?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).map_err(|e| {
        MemoryError::Allocate {
            size,
            reason: e.to_string(),
        }
    })?;
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Allocate {
                size,
                reason: e.to_string(),
            })?;
        // Not inherited by a child process (QEMU does the same for guest RAM): a helper the VMM
        // spawns does not copy the page tables of guest RAM. It also keeps guest RAM a mapping
        // of its own: without the flag the kernel merged it with an adjacent anonymous mapping
        // of the heap (measured: 256 MiB + 132 KiB), and the footprint reported from
        // /proc/self/smaps (`Vm::memory_stats`) counted guest RAM as the VMM's.
        // SAFETY: madvise(2) on the mapping vm-memory just created, whole; MADV_DONTFORK only
        // changes what fork(2) copies.
        let ret = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTFORK) };
        if ret != 0 {
            return Err(MemoryError::Allocate {
                size,
                reason: format!(
                    "madvise(MADV_DONTFORK): {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
    }
    Ok(mem)
}

/// Registers every region of `mem` with KVM, slot by slot, with dirty-page logging if asked.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, dirty_log: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Allocate {
                size: region.len(),
                reason: e.to_string(),
            })?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the VM keeps alive for as long
        // as the VM fd exists (both live in `Vm`, and `mem` is dropped after the vCPU and VM
        // fds); the range is exactly the region's.
        unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::SetRegion)?;
    }
    Ok(())
}

/// Makes KVM forget every translation it cached for guest RAM, by deleting and re-adding each
/// memory slot. Needed after the VMM itself rewrote guest pages (a restore): with shadow paging
/// (the nested KVM of this project's hosts) KVM only notices page-table changes made by the
/// guest, so rewritten page tables would otherwise stay shadowed with their old contents.
pub fn reload(vm: &VmFd, mem: &GuestMemoryMmap, dirty_log: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a memory_size of 0 deletes the slot; no host memory is named.
        unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::SetRegion)?;
    }
    register(vm, mem, dirty_log)
}

/// Forgets the VMM's writes recorded so far in the regions' dirty bitmaps.
pub fn reset_vmm_dirty(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        vm_memory::MmapRegion::bitmap(region).reset();
    }
}

/// Zeroes all of guest RAM, by giving its pages back to the host kernel (an anonymous private
/// mapping reads as zeros afterwards), so that untouched RAM costs nothing.
pub fn zero(mem: &GuestMemoryMmap) -> std::io::Result<()> {
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: the range is exactly one live anonymous private mapping owned by `mem`;
        // MADV_DONTNEED on it only replaces its contents with zero-fill-on-demand pages, which
        // is what the caller asks for. No Rust reference into guest RAM is held across this.
        let ret = unsafe {
            libc::madvise(
                host.cast::<libc::c_void>(),
                region.len() as usize,
                libc::MADV_DONTNEED,
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The VMM "wrote" every page: an incremental checkpoint after this must include them.
        vm_memory::bitmap::Bitmap::mark_dirty(
            vm_memory::MmapRegion::bitmap(region),
            0,
            region.len() as usize,
        );
    }
    Ok(())
}

/// A digest of all of guest RAM (CRC32C over every page, folded in order with FNV-1a): equal
/// digests mean equal RAM, for tests and for comparing a primary with its backup.
pub fn digest(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{Bytes, GuestAddress};
    let size = mem.last_addr().0 + 1;
    let mut page = vec![0u8; 4096];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut addr = 0;
    while addr < size {
        let n = (size - addr).min(4096) as usize;
        if mem.read_slice(&mut page[..n], GuestAddress(addr)).is_err() {
            break;
        }
        for b in crc32c::crc32c(&page[..n]).to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        addr += n as u64;
    }
    h
}

/// Gives the heap's free memory back to the system: a restore decodes a whole snapshot (one
/// allocation per page) and frees it, and glibc would otherwise keep those pages resident, as
/// much again as the guest's used RAM on top of it (measured: ~20 MiB after restoring the Linux
/// guest at its prompt).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim(3) only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
