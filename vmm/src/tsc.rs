//! The guest kernel's `RDTSC` at its entropy sites: made deterministic and logged.
//!
//! # Why
//!
//! Linux 6.1 on x86-64 reads the time-stamp counter for entropy: `random_get_entropy()` is
//! `rdtsc()` whenever the kernel is built with `CONFIG_X86_TSC` (always, on x86-64), whatever
//! the CPU flags say, so neither `notsc` nor `clearcpuid=tsc` stops it. `drivers/char/random.c`
//! inlines it in `add_interrupt_randomness()`, which runs on every interrupt, and in the
//! functions that feed and key the CRNG. KVM runs `RDTSC` without a VM exit (this project's
//! nested KVM emulates it at CPL0 with the host's counter; hardware KVM lets it run on the
//! CPU), and offers user space neither RDTSC exiting nor, here, TSC control. So the value is a
//! non-deterministic input that never crosses the determinism boundary: a replay or a backup
//! took the same exits as its recording, yet its RAM differed in the per-CPU `irq_randomness`
//! pool (measured), and every later mix into the input pool or reseed of the CRNG would carry
//! the difference on into everything the guest draws from `get_random_bytes()`.
//!
//! # What
//!
//! At VM setup [`find_sites`] reads the kernel ELF's symbol table, disassembles the functions
//! of [`ENTROPY_FUNCTIONS`] and collects the addresses of their `RDTSC`/`RDTSCP`
//! instructions. The first ones, in that order, get hardware execute breakpoints, as many as
//! [`DebugRegs`](crate::debugregs::DebugRegs) has slots free; the log says (info) which sites
//! are covered and which are not. When a breakpoint fires the VMM completes the instruction
//! itself ([`GuestTsc::complete`]): it reads the virtual clock through the boundary
//! ([`ft_core::Boundary::read_clock`]: a recorder logs it, a replayer serves it from the log),
//! sets EDX:EAX, advances RIP past the instruction and reports a synchronous
//! [`ExitKind::Debug`] exit with code [`DEBUG_RDTSC`] and the value as its data, so record
//! and replay meet it at the same position and check the value.
//!
//! **The value** is the platform's virtual time in nanoseconds after that read: a TSC of a
//! nominal 1 GHz that is 0 at boot and never goes back, across snapshots and restores too
//! (virtual time is part of the platform state). `RDTSCP` also loads ECX with `IA32_TSC_AUX`.
//!
//! The breakpoint is on the instruction itself and the VMM completes it, so the instruction
//! never runs in the guest: there is nothing to step over (no RF, no single step).
//!
//! `random_init()` reads the TSC once in a boot, in `start_kernel()`, before interrupts are
//! first enabled. Its site borrows the debug register of `add_interrupt_randomness` while the
//! kernel's `early_boot_irqs_disabled` is set ([`BOOT_FUNCTION`], [`BOOT_FLAG`]): no interrupt
//! handler can run then. With it a whole Linux boot and workload replay to the same RAM, page
//! for page (measured on the virtual clock, no checkpoints: a boot with the `counter` workload,
//! both runs on one host CPU; with `--guest-tsc off` 64 pages differed).
//!
//! This is not a workaround for this project's nested KVM: hardware KVM has the same gap, so
//! it is on whenever the kernel has a symbol table (`--guest-tsc off` turns it off). It needs
//! no saved state: the sites come from the kernel file when the VM is built, which one holds
//! the shared register follows from guest memory, and
//! [`crate::vcpu::Vcpu::reapply_debug`] re-arms them after a restore.
//!
//! Not covered: `RDTSC` elsewhere in the kernel (measured: with the deterministic profile none
//! of the kernel's other `RDTSC` sites runs in a boot and the `counter` workload), sites beyond
//! the free debug registers, and guest user space (breakpoints do not fire at CPL3 on this
//! KVM).

use crate::compat;
use crate::config::GuestTscMode;
use crate::kernel::{kallsyms, BzImage, KernelImage};
use crate::memory::GuestMemoryMmap;
use ft_core::{BoundaryError, ExitKind, SyncExit};
use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

/// The `Debug` exit code (in [`SyncExit::addr`]) of a completed `RDTSC`/`RDTSCP`; the
/// SYSCALL completion uses 1..3 ([`crate::compat`]).
pub const DEBUG_RDTSC: u64 = 4;

/// The guest kernel functions whose `RDTSC` the VMM completes, in the order they get debug
/// registers, by how often a Linux 6.1 guest runs them (counted on the project's guest, boot
/// and the `counter` workload, 2026-11-30):
///
/// 1. `add_interrupt_randomness`: every interrupt (~100/s idle).
/// 2. `extract_entropy`: its output keys the CRNG; four reads per call, at every
///    `get_random_bytes()` until the input pool has 128 bits credited (340 reads in a boot),
///    then at every reseed.
/// 3. `add_device_randomness`: every `fork()` (`kernel_clone`) and every exit (`release_task`),
///    and every initcall at boot (~20/s under `counter`).
/// 4. `add_timer_randomness`: input and disk events (none on this platform: virtio-blk does not
///    add randomness by default, and there are no input devices).
/// 5. `try_to_generate_entropy`: a caller blocking for entropy before the CRNG is ready.
///
/// A symbol matches its name or its name with a compiler suffix
/// (`extract_entropy.constprop.0`, `add_timer_randomness.cold`).
pub const ENTROPY_FUNCTIONS: &[&str] = &[
    "add_interrupt_randomness",
    "extract_entropy",
    "add_device_randomness",
    "add_timer_randomness",
    "try_to_generate_entropy",
];

/// The boot-time function whose `RDTSC` shares the debug register of the first
/// `add_interrupt_randomness` site while [`BOOT_FLAG`] is set: `random_init()` samples the TSC
/// once, in `start_kernel()`, before interrupts are first enabled.
pub const BOOT_FUNCTION: &str = "random_init";

