//! Booting a kernel: the 64-bit Linux boot protocol, entered directly in long mode.
//!
//! The layout is docs/PLATFORM.md's: GDT at 0x500, boot_params at 0x7000, page tables at
//! 0x9000-0xefff (identity map of the first 4 GiB), command line at 0x20000, initrd at the top of
//! RAM. The kernel is an uncompressed ELF loaded by linux-loader at its physical addresses: the
//! `--kernel` file, or the ELF inside a bzImage (kernel.rs unpacks it; its decompressor does not
//! run).

use crate::kernel::KernelImage;
use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// The zero page (`struct boot_params`).
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPT_ADDR: u64 = 0xa000;
/// The first of four page directories.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line, terminating NUL included.
pub const CMDLINE_MAX: usize = 2048;
/// Where the kernel may start: 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of low RAM (the EBDA and the BIOS hole follow).
pub const LOW_RAM_END: u64 = 0x9_fc00;

/// Code segment selector at entry (Linux's `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Data segment selector at entry (Linux's `__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// TSS selector.
pub const BOOT_TSS: u16 = 0x20;

/// Errors loading or preparing the boot.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// The `--kernel` path as given.
        path: String,
        /// The open's error.
        source: std::io::Error,
    },
    /// The kernel is a bzImage that cannot be unpacked.
    #[error(transparent)]
    Image(#[from] crate::kernel::KernelError),
    /// linux-loader rejected the kernel.
    #[error("cannot load kernel {path}: {source} (ftvmm boots an ELF kernel, a vmlinux or a test guest, or a bzImage)")]
    LoadKernel {
        /// The `--kernel` path as given.
        path: String,
        /// linux-loader's error (e.g. the file is not an ELF image).
        source: linux_loader::loader::Error,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The `--initrd` path as given.
        path: String,
        /// The read's error.
        source: std::io::Error,
    },
    /// The initrd does not fit in RAM above the kernel.
    #[error("initrd of {size} bytes does not fit in guest RAM above the kernel (kernel ends at {kernel_end:#x}, RAM ends at {ram_end:#x}); give the guest more --memory")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// End of the kernel image.
        kernel_end: u64,
        /// End of RAM.
        ram_end: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing a boot structure into guest RAM failed.
    #[error("cannot write {what} into guest RAM: {source}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// vm-memory's error (the structure's range is outside guest RAM).
        source: vm_memory::GuestMemoryError,
    },
}

/// What the boot left for the vCPU.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// The kernel's entry point (ELF `e_entry`).
    pub entry: u64,
    /// One past the last byte of the kernel image.
    pub kernel_end: u64,
}

/// Loads the kernel and initrd, writes the command line, boot_params, page tables and GDT.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.display().to_string(),
        source,
    })?;
    let start = Some(GuestAddress(HIMEM_START));
    let loaded = match crate::kernel::open(kernel)? {
        KernelImage::Elf => Elf::load(mem, None, &mut file, start),
        KernelImage::BzImage(bz) => Elf::load(mem, None, &mut std::io::Cursor::new(&bz.elf), start),
    }
    .map_err(|source| BootError::LoadKernel {
        path: kernel.display().to_string(),
        source,
    })?;
    let entry = loaded.kernel_load.0;
    let kernel_end = loaded.kernel_end;
    let ram_end = mem.last_addr().0 + 1;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x100_0000;

    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootError::Write {
            what: "the command line",
            source,
        })?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;

    if let Some(path) = initrd {
        let mut data = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|source| BootError::ReadInitrd {
                path: path.display().to_string(),
                source,
            })?;
        let size = data.len() as u64;
        let addr = ram_end.checked_sub(size).map(|a| a & !0xfff);
        let addr = match addr {
            Some(a) if a >= kernel_end => a,
            _ => {
                return Err(BootError::InitrdTooLarge {
                    size,
                    kernel_end,
                    ram_end,
                })
            }
        };
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|source| BootError::Write {
                what: "the initrd",
                source,
            })?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = [
        (0, LOW_RAM_END, 1u32),
        (LOW_RAM_END, HIMEM_START - LOW_RAM_END, 2),
        (HIMEM_START, ram_end - HIMEM_START, 1),
    ];
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(BOOT_PARAMS_ADDR))
        .map_err(|source| BootError::Write {
            what: "boot_params",
            source,
        })?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(BootInfo { entry, kernel_end })
}

/// Identity map of 0..4 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..4] -> 4 PDs.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |what, v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|source| BootError::Write { what, source })
    };
    w("the PML4", PDPT_ADDR | 0x3, PML4_ADDR)?;
    for i in 0..4u64 {
        w("the PDPT", (PD_ADDR + i * 0x1000) | 0x3, PDPT_ADDR + i * 8)?;
    }
    for i in 0..(4 * 512u64) {
        // present, writable, 2 MiB page
        w("a page directory", (i << 21) | 0x83, PD_ADDR + i * 8)?;
    }
    Ok(())
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot GDT: null, null, code (0x10), data (0x18), TSS (0x20).
const GDT: [(u16, u32, u32); 5] = [
    (0, 0, 0),
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
];

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, (flags, base, limit)) in GDT.iter().enumerate() {
        mem.write_obj(
            gdt_entry(*flags, *base, *limit),
            GuestAddress(GDT_ADDR + 8 * i as u64),
        )
        .map_err(|source| BootError::Write {
            what: "the GDT",
            source,
        })?;
    }
    Ok(())
}

fn segment(index: usize, selector: u16) -> kvm_segment {
    let (flags, base, limit) = GDT[index];
    kvm_segment {
        base: u64::from(base),
        limit: if flags & 0x8000 != 0 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// CR0: PE, MP, ET, NE, WP, PG.
pub const BOOT_CR0: u64 = 0x8001_0033;
/// CR4: PAE.
pub const BOOT_CR4: u64 = 0x20;
/// EFER: LME, LMA.
pub const BOOT_EFER: u64 = 0x500;

/// The special registers at entry: long mode, paging, the boot GDT's segments.
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(2, BOOT_CS);
    let data = segment(3, BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(4, BOOT_TSS);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = BOOT_CR0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = BOOT_CR4;
    sregs.efer = BOOT_EFER;
    sregs
}

/// The general registers at entry.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: BOOT_PARAMS_ADDR,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    }
}

/// The FPU at entry: the x87 and SSE control words of a reset CPU.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_linux_boot_gdt() {
        // Values from Linux's arch/x86/boot/pm.c and Firecracker's gdt.rs.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let cs = segment(2, BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.type_, cs.dpl, cs.g), (1, 0, 0xb, 0, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn boot_writes_structures() {
        let mem = crate::memory::create(64 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
    }
}