/// The kernel variable that says interrupts have not been enabled yet in this boot:
/// `start_kernel()` sets it first thing and clears it right before its first
/// `local_irq_enable()`, so no `add_interrupt_randomness()` can run while it is set. The VMM
/// reads it (a byte of guest RAM) at every synchronous exit, at checkpoints and after a
/// restore, at the guest-physical address its ELF segment was loaded to: the VMM boots the
/// `vmlinux` itself, with no decompressor to relocate it, so the kernel runs where it is linked.
pub const BOOT_FLAG: &str = "early_boot_irqs_disabled";

const RDTSC: [u8; 2] = [0x0f, 0x31];
const RDTSCP: [u8; 3] = [0x0f, 0x01, 0xf9];
const HLT: u8 = 0xf4;
const NOP: u8 = 0x90;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const RFLAGS_RF: u64 = 1 << 16;

/// Errors of the guest TSC sites.
#[derive(Debug, Error)]
pub enum TscError {
    /// The kernel file cannot be read.
    #[error("cannot read the kernel {path}: {source}")]
    Io {
        /// The `--kernel` file as given.
        path: String,
        /// The read's error.
        source: std::io::Error,
    },
    /// The kernel file is not an ELF64 x86-64 image the site finder understands.
    #[error("{0}")]
    Elf(String),
    /// The kernel has no symbol table (a stripped vmlinux).
    #[error("the kernel has no symbol table")]
    NoSymbols,
    /// The kernel has no symbol table and no kallsyms table ftvmm can read.
    #[error("the kernel has no symbol table, and {0}")]
    NoKallsyms(String),
    /// A breakpoint fired on a site whose bytes are not the instruction found at setup.
    #[error("guest TSC site {rip:#x} ({function}) holds {bytes}, not RDTSC: the running kernel is not the --kernel file?")]
    NotRdtsc {
        /// The site's guest virtual address.
        rip: u64,
        /// Its function.
        function: String,
        /// What the guest has there, hex.
        bytes: String,
    },
    /// The instruction's bytes could not be read from guest memory.
    #[error("cannot read the guest TSC site {rip:#x}: {why}")]
    GuestMemory {
        /// The site's guest virtual address.
        rip: u64,
        /// What failed: an unmapped page, or an address outside RAM.
        why: String,
    },
    /// A vCPU register or MSR ioctl failed while completing a TSC read.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl's name, e.g. `KVM_GET_REGS`.
        what: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Reading the virtual clock failed (in replay: a divergence).
    #[error(transparent)]
    Boundary(#[from] BoundaryError),
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, TscError> {
    r.map_err(|source| TscError::Kvm { what, source })
}

/// One `RDTSC` or `RDTSCP` in the guest kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// The function it is in (the symbol's name, with any compiler suffix).
    pub function: String,
    /// The function's address.
    pub function_addr: u64,
    /// The instruction's address.
    pub rip: u64,
    /// `RDTSCP` rather than `RDTSC`.
    pub rdtscp: bool,
    /// Where the instruction is in guest-physical memory (the kernel runs where it is
    /// linked: the VMM loads each segment at its `p_paddr`), if a loadable segment holds it.
    pub gpa: Option<u64>,
}

impl Site {
    /// The instruction's bytes.
    fn opcode(&self) -> &'static [u8] {
        if self.rdtscp {
            &RDTSCP
        } else {
            &RDTSC
        }
    }
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}+{:#x} ({:#x}{})",
            self.function,
            self.rip - self.function_addr,
            self.rip,
            if self.rdtscp { ", rdtscp" } else { "" }
        )
    }
}

/// The little-endian integer of `N` bytes at `at` in `b`.
fn le<const N: usize>(b: &[u8], at: usize) -> Result<u64, TscError> {
    let bytes = b
        .get(at..at + N)
        .ok_or_else(|| TscError::Elf(format!("ELF structure truncated at byte {at}")))?;
    let mut buf = [0u8; 8];
    buf[..N].copy_from_slice(bytes);
    Ok(u64::from_le_bytes(buf))
}

/// A section header, the fields the finder uses.
struct Section {
    kind: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
}

/// A loadable segment: where its bytes go in guest-physical memory (the VMM loads each at its
/// `p_paddr`, boot.rs).
struct Segment {
    vaddr: u64,
    paddr: u64,
    memsz: u64,
}

const SHT_SYMTAB: u32 = 2;
const SHF_ALLOC: u64 = 2;
const SHF_EXECINSTR: u64 = 4;
const PT_LOAD: u64 = 1;
const STT_OBJECT: u8 = 1;
const STT_FUNC: u8 = 2;
const SYM_SIZE: usize = 24;
/// Larger tables or functions than this are not a kernel this finder was written for.
const MAX_TABLE: u64 = 256 << 20;
const MAX_FUNCTION: u64 = 64 << 10;
/// The largest ELF file read whole for its kallsyms table.
const MAX_IMAGE: u64 = 512 << 20;

/// The parts of a kernel ELF file the finder reads: section headers, loadable segments and the
/// symbol table (the ELF's own, or for an image without one, its kallsyms table).
pub(crate) struct Kernel {
    source: Source,
    path: String,
    sections: Vec<Section>,
    segments: Vec<Segment>,
    symbols: Symbols,
}

/// Where the ELF's bytes are.
enum Source {
    /// The `--kernel` file (an ELF).
    File(File),
    /// The ELF unpacked from a bzImage.
    Unpacked(Arc<BzImage>),
}

/// Where the symbols come from.
enum Symbols {
    /// The symbol table, raw (24-byte `Elf64_Sym`s), and its string table.
    Elf { syms: Vec<u8>, names: Vec<u8> },
    /// The kernel's kallsyms table, with each symbol's section and size (to the next symbol's
    /// address: kallsyms has no sizes).
    Kallsyms {
        table: Arc<kallsyms::Table>,
        placed: Vec<(usize, u64)>,
    },
}
/// One symbol: name, type, section, value, size.
struct Symbol<'a> {
    name: &'a str,
    kind: u8,
    shndx: usize,
    value: u64,
    size: u64,
}

impl Kernel {
    pub(crate) fn open(path: &Path) -> Result<Kernel, TscError> {
        Self::open_with(path, false)
    }

    /// Opens `path` (an ELF, or a bzImage unpacked); with `kallsyms`, the symbols come from the
    /// kernel's kallsyms table even where the ELF has a symbol table (the tests compare both).
    pub(crate) fn open_with(path: &Path, kallsyms: bool) -> Result<Kernel, TscError> {
        let source = match crate::kernel::open(path).map_err(|e| TscError::Elf(e.to_string()))? {
            KernelImage::Elf => Source::File(File::open(path).map_err(|source| TscError::Io {
                path: path.display().to_string(),
                source,
            })?),
            KernelImage::BzImage(bz) => Source::Unpacked(bz),
        };
        let mut k = Kernel {
            source,
            path: path.display().to_string(),
            sections: Vec::new(),
            segments: Vec::new(),
            symbols: Symbols::Elf {
                syms: Vec::new(),
                names: Vec::new(),
            },
        };
        let ehdr = k.read(0, 64)?;
        if ehdr[..4] != *b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 || le::<2>(&ehdr, 18)? != 62 {
            return Err(TscError::Elf(
                "not a little-endian ELF64 x86-64 file".into(),
            ));
        }
        let (phoff, phentsize, phnum) = (
            le::<8>(&ehdr, 0x20)?,
            le::<2>(&ehdr, 0x36)?,
            le::<2>(&ehdr, 0x38)?,
        );
        if phnum > 0 && phentsize >= 56 {
            let table = k.read(phoff, phentsize * phnum)?;
            for h in table.chunks_exact(phentsize as usize) {
                if le::<4>(h, 0)? == PT_LOAD {
                    k.segments.push(Segment {
                        vaddr: le::<8>(h, 16)?,
                        paddr: le::<8>(h, 24)?,
                        memsz: le::<8>(h, 40)?,
                    });
                }
            }
        }
        let (shoff, shentsize, shnum) = (
            le::<8>(&ehdr, 0x28)?,
            le::<2>(&ehdr, 0x3a)?,
            le::<2>(&ehdr, 0x3c)?,
        );
        if shnum == 0 {
            return k.with_kallsyms(kallsyms);
        }
        if shentsize < 64 {
            return Err(TscError::Elf(format!(
                "section headers of {shentsize} bytes"
            )));
        }
        let table = k.read(shoff, shentsize * shnum)?;
        for h in table.chunks_exact(shentsize as usize) {
            k.sections.push(Section {
                kind: le::<4>(h, 4)? as u32,
                flags: le::<8>(h, 8)?,
                addr: le::<8>(h, 16)?,
                offset: le::<8>(h, 24)?,
                size: le::<8>(h, 32)?,
                link: le::<4>(h, 40)? as u32,
            });
        }
        let Some(symtab) = k.sections.iter().find(|s| s.kind == SHT_SYMTAB) else {
            return k.with_kallsyms(true);
        };
        if kallsyms {
            return k.with_kallsyms(true);
        }
        let strtab = k
            .sections
            .get(symtab.link as usize)
            .ok_or_else(|| TscError::Elf("the symbol table's string table is missing".into()))?;
        let (so, ss, no, ns) = (symtab.offset, symtab.size, strtab.offset, strtab.size);
        k.symbols = Symbols::Elf {
            syms: k.read(so, ss)?,
            names: k.read(no, ns)?,
        };
        Ok(k)
    }

    /// The symbols from the kernel's kallsyms table (`wanted`), or none: an unpacked bzImage's
    /// table, or one found in an ELF file without a symbol table.
    fn with_kallsyms(mut self, wanted: bool) -> Result<Kernel, TscError> {
        if !wanted {
            return Err(TscError::NoSymbols);
        }
        let table = match &self.source {
            Source::Unpacked(bz) => bz.kallsyms(),
            Source::File(f) => {
                let mut elf = Vec::new();
                f.take(MAX_IMAGE)
                    .read_to_end(&mut elf)
                    .map_err(|source| TscError::Io {
                        path: self.path.clone(),
                        source,
                    })?;
                kallsyms::Table::find(&elf).map(Arc::new)
            }
        }
        .map_err(|e| TscError::NoKallsyms(e.to_string()))?;
        let mut placed = Vec::with_capacity(table.symbols.len());
        for (i, sym) in table.symbols.iter().enumerate() {
            let shndx = self
                .sections
                .iter()
                .position(|s| {
                    s.flags & SHF_ALLOC != 0 && sym.addr >= s.addr && sym.addr < s.addr + s.size
                })
                .unwrap_or(0);
            let next = table.symbols[i + 1..]
                .iter()
                .map(|n| n.addr)
                .find(|&a| a > sym.addr);
            let end = self
                .sections
                .get(shndx)
                .map_or(sym.addr, |s| s.addr + s.size);
            let size = next.unwrap_or(end).min(end).saturating_sub(sym.addr);
            placed.push((shndx, size));
        }
        self.symbols = Symbols::Kallsyms { table, placed };
        Ok(self)
    }

    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, TscError> {
        if len > MAX_TABLE {
            return Err(TscError::Elf(format!(
                "a table of {len} bytes at offset {offset:#x}: too large"
            )));
        }
        match &self.source {
            Source::File(file) => {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|source| TscError::Io {
                        path: self.path.clone(),
                        source,
                    })?;
                Ok(buf)
            }
            Source::Unpacked(bz) => usize::try_from(offset)
                .ok()
                .and_then(|at| bz.elf.get(at..at.checked_add(len as usize)?))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| {
                    TscError::Elf(format!(
                        "{len} bytes at offset {offset:#x}: past the end of the unpacked kernel ({} bytes)",
                        bz.elf.len()
                    ))
                }),
        }
    }

    fn symbols(&self) -> Box<dyn Iterator<Item = Symbol<'_>> + '_> {
        match &self.symbols {
            Symbols::Elf { syms, names } => {
                Box::new(syms.chunks_exact(SYM_SIZE).filter_map(|sym| {
                    let name_at = le::<4>(sym, 0).ok()? as usize;
                    let tail = names.get(name_at..)?;
                    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
                    Some(Symbol {
                        name: std::str::from_utf8(&tail[..end]).ok()?,
                        kind: sym[4] & 0xf,
                        shndx: le::<2>(sym, 6).ok()? as usize,
                        value: le::<8>(sym, 8).ok()?,
                        size: le::<8>(sym, 16).ok()?,
                    })
                }))
            }
            Symbols::Kallsyms { table, placed } => Box::new(table.symbols.iter().zip(placed).map(
                |(sym, &(shndx, size))| Symbol {
                    name: &sym.name,
                    kind: if matches!(sym.kind, 'T' | 't' | 'W' | 'w') {
                        STT_FUNC
                    } else {
                        STT_OBJECT
                    },
                    shndx,
                    value: sym.addr,
                    size,
                },
            )),
        }
    }

    /// The `RDTSC`/`RDTSCP` sites of `functions`, in that order, each function's in address
    /// order.
    fn sites(&self, functions: &[&str]) -> Result<Vec<Site>, TscError> {
        // (priority, function address, size, section, name) of every matching function symbol.
        let mut found: Vec<(usize, u64, u64, usize, String)> = self
            .symbols()
            .filter(|s| s.kind == STT_FUNC)
            .filter_map(|s| {
                let priority = functions.iter().position(|f| symbol_matches(s.name, f))?;
                Some((priority, s.value, s.size, s.shndx, s.name.to_string()))
            })
            .collect();
        found.sort();
        found.dedup_by_key(|f| f.1);
        let mut sites = Vec::new();
        for (_, addr, size, shndx, name) in found {
            let Some(sec) = self.sections.get(shndx) else {
                continue;
            };
            let inside = addr >= sec.addr && addr.saturating_add(size) <= sec.addr + sec.size;
            if sec.flags & SHF_EXECINSTR == 0 || !inside || size == 0 || size > MAX_FUNCTION {
                continue;
            }
            let code = self.read(sec.offset + (addr - sec.addr), size)?;
            let mut decoder = Decoder::with_ip(64, &code, addr, DecoderOptions::NONE);
            for instr in &mut decoder {
                let rdtscp = match instr.mnemonic() {
                    Mnemonic::Rdtsc => false,
                    Mnemonic::Rdtscp => true,
                    _ => continue,
                };
                sites.push(Site {
                    function: name.clone(),
                    function_addr: addr,
                    rip: instr.ip(),
                    rdtscp,
                    gpa: self.gpa_of(instr.ip()),
                });
            }
        }
        Ok(sites)
    }

    /// The guest-physical address a variable is loaded at, if the kernel has it.
    fn variable_gpa(&self, name: &str) -> Option<u64> {
        let sym = self
            .symbols()
            .find(|s| s.name == name && s.kind != STT_FUNC)?;
        self.gpa_of(sym.value)
    }

    /// The guest-physical address the byte at kernel address `vaddr` is loaded at.
    fn gpa_of(&self, vaddr: u64) -> Option<u64> {
        let seg = self
            .segments
            .iter()
            .find(|g| vaddr >= g.vaddr && vaddr < g.vaddr.saturating_add(g.memsz))?;
        Some(vaddr - seg.vaddr + seg.paddr)
    }

    /// The first bytes (at most `len`) of function `name` (exact name) and its address.
    pub(crate) fn function_code(
        &self,
        name: &str,
        len: u64,
    ) -> Result<Option<(u64, Vec<u8>)>, TscError> {
        let Some(sym) = self
            .symbols()
            .find(|s| s.kind == STT_FUNC && s.name == name)
        else {
            return Ok(None);
        };
        let Some(sec) = self.sections.get(sym.shndx) else {
            return Ok(None);
        };
        let len = len
            .min(sym.size)
            .min((sec.addr + sec.size).saturating_sub(sym.value));
        if sec.flags & SHF_EXECINSTR == 0 || sym.value < sec.addr || len == 0 {
            return Ok(None);
        }
        let code = self.read(sec.offset + (sym.value - sec.addr), len)?;
        Ok(Some((sym.value, code)))
    }
}

/// Whether symbol `name` is function `want`, or a part of it the compiler split off or
/// specialized (`want.cold`, `want.constprop.0`, `want.isra.0`, ...).
fn symbol_matches(name: &str, want: &str) -> bool {
    name.strip_prefix(want)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// The `RDTSC`/`RDTSCP` sites of `functions` in the ELF kernel at `path`, in the order of
/// `functions`, each function's in address order.
pub fn find_sites(path: &Path, functions: &[&str]) -> Result<Vec<Site>, TscError> {
    Kernel::open(path)?.sites(functions)
}

/// [`BOOT_FUNCTION`]'s site, the slot it borrows, and where [`BOOT_FLAG`] is in guest RAM.
#[derive(Debug)]
struct BootSite {
    site: Site,
    slot: usize,
    flag_gpa: u64,
}

/// The guest TSC sites of this VM and what completing them cost.
#[derive(Debug, Default)]
pub struct GuestTsc {
    /// The sites with a breakpoint, in slot order.
    covered: Vec<Site>,
    /// The boot site, when the kernel has it, the flag, and `add_interrupt_randomness`.
    boot: Option<BootSite>,
    /// [`BOOT_FLAG`] was set when the VMM last looked: the boot site has its slot.
    booting: bool,
    /// Sites whose bytes in guest memory were checked at their first hit (kernel text does
    /// not change under them; checking every hit cost a `KVM_GET_SREGS`, a quarter of the
    /// VMM's time per completion here).
    checked: Vec<u64>,
    /// With `--guest-tsc patch`: every site, its instruction replaced in guest RAM by `HLT`
    /// and `NOP`s ([`GuestTsc::patch`]); no debug register is used.
    patched: Vec<Site>,
    /// `RDTSC`s completed.
    pub reads: u64,
    /// Time the VMM spent completing them, in nanoseconds, the clock read through the
    /// boundary left out (measurement only).
    pub vmm_ns: u64,
}

impl GuestTsc {
    /// Finds the sites in `kernel` and keeps the first `slots` of them, the [`BOOT_FUNCTION`]'s
    /// sharing the first `add_interrupt_randomness` one's. Logs (info) what is covered and
    /// what is not; a kernel without symbols or of another format gets no sites.
    pub fn setup(mode: GuestTscMode, kernel: &Path, slots: usize) -> GuestTsc {
        if mode == GuestTscMode::Off {
            tracing::info!("guest TSC: --guest-tsc off: the kernel's RDTSC runs unobserved");
            return GuestTsc::default();
        }
        if mode == GuestTscMode::Patch {
            let mut functions = ENTROPY_FUNCTIONS.to_vec();
            functions.push(BOOT_FUNCTION);
            return match find_sites(kernel, &functions) {
                Ok(sites) => {
                    let sites: Vec<Site> = sites.into_iter().filter(|s| s.gpa.is_some()).collect();
                    tracing::info!(
                        "guest TSC: {} RDTSC sites patched to HLT: {}",
                        sites.len(),
                        sites
                            .iter()
                            .map(Site::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    GuestTsc {
                        patched: sites,
                        ..Default::default()
                    }
                }
                Err(e) => {
                    tracing::info!("guest TSC: no sites ({e}): the kernel's RDTSC runs unobserved");
                    GuestTsc::default()
                }
            };
        }
        let found = Kernel::open(kernel).and_then(|k| {
            let mut functions = ENTROPY_FUNCTIONS.to_vec();
            functions.push(BOOT_FUNCTION);
            Ok((k.sites(&functions)?, k.variable_gpa(BOOT_FLAG)))
        });
        let (all, flag_gpa) = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::info!(
                    "guest TSC: no breakpoints ({e}): the kernel's RDTSC runs unobserved"
                );
                return GuestTsc::default();
            }
        };
        let (mut boot, mut sites): (Vec<Site>, Vec<Site>) = all
            .into_iter()
            .partition(|s| symbol_matches(&s.function, BOOT_FUNCTION));
        let mut uncovered = sites.split_off(slots.min(sites.len()));
        let interrupt_slot = sites
            .iter()
            .position(|s| symbol_matches(&s.function, ENTROPY_FUNCTIONS[0]));
        let boot = match (interrupt_slot, flag_gpa, boot.is_empty()) {
            (Some(slot), Some(flag_gpa), false) => {
                uncovered.extend(boot.split_off(1));
                boot.pop().map(|site| BootSite {
                    site,
                    slot,
                    flag_gpa,
                })
            }
            _ => {
                uncovered.append(&mut boot);
                None
            }
        };
        let list = |s: &[Site]| s.iter().map(Site::to_string).collect::<Vec<_>>().join(", ");
        if sites.is_empty() {
            tracing::info!(
                "guest TSC: the kernel has none of the entropy functions {ENTROPY_FUNCTIONS:?}"
            );
        } else {
            let shared = match &boot {
                Some(b) => format!(
                    "; {} in the register of {} while {BOOT_FLAG} is set",
                    b.site, sites[b.slot]
                ),
                None => String::new(),
            };
            tracing::info!(
                "guest TSC: breakpoints on {} RDTSC sites: {}{shared}",
                sites.len(),
                list(&sites)
            );
        }
        if !uncovered.is_empty() {
            tracing::info!(
                "guest TSC: not covered (no free debug register): {}",
                list(&uncovered)
            );
        }
        GuestTsc {
            covered: sites,
            boot,
            ..Default::default()
        }
    }

    /// The sites armed now, in slot order.
    fn armed(&self) -> impl Iterator<Item = &Site> {
        let swap = self.boot.as_ref().filter(|_| self.booting);
        self.covered
            .iter()
            .enumerate()
            .map(move |(i, s)| match swap {
                Some(b) if b.slot == i => &b.site,
                _ => s,
            })
    }

    /// The addresses to break on now, in slot order.
    pub fn addresses(&self) -> Vec<u64> {
        self.armed().map(|s| s.rip).collect()
    }

    /// Follows the guest kernel's [`BOOT_FLAG`] (at every synchronous exit, and after a
    /// restore): the boot site has its borrowed slot while the flag is set. Returns whether
    /// the addresses to break on changed.
    pub fn follow(&mut self, mem: &GuestMemoryMmap) -> bool {
        let Some(boot) = &self.boot else {
            return false;
        };
        let booting = mem
            .read_obj::<u8>(GuestAddress(boot.flag_gpa))
            .is_ok_and(|v| v != 0);
        if booting == self.booting {
            return false;
        }
        self.booting = booting;
        tracing::debug!(
            "guest TSC: {BOOT_FLAG} {}: breakpoints {:x?}",
            if booting { "set" } else { "clear" },
            self.addresses()
        );
        true
    }

    /// `--guest-tsc patch`: writes `HLT` (then `NOP`s) over each site's instruction in guest
    /// RAM, where it is still the original instruction (after the kernel is loaded, and after
    /// a restore, which may bring back unpatched text). A site whose bytes are neither is
    /// dropped with a warning. `HLT` exits to the VMM on every KVM without an in-kernel
    /// irqchip, whatever the guest's IF, so no debug register is needed; the exit is completed
    /// like a breakpoint's ([`GuestTsc::complete_hlt`]).
    ///
    /// [`BOOT_FUNCTION`] is init text, which the kernel frees after boot and reuses: its site
    /// is patched only when the kernel is loaded (`boot`), never over whatever a restored
    /// snapshot holds there.
    pub fn patch(&mut self, mem: &GuestMemoryMmap, boot: bool) {
        self.patched.retain(|site| {
            let Some(gpa) = site.gpa else { return false };
            if !boot && symbol_matches(&site.function, BOOT_FUNCTION) {
                return true;
            }
            let opcode = site.opcode();
            let mut bytes = [0u8; 3];
            let bytes = &mut bytes[..opcode.len()];
            if mem.read_slice(bytes, GuestAddress(gpa)).is_err() {
                return false;
            }
            let mut hlt = [HLT, NOP, NOP];
            let hlt = &mut hlt[..opcode.len()];
            if bytes == hlt {
                return true;
            }
            if bytes != opcode {
                // Init text the kernel freed after boot (a snapshot taken later) is poisoned.
                tracing::debug!("guest TSC: {site} holds {bytes:02x?}, not RDTSC: left alone");
                return false;
            }
            mem.write_slice(hlt, GuestAddress(gpa)).is_ok()
        });
    }

    /// Whether a `HLT` exit with RIP `rip_after` is a patched site's (RIP is past the `HLT`).
    pub fn is_patched_hlt(&self, rip_after: u64) -> bool {
        self.patched
            .iter()
            .any(|s| s.rip.wrapping_add(1) == rip_after)
    }

    /// Completes a patched site's `RDTSC` at the `HLT` exit with RIP `rip_after`, as
    /// [`GuestTsc::complete`] does a breakpoint's.
    pub fn complete_hlt(
        &mut self,
        vcpu: &VcpuFd,
        rip_after: u64,
        now: &mut dyn FnMut() -> Result<u64, BoundaryError>,
    ) -> Result<Option<SyncExit>, TscError> {
        let Some(site) = self
            .patched
            .iter()
            .find(|s| s.rip.wrapping_add(1) == rip_after)
            .cloned()
        else {
            return Ok(None);
        };
        let regs = kvm("KVM_GET_REGS", vcpu.get_regs())?;
        self.finish(vcpu, &site, regs, std::time::Instant::now(), now)
            .map(Some)
    }

    /// Completes the `RDTSC` the vCPU stopped at, if `rip` is one of the sites: EDX:EAX (and
    /// ECX for `RDTSCP`) from `now()`, the virtual time in nanoseconds, RIP past it. Returns
    /// the synchronous exit it counts as, or `None` if the debug exit was not at a site.
    pub fn complete(
        &mut self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        rip: u64,
        now: &mut dyn FnMut() -> Result<u64, BoundaryError>,
    ) -> Result<Option<SyncExit>, TscError> {
        let Some(site) = self.armed().find(|s| s.rip == rip).cloned() else {
            return Ok(None);
        };
        let start = std::time::Instant::now();
        let regs = kvm("KVM_GET_REGS", vcpu.get_regs())?;
        let opcode = site.opcode();
        if !self.checked.contains(&rip) {
            let sregs = kvm("KVM_GET_SREGS", vcpu.get_sregs())?;
            let mut bytes = [0u8; 3];
            let bytes = &mut bytes[..opcode.len()];
            compat::read_virt(mem, &sregs, rip, bytes)
                .map_err(|why| TscError::GuestMemory { rip, why })?;
            if bytes != opcode {
                return Err(TscError::NotRdtsc {
                    rip,
                    function: site.function.clone(),
                    bytes: bytes.iter().map(|b| format!("{b:02x}")).collect(),
                });
            }
            self.checked.push(rip);
        }
        self.finish(vcpu, &site, regs, start, now).map(Some)
    }

    fn finish(
        &mut self,
        vcpu: &VcpuFd,
        site: &Site,
        mut regs: kvm_bindings::kvm_regs,
        start: std::time::Instant,
        now: &mut dyn FnMut() -> Result<u64, BoundaryError>,
    ) -> Result<SyncExit, TscError> {
        let rip = site.rip;
        let opcode = site.opcode();
        let waited = std::time::Instant::now();
        let tsc = now()?;
        // A replayer's clock read can wait for the log: that is not the VMM's work.
        let waited = waited.elapsed();
        regs.rax = tsc & 0xffff_ffff;
        regs.rdx = tsc >> 32;
        if site.rdtscp {
            regs.rcx = tsc_aux(vcpu)? & 0xffff_ffff;
        }
        regs.rip = rip + opcode.len() as u64;
        // The instruction completed: RF is clear after it, as after any other.
        regs.rflags &= !RFLAGS_RF;
        kvm("KVM_SET_REGS", vcpu.set_regs(&regs))?;
        self.reads += 1;
        let work = start.elapsed().saturating_sub(waited);
        self.vmm_ns += u64::try_from(work.as_nanos()).unwrap_or(u64::MAX);
        Ok(SyncExit {
            kind: ExitKind::Debug,
            addr: DEBUG_RDTSC,
            data: tsc,
            len: opcode.len() as u8,
            rip,
        })
    }
}

fn tsc_aux(vcpu: &VcpuFd) -> Result<u64, TscError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_TSC_AUX,
        ..Default::default()
    }])
    .map_err(|e| TscError::Elf(format!("KVM_GET_MSRS buffer: {e:?}")))?;
    let n = kvm("KVM_GET_MSRS", vcpu.get_msrs(&mut msrs))?;
    Ok(if n == 1 { msrs.as_slice()[0].data } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn vmlinux() -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out/linux/vmlinux");
        if p.exists() {
            Some(p)
        } else {
            eprintln!(
                "{} missing (images/build-linux builds it): skipping the site finder test on the real kernel",
                p.display()
            );
            None
        }
    }

    #[test]
    fn patch_puts_hlt_over_rdtsc_once_and_leaves_other_bytes_alone() {
        let mem = crate::memory::create(1 << 20).unwrap();
        let site = |gpa: u64, rdtscp| Site {
            function: "f".into(),
            function_addr: 0xffff_ffff_8100_0000,
            rip: 0xffff_ffff_8100_0000 + gpa,
            rdtscp,
            gpa: Some(gpa),
        };
        mem.write_slice(&RDTSC, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&RDTSCP, GuestAddress(0x2000)).unwrap();
        mem.write_slice(&[0xcc, 0xcc], GuestAddress(0x3000))
            .unwrap();
        let mut tsc = GuestTsc {
            patched: vec![site(0x1000, false), site(0x2000, true), site(0x3000, false)],
            ..Default::default()
        };
        tsc.patch(&mem, true);
        let read = |gpa: u64, n: usize| {
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
            b
        };
        assert_eq!(read(0x1000, 2), [HLT, NOP]);
        assert_eq!(read(0x2000, 3), [HLT, NOP, NOP]);
        assert_eq!(read(0x3000, 2), [0xcc, 0xcc]);
        assert_eq!(
            tsc.patched.len(),
            2,
            "the site that is not RDTSC is dropped"
        );
        assert!(tsc.is_patched_hlt(0xffff_ffff_8100_1001));
        assert!(!tsc.is_patched_hlt(0xffff_ffff_8100_1000));
        // A restore brings back patched text: nothing changes, nothing is dropped.
        tsc.patch(&mem, false);
        assert_eq!(tsc.patched.len(), 2);
        assert_eq!(read(0x1000, 2), [HLT, NOP]);
        assert!(tsc.addresses().is_empty(), "no debug register used");
    }

    #[test]
    fn names_match_with_compiler_suffixes_only() {
        assert!(symbol_matches("extract_entropy", "extract_entropy"));
        assert!(symbol_matches(
            "extract_entropy.constprop.0",
            "extract_entropy"
        ));
        assert!(symbol_matches(
            "add_timer_randomness.cold",
            "add_timer_randomness"
        ));
        assert!(!symbol_matches("extract_entropy_foo", "extract_entropy"));
        assert!(!symbol_matches("xextract_entropy", "extract_entropy"));
    }

    #[test]
    fn finds_the_rdtsc_sites_of_the_real_kernel() {
        let Some(kernel) = vmlinux() else {
            return;
        };
        let sites = find_sites(&kernel, ENTROPY_FUNCTIONS).unwrap();
        assert!(!sites.is_empty());
        // The first is the one that runs on every interrupt.
        assert!(
            symbol_matches(&sites[0].function, "add_interrupt_randomness"),
            "{sites:?}"
        );
        // In priority order, and every one an RDTSC in the file's bytes at that address.
        let rank = |s: &Site| {
            ENTROPY_FUNCTIONS
                .iter()
                .position(|f| symbol_matches(&s.function, f))
                .unwrap()
        };
        assert!(sites.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])));
        for s in &sites {
            assert!(
                s.rip > s.function_addr && s.rip >= 0xffff_ffff_8000_0000,
                "{s}"
            );
        }
        // Cross-check with the kernel's own System.map when the build left one.
        let map = kernel.with_file_name("System.map");
        if let Ok(map) = std::fs::read_to_string(map) {
            let addr_of = |name: &str| {
                map.lines().find_map(|l| {
                    let mut w = l.split_whitespace();
                    let (a, _, n) = (w.next()?, w.next()?, w.next()?);
                    (n == name).then(|| u64::from_str_radix(a, 16).ok())?
                })
            };
            let air = addr_of("add_interrupt_randomness").unwrap();
            assert_eq!(sites[0].function_addr, air);
        }
    }

    #[test]
    fn a_file_without_symbols_or_not_elf_has_no_sites() {
        let dir = std::env::temp_dir().join(format!("ftvmm-tsc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x42u8; 128]).unwrap();
        assert!(matches!(
            find_sites(&junk, ENTROPY_FUNCTIONS),
            Err(TscError::Elf(_))
        ));
        // A minimal ELF64 x86-64 header with no section headers.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        let bare = dir.join("bare");
        std::fs::write(&bare, &elf).unwrap();
        assert!(matches!(
            find_sites(&bare, ENTROPY_FUNCTIONS),
            Err(TscError::NoSymbols)
        ));
        let tsc = GuestTsc::setup(GuestTscMode::Breakpoints, &bare, 3);
        assert!(tsc.addresses().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_boot_site_borrows_the_interrupt_sites_register_while_the_flag_is_set() {
        let Some(kernel) = vmlinux() else {
            return;
        };
        let k = Kernel::open(&kernel).unwrap();
        let flag = k.variable_gpa(BOOT_FLAG).expect("the kernel has the flag");
        let boot = k.sites(&[BOOT_FUNCTION]).unwrap();
        assert_eq!(boot.len(), 1, "{boot:?}");
        // nokaslr: the kernel runs where it was linked, 16 MiB up; System.map agrees.
        if let Ok(map) = std::fs::read_to_string(kernel.with_file_name("System.map")) {
            let line = map
                .lines()
                .find(|l| l.ends_with(&format!(" {BOOT_FLAG}")))
                .unwrap();
            let vaddr = u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap();
            assert_eq!(flag, vaddr - 0xffff_ffff_8000_0000);
        }
        let mut tsc = GuestTsc::setup(GuestTscMode::Breakpoints, &kernel, 3);
        let normal = tsc.addresses();
        let mem = crate::memory::create((flag + 4096).next_multiple_of(1 << 20)).unwrap();
        assert!(!tsc.follow(&mem), "a fresh VM is not booting yet");
        mem.write_obj(1u8, GuestAddress(flag)).unwrap();
        assert!(tsc.follow(&mem));
        let booting = tsc.addresses();
        assert_eq!(booting[0], boot[0].rip, "random_init takes slot 0");
        assert_eq!(booting[1..], normal[1..], "the others keep theirs");
        assert!(!tsc.follow(&mem), "no change, nothing to program");
        mem.write_obj(0u8, GuestAddress(flag)).unwrap();
        assert!(tsc.follow(&mem));
        assert_eq!(tsc.addresses(), normal);
    }

    #[test]
    fn setup_keeps_the_first_sites_that_fit() {
        let Some(kernel) = vmlinux() else {
            return;
        };
        let all = find_sites(&kernel, ENTROPY_FUNCTIONS).unwrap();
        let tsc = GuestTsc::setup(GuestTscMode::Breakpoints, &kernel, 3);
        let want: Vec<u64> = all.iter().take(3).map(|s| s.rip).collect();
        assert_eq!(tsc.addresses(), want);
        assert!(GuestTsc::setup(GuestTscMode::Off, &kernel, 3)
            .addresses()
            .is_empty());
    }

    /// What ftvmm looks up in a kernel, from one symbol source: the RDTSC sites, the window
    /// functions' first bytes, and every text symbol's address by name.
    type Lookups = (Vec<Site>, Vec<Option<(u64, Vec<u8>)>>);

    fn lookups(k: &Kernel) -> Lookups {
        let mut functions = ENTROPY_FUNCTIONS.to_vec();
        functions.push(BOOT_FUNCTION);
        let sites = k.sites(&functions).unwrap();
        let windows = ["__cond_resched", "memcpy"]
            .iter()
            .map(|f| k.function_code(f, 16).unwrap())
            .collect();
        (sites, windows)
    }

    /// Every text symbol kallsyms has is in the symbol table at the same address.
    fn same_text_symbols(elf: &Kernel, kallsyms: &Kernel) {
        let mut by_name: std::collections::HashMap<&str, Vec<u64>> = Default::default();
        for s in elf.symbols().filter(|s| s.kind == STT_FUNC) {
            by_name.entry(s.name).or_default().push(s.value);
        }
        let mut checked = 0;
        for s in kallsyms.symbols().filter(|s| s.kind == STT_FUNC) {
            if let Some(addrs) = by_name.get(s.name) {
                assert!(
                    addrs.contains(&s.value),
                    "{} at {:#x}: {addrs:x?}",
                    s.name,
                    s.value
                );
                checked += 1;
            }
        }
        assert!(checked > 1000, "only {checked} functions compared");
    }

    #[test]
    fn the_kallsyms_table_gives_what_the_symbol_table_gives() {
        let Some(kernel) = vmlinux() else {
            return;
        };
        let elf = Kernel::open(&kernel).unwrap();
        let ksyms = Kernel::open_with(&kernel, true).unwrap();
        let Symbols::Kallsyms { table, .. } = &ksyms.symbols else {
            panic!("not read from kallsyms");
        };
        // Found where the symbol table says the kernel's tables are.
        let at = |name: &str| {
            elf.symbols()
                .find(|s| s.name == name)
                .map(|s| s.value)
                .unwrap()
        };
        assert_eq!(table.token_table, at("kallsyms_token_table"));
        assert_eq!(table.names, at("kallsyms_names"));
        assert_eq!(table.offsets, at("kallsyms_offsets"));
        same_text_symbols(&elf, &ksyms);
        let (sites, windows) = lookups(&elf);
        assert!(!sites.is_empty());
        assert_eq!(lookups(&ksyms), (sites, windows));
    }

    /// A distribution's kernel: the sites and window functions found through the bzImage's
    /// kallsyms are the ones its -dbg package's symbol table gives (images/stock-kernel keeps
    /// both when run with SYMBOLS=dbg; FTVMM_STOCK_VMLINUX and FTVMM_STOCK_BZIMAGE name others).
    #[test]
    fn a_bzimage_gives_what_its_debug_symbols_give() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out/stock");
        let path = |var: &str, name: &str| {
            std::env::var_os(var).map_or_else(|| dir.join(name), PathBuf::from)
        };
        let (elf_path, bz_path) = (
            path("FTVMM_STOCK_VMLINUX", "vmlinux"),
            path("FTVMM_STOCK_BZIMAGE", "vmlinuz"),
        );
        if !elf_path.exists() || !bz_path.exists() {
            eprintln!(
                "{} or {} missing (SYMBOLS=dbg images/stock-kernel): skipping",
                elf_path.display(),
                bz_path.display()
            );
            return;
        }
        let elf = Kernel::open(&elf_path).unwrap();
        if !matches!(elf.symbols, Symbols::Elf { .. }) {
            eprintln!("{} has no symbol table: skipping", elf_path.display());
            return;
        }
        let bz = Kernel::open(&bz_path).unwrap();
        assert!(matches!(bz.source, Source::Unpacked(_)));
        assert!(matches!(bz.symbols, Symbols::Kallsyms { .. }));
        same_text_symbols(&elf, &bz);
        let (sites, windows) = lookups(&elf);
        eprintln!("{} sites: {sites:?}", sites.len());
        assert!(!sites.is_empty());
        assert_eq!(lookups(&bz), (sites, windows));
        assert_eq!(bz.variable_gpa(BOOT_FLAG), elf.variable_gpa(BOOT_FLAG));
    }
}
