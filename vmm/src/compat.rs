//! Completing in the VMM what this host's KVM cannot do itself.
//!
//! The development hosts of this project serve `/dev/kvm` from a paravirtual, nested backend
//! (`kvm_pvm`, ENVIRONMENT.md). It emulates guest CPL0 code and its emulator stops on some
//! instructions (`KVM_EXIT_INTERNAL_ERROR`, emulation failure). This module decodes such an
//! instruction and completes it: it applies its architectural effect and advances RIP, or
//! injects the exception it raises. Which instructions fail here, and which of them ftvmm
//! completes or hides from the guest, is the census in docs/CENSUS.md (the `census` test guest). Every completion happens at a synchronous exit and depends
//! only on guest state, so it is deterministic and replays like any other exit.
//!
//! It also completes `SYSCALL` from user mode, which this KVM starts (RCX and R11 loaded, RIP =
//! LSTAR) without switching to CPL0, so the first fetch at LSTAR faults (#PF) at CPL3. See
//! [`SyscallFix`].
//!
//! On hardware KVM none of this triggers: `--kvm-compat auto` turns it on only where the host probe
//! ([`crate::host`]) finds an instruction KVM cannot run or a broken `SYSCALL`.

use crate::debugregs::DebugRegs;
use crate::memory::GuestMemoryMmap;
use ft_core::{ExitKind, SyncExit};
use iced_x86::{Decoder, DecoderOptions, FastFormatter, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, Msrs,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

/// Errors of the compatibility paths.
#[derive(Debug, Error)]
pub enum CompatError {
    /// The guest ran an instruction neither KVM nor the VMM can complete.
    #[error("the guest executed an instruction this KVM cannot emulate and ftvmm cannot complete: `{text}` (bytes {bytes}) at rip {rip:#x}")]
    Unsupported {
        /// Its disassembly.
        text: String,
        /// Its bytes, hex.
        bytes: String,
        /// The guest\'s instruction pointer (guest virtual address) at the exit.
        rip: u64,
    },
    /// KVM reported an internal error that is not an emulation failure.
    #[error("KVM internal error, suberror {suberror}, at rip {rip:#x}")]
    Internal {
        /// KVM's suberror code.
        suberror: u32,
        /// The guest\'s instruction pointer (guest virtual address) at the exit.
        rip: u64,
    },
    /// The instruction's bytes or operand could not be read from guest memory.
    #[error("cannot read guest memory at virtual address {gva:#x} (rip {rip:#x}): {why}")]
    GuestMemory {
        /// The guest virtual address that could not be read.
        gva: u64,
        /// The guest's instruction pointer at the faulting instruction.
        rip: u64,
        /// What failed: an unmapped page in the guest's page tables, or a guest physical
        /// address outside RAM.
        why: String,
    },
    /// A vCPU register or state ioctl failed while completing an instruction.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl's name, e.g. `KVM_GET_REGS`.
        what: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
}

const RFLAGS_AC: u64 = 1 << 18;
const ARITH_FLAGS: u64 = 0x8d5; // CF PF AF ZF SF OF
const RFLAGS_ZF: u64 = 1 << 6;
const BP_VECTOR: u8 = 3;
const UD_VECTOR: u8 = 6;
const NM_VECTOR: u8 = 7;
const GP_VECTOR: u8 = 13;
const MF_VECTOR: u8 = 16;
/// MXCSR bits a CPU with DAZ accepts (MXCSR_MASK 0xffff, every x86-64 CPU since ~2005);
/// setting another raises #GP(0).
const MXCSR_MASK: u32 = 0xffff;

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, CompatError> {
    r.map_err(|source| CompatError::Kvm { what, source })
}

/// Translates a guest virtual address with the guest's own 4-level page tables.
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, gva: u64) -> Option<u64> {
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    if sregs.cr0 & (1 << 31) == 0 {
        return Some(gva);
    }
    let mut table = sregs.cr3 & ADDR;
    for level in (0..4).rev() {
        let index = (gva >> (12 + 9 * level)) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        if level > 0 && level < 3 && entry & HUGE != 0 {
            let page = 1u64 << (12 + 9 * level);
            return Some((entry & ADDR & !(page - 1)) | (gva & (page - 1)));
        }
        table = entry & ADDR;
    }
    Some(table | (gva & 0xfff))
}

/// Reads guest virtual memory through the guest's page tables, byte by byte.
pub(crate) fn read_virt(
    mem: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    for (i, b) in buf.iter_mut().enumerate() {
        let va = gva.wrapping_add(i as u64);
        let pa = translate(mem, sregs, va).ok_or_else(|| format!("{va:#x} is not mapped"))?;
        *b = mem
            .read_obj(GuestAddress(pa))
            .map_err(|e| format!("{pa:#x}: {e}"))?;
    }
    Ok(())
}

pub(crate) fn write_virt(
    mem: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    gva: u64,
    buf: &[u8],
) -> Result<(), String> {
    for (i, b) in buf.iter().enumerate() {
        let va = gva.wrapping_add(i as u64);
        let pa = translate(mem, sregs, va).ok_or_else(|| format!("{va:#x} is not mapped"))?;
        mem.write_obj(*b, GuestAddress(pa))
            .map_err(|e| format!("{pa:#x}: {e}"))?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 64-bit general register's value.
fn gpr(regs: &kvm_regs, r: Register) -> Option<u64> {
    if r.full_register() == Register::RIP {
        return Some(regs.rip);
    }
    let mut copy = *regs;
    gpr_mut(&mut copy, r).map(|v| *v)
}

/// The 64-bit general register that holds `r` (of any width), in `regs`.
pub(crate) fn gpr_mut(regs: &mut kvm_regs, r: Register) -> Option<&mut u64> {
    Some(match r.full_register() {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// Reads a general register of any width (8-bit high registers are not needed here).
fn read_reg(regs: &kvm_regs, r: Register) -> Option<u64> {
    let v = gpr(regs, r)?;
    Some(match r.size() {
        8 => v,
        4 => v & 0xffff_ffff,
        2 => v & 0xffff,
        _ => return None,
    })
}

/// Writes a general register with x86 semantics: a 32-bit write zero-extends, a 16-bit write
/// keeps the upper bits.
fn write_reg(regs: &mut kvm_regs, r: Register, value: u64) -> Option<()> {
    let size = r.size();
    let slot = gpr_mut(regs, r)?;
    *slot = match size {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*slot & !0xffff) | (value & 0xffff),
        _ => return None,
    };
    Some(())
}

fn effective_address(instr: &Instruction, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<u64> {
    let mut ea = instr.memory_displacement64();
    if instr.memory_base() == Register::RIP {
        // iced folds RIP-relative displacements into an absolute address.
    } else if instr.memory_base() != Register::None {
        ea = ea.wrapping_add(read_reg(regs, instr.memory_base())?);
    }
    if instr.memory_index() != Register::None {
        let scale = u64::from(instr.memory_index_scale());
        ea = ea.wrapping_add(read_reg(regs, instr.memory_index())?.wrapping_mul(scale));
    }
    match instr.memory_segment() {
        Register::FS => ea = ea.wrapping_add(sregs.fs.base),
        Register::GS => ea = ea.wrapping_add(sregs.gs.base),
        _ => {}
    }
    Some(ea)
}

/// Reads the bytes of the instruction that failed: from the exit, if KVM provided them,
/// otherwise from guest memory at RIP.
fn instruction_bytes(
    vcpu: &mut VcpuFd,
    mem: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    rip: u64,
) -> Result<Vec<u8>, CompatError> {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR (the caller checked), for which the
    // kernel fills the `emulation_failure` member of the union.
    let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
    if ef.suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
        return Err(CompatError::Internal {
            suberror: ef.suberror,
            rip,
        });
    }
    // SAFETY: the union has a single member.
    let insn = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
    if ef.flags & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
        && insn.insn_size > 0
    {
        let n = usize::from(insn.insn_size).min(insn.insn_bytes.len());
        return Ok(insn.insn_bytes[..n].to_vec());
    }
    let mut buf = vec![0u8; 15];
    // An instruction can end before a page boundary: read what is mapped.
    let mut n = 0;
    while n < buf.len() {
        if read_virt(mem, sregs, rip + n as u64, &mut buf[n..n + 1]).is_err() {
            break;
        }
        n += 1;
    }
    if n == 0 {
        return Err(CompatError::GuestMemory {
            gva: rip,
            rip,
            why: "the instruction's page is not mapped".into(),
        });
    }
    buf.truncate(n);
    Ok(buf)
}

/// The guest's x87 and SSE control and status words, read and written through its XSAVE
/// image (`KVM_GET_XSAVE`/`KVM_SET_XSAVE`), not `KVM_GET_FPU`/`KVM_SET_FPU`.
///
/// The census (docs/CENSUS.md) found why: after a `fninit` the guest's x87 and SSE state
/// components are in their init state (XSTATE_BV bits 0 and 1 clear), and this KVM's
/// `KVM_SET_FPU` writes the legacy FXSAVE area without setting those bits, so the next state
/// load ignores what it wrote (an `fldcw` completed that way was lost for the next `fnstcw` the
/// emulator ran itself), and `KVM_GET_FPU` reads that area raw (`stmxcsr` read MXCSR 0).
/// `KVM_GET_XSAVE` fills components in their init state with their init values, and writing
/// the image back with both bits set makes the CPU load exactly these values.
struct Fpu {
    xsave: kvm_bindings::kvm_xsave,
    fcw: u16,
    fsw: u16,
    mxcsr: u32,
}

impl Fpu {
    const FCW: usize = 0;
    const FSW: usize = 2;
    const MXCSR: usize = 24;
    const XSTATE_BV: usize = 512;
    const X87_SSE: u64 = 0b11;

    fn bytes(x: &kvm_bindings::kvm_xsave) -> [u8; 520] {
        let mut b = [0u8; 520];
        for (i, w) in x.region[..130].iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    fn get(vcpu: &VcpuFd) -> Result<Fpu, CompatError> {
        let xsave = kvm("KVM_GET_XSAVE", vcpu.get_xsave())?;
        let b = Self::bytes(&xsave);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Ok(Fpu {
            fcw: u16_at(Self::FCW),
            fsw: u16_at(Self::FSW),
            mxcsr: u32::from(u16_at(Self::MXCSR)) | u32::from(u16_at(Self::MXCSR + 2)) << 16,
            xsave,
        })
    }

    fn set(&mut self, vcpu: &VcpuFd) -> Result<(), CompatError> {
        let mut b = Self::bytes(&self.xsave);
        b[Self::FCW..Self::FCW + 2].copy_from_slice(&self.fcw.to_le_bytes());
        b[Self::FSW..Self::FSW + 2].copy_from_slice(&self.fsw.to_le_bytes());
        b[Self::MXCSR..Self::MXCSR + 4].copy_from_slice(&self.mxcsr.to_le_bytes());
        let mut bv = [0u8; 8];
        bv.copy_from_slice(&b[Self::XSTATE_BV..Self::XSTATE_BV + 8]);
        let bv = u64::from_le_bytes(bv) | Self::X87_SSE;
        b[Self::XSTATE_BV..Self::XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
        for (i, w) in self.xsave.region[..130].iter_mut().enumerate() {
            *w = u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        }
        // SAFETY: the image is the one KVM_GET_XSAVE returned for this vCPU, with the x87
        // and SSE bits of its header set and fields of the legacy area changed: it names no
        // state component beyond what KVM gave, so KVM reads no more than `kvm_xsave` holds.
        kvm("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&self.xsave) })
    }
}

/// Makes `vector` (an exception without error code) pending for the next entry.
fn inject_exception(vcpu: &VcpuFd, vector: u8) -> Result<(), CompatError> {
    inject_fault(vcpu, vector, None)
}

/// Makes `vector` pending for the next entry, with `error_code` if it has one.
fn inject_fault(vcpu: &VcpuFd, vector: u8, error_code: Option<u32>) -> Result<(), CompatError> {
    let mut events: kvm_vcpu_events = kvm("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = u8::from(error_code.is_some());
    events.exception.error_code = error_code.unwrap_or(0);
    kvm("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&events))
}

/// The fault an SSE instruction raises before it does anything, if any: #UD with CR0.EM set
/// or CR4.OSFXSR clear, #NM with CR0.TS set (SDM vol. 2, LDMXCSR "Protected Mode Exceptions").
fn sse_fault(sregs: &kvm_sregs) -> Option<u8> {
    const CR0_EM: u64 = 1 << 2;
    const CR0_TS: u64 = 1 << 3;
    const CR4_OSFXSR: u64 = 1 << 9;
    if sregs.cr0 & CR0_EM != 0 || sregs.cr4 & CR4_OSFXSR == 0 {
        Some(UD_VECTOR)
    } else if sregs.cr0 & CR0_TS != 0 {
        Some(NM_VECTOR)
    } else {
        None
    }
}

/// The 8-byte descriptor `selector` names in the GDT or the LDT; None for a null selector or
/// one beyond its table's limit.
fn descriptor(mem: &GuestMemoryMmap, sregs: &kvm_sregs, selector: u16) -> Option<u64> {
    let ldt = selector & 4 != 0;
    if !ldt && selector & !3 == 0 {
        return None;
    }
    let (base, limit) = if ldt {
        if sregs.ldt.unusable != 0 || sregs.ldt.present == 0 {
            return None;
        }
        (sregs.ldt.base, u64::from(sregs.ldt.limit))
    } else {
        (sregs.gdt.base, u64::from(sregs.gdt.limit))
    };
    let offset = u64::from(selector & !7);
    if offset + 7 > limit {
        return None;
    }
    let mut raw = [0u8; 8];
    read_virt(mem, sregs, base + offset, &mut raw).ok()?;
    Some(u64::from_le_bytes(raw))
}

/// What VERR, VERW, LAR or LSL find in descriptor `d` (SDM vol. 2, their "Operation" in
/// 64-bit mode): None when ZF is to be cleared; otherwise LAR's access rights, LSL's limit
/// in bytes, or 0 for VERR/VERW.
fn check_descriptor(m: Mnemonic, d: u64, sregs: &kvm_sregs, selector: u16) -> Option<u64> {
    let ty = (d >> 40) & 0xf;
    let code_or_data = (d >> 44) & 1 != 0;
    let dpl = (d >> 45) & 3;
    let cpl = u64::from(sregs.cs.selector & 3);
    let rpl = u64::from(selector & 3);
    let code = code_or_data && ty & 8 != 0;
    let conforming = code && ty & 4 != 0;
    if !conforming && (dpl < cpl || dpl < rpl) {
        return None;
    }
    match m {
        Mnemonic::Verr => (code_or_data && (!code || ty & 2 != 0)).then_some(0),
        Mnemonic::Verw => (code_or_data && !code && ty & 2 != 0).then_some(0),
        // System types valid in 64-bit mode: LDT, available and busy 64-bit TSS, and (LAR
        // only) the 64-bit call gate.
        Mnemonic::Lar => {
            (code_or_data || matches!(ty, 2 | 9 | 0xb | 0xc)).then_some((d >> 32) & 0x00f0_ff00)
        }
        _ => (code_or_data || matches!(ty, 2 | 9 | 0xb)).then(|| {
            let limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
            if (d >> 55) & 1 != 0 {
                limit << 12 | 0xfff
            } else {
                limit
            }
        }),
    }
}

/// Completes the instruction that made the last `KVM_RUN` stop with an internal error.
/// Returns the synchronous exit it counts as.
pub fn complete_emulation_failure(
    vcpu: &mut VcpuFd,
    mem: &GuestMemoryMmap,
) -> Result<SyncExit, CompatError> {
    let mut regs = kvm("KVM_GET_REGS", vcpu.get_regs())?;
    let sregs = kvm("KVM_GET_SREGS", vcpu.get_sregs())?;
    let rip = regs.rip;
    let bytes = instruction_bytes(vcpu, mem, &sregs, rip)?;
    let mut decoder = Decoder::with_ip(64, &bytes, rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    let unsupported = |instr: &Instruction| {
        let mut text = String::new();
        FastFormatter::new().format(instr, &mut text);
        CompatError::Unsupported {
            text,
            bytes: hex(&bytes[..instr.len().clamp(1, bytes.len())]),
            rip,
        }
    };
    if instr.is_invalid() {
        return Err(unsupported(&instr));
    }
    let next = rip.wrapping_add(instr.len() as u64);
    // The instruction raises `vector` (with `code`) instead of completing: a fault, so the
    // handler sees RIP at the instruction and `regs` as they were.
    let fault = |vcpu: &VcpuFd, regs: &kvm_regs, vector: u8, code: Option<u32>| {
        inject_fault(vcpu, vector, code)?;
        kvm("KVM_SET_REGS", vcpu.set_regs(regs))?;
        Ok(SyncExit {
            kind: ExitKind::Emulated,
            addr: instr.mnemonic() as u64,
            data: u64::from(vector),
            len: instr.len() as u8,
            rip,
        })
    };
    let mut result = 0u64;
    match instr.mnemonic() {
        Mnemonic::Popcnt => {
            let dst = instr.op0_register();
            let src = match instr.op1_kind() {
                OpKind::Register => read_reg(&regs, instr.op1_register()),
                OpKind::Memory => {
                    let ea = effective_address(&instr, &regs, &sregs)
                        .ok_or_else(|| unsupported(&instr))?;
                    let size = dst.size();
                    let mut buf = [0u8; 8];
                    read_virt(mem, &sregs, ea, &mut buf[..size])
                        .map_err(|why| CompatError::GuestMemory { gva: ea, rip, why })?;
                    Some(u64::from_le_bytes(buf))
                }
                _ => None,
            }
            .ok_or_else(|| unsupported(&instr))?;
            result = u64::from(src.count_ones());
            write_reg(&mut regs, dst, result).ok_or_else(|| unsupported(&instr))?;
            regs.rflags &= !ARITH_FLAGS;
            if src == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
        }
        Mnemonic::Clac => regs.rflags &= !RFLAGS_AC,
        Mnemonic::Stac => regs.rflags |= RFLAGS_AC,
        Mnemonic::Fnclex => {
            let mut fpu = Fpu::get(vcpu)?;
            // Clear the exception flags, the stack fault, the summary and busy bits.
            fpu.fsw &= !0x80ff;
            fpu.set(vcpu)?;
            result = u64::from(fpu.fsw);
        }
        Mnemonic::Wait => {
            // FWAIT raises #MF when an unmasked x87 exception is pending, else does nothing.
            let fpu = Fpu::get(vcpu)?;
            let pending = fpu.fsw & 0x3f & !(fpu.fcw & 0x3f) != 0;
            if pending && fpu.fsw & 0x80 != 0 {
                return fault(vcpu, &regs, MF_VECTOR, None);
            }
            result = u64::from(fpu.fsw);
        }
        Mnemonic::Fnstsw | Mnemonic::Fnstcw => {
            let fpu = Fpu::get(vcpu)?;
            let value = if instr.mnemonic() == Mnemonic::Fnstsw {
                fpu.fsw
            } else {
                fpu.fcw
            };
            match instr.op0_kind() {
                OpKind::Register => {
                    write_reg(&mut regs, instr.op0_register(), u64::from(value))
                        .ok_or_else(|| unsupported(&instr))?;
                }
                OpKind::Memory => {
                    let ea = effective_address(&instr, &regs, &sregs)
                        .ok_or_else(|| unsupported(&instr))?;
                    write_virt(mem, &sregs, ea, &value.to_le_bytes())
                        .map_err(|why| CompatError::GuestMemory { gva: ea, rip, why })?;
                }
                _ => return Err(unsupported(&instr)),
            }
            result = u64::from(value);
        }
        Mnemonic::Fldcw => {
            let ea = effective_address(&instr, &regs, &sregs).ok_or_else(|| unsupported(&instr))?;
            let mut buf = [0u8; 2];
            read_virt(mem, &sregs, ea, &mut buf).map_err(|why| CompatError::GuestMemory {
                gva: ea,
                rip,
                why,
            })?;
            let mut fpu = Fpu::get(vcpu)?;
            fpu.fcw = u16::from_le_bytes(buf);
            fpu.set(vcpu)?;
            result = u64::from(fpu.fcw);
        }
        Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => {
            if let Some(vector) = sse_fault(&sregs) {
                return fault(vcpu, &regs, vector, None);
            }
            let ea = effective_address(&instr, &regs, &sregs).ok_or_else(|| unsupported(&instr))?;
            let mut fpu = Fpu::get(vcpu)?;
            if instr.mnemonic() == Mnemonic::Ldmxcsr {
                let mut buf = [0u8; 4];
                read_virt(mem, &sregs, ea, &mut buf).map_err(|why| CompatError::GuestMemory {
                    gva: ea,
                    rip,
                    why,
                })?;
                let value = u32::from_le_bytes(buf);
                if value & !MXCSR_MASK != 0 {
                    return fault(vcpu, &regs, GP_VECTOR, Some(0));
                }
                fpu.mxcsr = value;
                fpu.set(vcpu)?;
            } else {
                write_virt(mem, &sregs, ea, &fpu.mxcsr.to_le_bytes())
                    .map_err(|why| CompatError::GuestMemory { gva: ea, rip, why })?;
            }
            result = u64::from(fpu.mxcsr);
        }
        Mnemonic::Cmpxchg16b | Mnemonic::Cmpxchg8b => {
            // One vCPU: nothing else touches memory between the read and the write, so the
            // locked read-modify-write is this read and this write.
            let wide = instr.mnemonic() == Mnemonic::Cmpxchg16b;
            let ea = effective_address(&instr, &regs, &sregs).ok_or_else(|| unsupported(&instr))?;
            if wide && ea % 16 != 0 {
                return fault(vcpu, &regs, GP_VECTOR, Some(0));
            }
            let half = if wide { 8 } else { 4 };
            let mask = if wide { u64::MAX } else { 0xffff_ffff };
            let mut buf = [0u8; 16];
            read_virt(mem, &sregs, ea, &mut buf[..2 * half])
                .map_err(|why| CompatError::GuestMemory { gva: ea, rip, why })?;
            let word = |b: &[u8]| {
                let mut w = [0u8; 8];
                w[..half].copy_from_slice(b);
                u64::from_le_bytes(w)
            };
            let (lo, hi) = (word(&buf[..half]), word(&buf[half..2 * half]));
            if lo == regs.rax & mask && hi == regs.rdx & mask {
                let mut new = [0u8; 16];
                new[..half].copy_from_slice(&regs.rbx.to_le_bytes()[..half]);
                new[half..2 * half].copy_from_slice(&regs.rcx.to_le_bytes()[..half]);
                write_virt(mem, &sregs, ea, &new[..2 * half])
                    .map_err(|why| CompatError::GuestMemory { gva: ea, rip, why })?;
                regs.rflags |= RFLAGS_ZF;
                result = 1;
            } else {
                // A 32-bit load zero-extends into RAX and RDX, as any 32-bit register write.
                regs.rax = lo;
                regs.rdx = hi;
                regs.rflags &= !RFLAGS_ZF;
            }
        }
        Mnemonic::Xgetbv => {
            // #UD without CR4.OSXSAVE (this KVM's emulator stops instead); XCR0 from KVM,
            // #GP(0) for any other XCR (XGETBV1's XCR1 is never offered: XSAVE is hidden).
            const CR4_OSXSAVE: u64 = 1 << 18;
            let raised = if sregs.cr4 & CR4_OSXSAVE == 0 {
                Some((UD_VECTOR, None))
            } else if regs.rcx & 0xffff_ffff != 0 {
                Some((GP_VECTOR, Some(0)))
            } else {
                None
            };
            if let Some((vector, code)) = raised {
                return fault(vcpu, &regs, vector, code);
            }
            let xcrs = kvm("KVM_GET_XCRS", vcpu.get_xcrs())?;
            let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
            let xcr0 = xcrs.xcrs[..n]
                .iter()
                .find(|x| x.xcr == 0)
                .map_or(1, |x| x.value);
            regs.rax = xcr0 & 0xffff_ffff;
            regs.rdx = xcr0 >> 32;
            result = xcr0;
        }
        Mnemonic::Verr | Mnemonic::Verw | Mnemonic::Lar | Mnemonic::Lsl => {
            // The selector: VERR/VERW's only operand, LAR/LSL's source (a register or m16).
            let src = if matches!(instr.mnemonic(), Mnemonic::Verr | Mnemonic::Verw) {
                0
            } else {
                1
            };
            let selector = match instr.op_kind(src) {
                OpKind::Register => read_reg(&regs, instr.op_register(src).full_register())
                    .ok_or_else(|| unsupported(&instr))? as u16,
                OpKind::Memory => {
                    let ea = effective_address(&instr, &regs, &sregs)
                        .ok_or_else(|| unsupported(&instr))?;
                    let mut buf = [0u8; 2];
                    read_virt(mem, &sregs, ea, &mut buf)
                        .map_err(|why| CompatError::GuestMemory { gva: ea, rip, why })?;
                    u16::from_le_bytes(buf)
                }
                _ => return Err(unsupported(&instr)),
            };
            let value = descriptor(mem, &sregs, selector)
                .and_then(|d| check_descriptor(instr.mnemonic(), d, &sregs, selector));
            match value {
                Some(v) => {
                    if matches!(instr.mnemonic(), Mnemonic::Lar | Mnemonic::Lsl) {
                        let dst = instr.op0_register();
                        let v = if dst.size() == 2 { v & 0xffff } else { v };
                        write_reg(&mut regs, dst, v).ok_or_else(|| unsupported(&instr))?;
                    }
                    regs.rflags |= RFLAGS_ZF;
                    result = v | 1 << 32;
                }
                None => regs.rflags &= !RFLAGS_ZF,
            }
        }
        Mnemonic::Int3 => {
            // A trap: the #BP handler sees RIP after the INT3.
            inject_exception(vcpu, BP_VECTOR)?;
            result = u64::from(BP_VECTOR);
        }
        _ => return Err(unsupported(&instr)),
    }
    regs.rip = next;
    kvm("KVM_SET_REGS", vcpu.set_regs(&regs))?;
    Ok(SyncExit {
        kind: ExitKind::Emulated,
        addr: instr.mnemonic() as u64,
        data: result,
        len: instr.len() as u8,
        rip,
    })
}

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_FMASK: u32 = 0xc000_0084;
const EFER_SCE: u64 = 1;
const PF_VECTOR: u64 = 14;
const DR6_BS: u64 = 1 << 14;
/// `Debug` exit codes in [`SyncExit::addr`] (4 is [`crate::tsc::DEBUG_RDTSC`]).
const DEBUG_SYSCALL: u64 = 1;
const DEBUG_PF_STEP: u64 = 2;
const DEBUG_STEPPED: u64 = 3;

/// Completes `SYSCALL` from user mode on this KVM.
///
/// A hardware breakpoint sits on the guest's #PF entry (IDT vector 14; breakpoints work at CPL0
/// here). When it fires and the fault frame says the fault was at RIP == LSTAR from a user code
/// segment, the fault *is* a `SYSCALL` this KVM left half done: the VMM finishes it (CS and SS
/// from STAR, CPL0, RIP = LSTAR, RSP = the user RSP from the frame, RFLAGS masked by FMASK) as
/// if the fault had never been taken. Any other page fault goes on to the guest's handler: the
/// VMM disarms the breakpoint, single-steps one instruction and arms it again (`RFLAGS.RF` does
/// not suppress the breakpoint on this KVM, ENVIRONMENT.md).
///
/// The breakpoint follows the guest: the VMM re-reads IDTR and gate 14 at every synchronous exit
/// and moves the breakpoint when they change. It is armed only once the guest has enabled
/// `SYSCALL` (EFER.SCE): before that no system call can happen. It lives in DR0, which
/// [`DebugRegs`] keeps for it (the other slots hold the guest TSC sites of [`crate::tsc`]).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SyscallFix {
    /// Where the breakpoint is, if armed.
    armed_at: Option<u64>,
    /// Single-stepping over a page fault the guest handles itself.
    stepping: bool,
    /// Completed system calls.
    pub syscalls: u64,
    /// Page faults stepped over.
    pub page_faults: u64,
    /// Time the VMM spent completing system calls, in nanoseconds (measurement only).
    #[serde(skip)]
    pub syscall_ns: u64,
    /// Time the VMM spent stepping over page faults (both debug exits), in nanoseconds.
    #[serde(skip)]
    pub page_fault_ns: u64,
}

fn segment_64(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl SyscallFix {
    /// Whether the VMM is in the middle of stepping over a page fault (no interrupt may be
    /// injected then).
    pub fn stepping(&self) -> bool {
        self.stepping
    }

    /// Tells the debug registers' owner what this completion needs now and programs KVM.
    fn set_debug(&self, vcpu: &VcpuFd, regs: &mut DebugRegs) -> Result<(), CompatError> {
        regs.set_syscall(self.armed_at, self.stepping && self.armed_at.is_some());
        kvm("KVM_SET_GUEST_DEBUG", regs.apply(vcpu))
    }

    /// The guest's #PF entry point, from its IDT, if it has one.
    fn pf_entry(mem: &GuestMemoryMmap, sregs: &kvm_sregs) -> Option<u64> {
        if u64::from(sregs.idt.limit) < PF_VECTOR * 16 + 15 {
            return None;
        }
        let mut gate = [0u8; 16];
        read_virt(mem, sregs, sregs.idt.base + PF_VECTOR * 16, &mut gate).ok()?;
        let present = gate[5] & 0x80 != 0;
        if !present {
            return None;
        }
        let lo = u64::from(u16::from_le_bytes([gate[0], gate[1]]));
        let mid = u64::from(u16::from_le_bytes([gate[6], gate[7]]));
        let hi = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
        Some(lo | (mid << 16) | (hi << 32))
    }

    /// Programs KVM's guest-debug state from this value (after a restore), with the other
    /// users' slots as `regs` has them.
    pub fn reapply(
        &mut self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        regs: &mut DebugRegs,
    ) -> Result<(), CompatError> {
        self.set_debug(vcpu, regs)?;
        self.follow_guest(vcpu, mem, regs)
    }

    /// Moves the breakpoint to the guest's current #PF entry (called at every synchronous exit).
    pub fn follow_guest(
        &mut self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        regs: &mut DebugRegs,
    ) -> Result<(), CompatError> {
        if self.stepping {
            return Ok(());
        }
        let sregs = kvm("KVM_GET_SREGS", vcpu.get_sregs())?;
        let want = if sregs.efer & EFER_SCE != 0 {
            Self::pf_entry(mem, &sregs)
        } else {
            None
        };
        if want != self.armed_at {
            tracing::debug!(
                "SYSCALL completion: #PF breakpoint {:x?} -> {:x?}",
                self.armed_at,
                want
            );
            self.armed_at = want;
            self.set_debug(vcpu, regs)?;
        }
        Ok(())
    }

    /// Handles a `KVM_EXIT_DEBUG`. Returns the synchronous exit it counts as, or `None` if the
    /// exit was not one of ours.
    pub fn on_debug(
        &mut self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        arch: &kvm_debug_exit_arch,
        regs: &mut DebugRegs,
    ) -> Result<Option<SyncExit>, CompatError> {
        let start = std::time::Instant::now();
        let exit = self.handle_debug(vcpu, mem, arch, regs)?;
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        match exit.map(|e| e.addr) {
            Some(DEBUG_SYSCALL) => self.syscall_ns += ns,
            Some(DEBUG_PF_STEP | DEBUG_STEPPED) => self.page_fault_ns += ns,
            _ => {}
        }
        Ok(exit)
    }

    fn handle_debug(
        &mut self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        arch: &kvm_debug_exit_arch,
        dregs: &mut DebugRegs,
    ) -> Result<Option<SyncExit>, CompatError> {
        let rip = arch.pc;
        if self.stepping && arch.dr6 & DR6_BS != 0 {
            self.stepping = false;
            self.set_debug(vcpu, dregs)?;
            return Ok(Some(SyncExit {
                kind: ExitKind::Debug,
                addr: DEBUG_STEPPED,
                data: 0,
                len: 0,
                rip,
            }));
        }
        if self.armed_at != Some(rip) {
            return Ok(None);
        }
        let mut regs = kvm("KVM_GET_REGS", vcpu.get_regs())?;
        let mut sregs = kvm("KVM_GET_SREGS", vcpu.get_sregs())?;
        // The #PF frame: error code, RIP, CS, RFLAGS, RSP, SS.
        let mut raw = [0u8; 48];
        read_virt(mem, &sregs, regs.rsp, &mut raw).map_err(|why| CompatError::GuestMemory {
            gva: regs.rsp,
            rip,
            why,
        })?;
        let word =
            |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let (frame_rip, frame_cs, frame_rflags, frame_rsp) = (word(1), word(2), word(3), word(4));
        let mut msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_STAR,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_LSTAR,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_FMASK,
                ..Default::default()
            },
        ])
        .map_err(|_| CompatError::Internal { suberror: 0, rip })?;
        let n = kvm("KVM_GET_MSRS", vcpu.get_msrs(&mut msrs))?;
        let m = msrs.as_slice();
        if n != 3 {
            return Err(CompatError::Internal { suberror: 0, rip });
        }
        let (star, lstar, fmask) = (m[0].data, m[1].data, m[2].data);
        if frame_cs & 3 == 3 && frame_rip == lstar {
            // A SYSCALL this KVM left at CPL3: finish it.
            let cs = ((star >> 32) & 0xfffc) as u16;
            sregs.cs = segment_64(cs, true);
            sregs.ss = segment_64(cs + 8, false);
            regs.rip = lstar;
            regs.rsp = frame_rsp;
            regs.rflags = (frame_rflags & !fmask) | 2;
            kvm("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
            kvm("KVM_SET_REGS", vcpu.set_regs(&regs))?;
            self.syscalls += 1;
            return Ok(Some(SyncExit {
                kind: ExitKind::Debug,
                addr: DEBUG_SYSCALL,
                data: regs.rax,
                len: 0,
                rip: lstar,
            }));
        }
        // An ordinary page fault: let the guest's handler run, stepping over the breakpoint.
        self.page_faults += 1;
        self.stepping = true;
        self.set_debug(vcpu, dregs)?;
        Ok(Some(SyncExit {
            kind: ExitKind::Debug,
            addr: DEBUG_PF_STEP,
            data: frame_rip,
            len: 0,
            rip,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_widths() {
        let mut regs = kvm_regs {
            rax: 0xffff_ffff_ffff_ffff,
            ..Default::default()
        };
        write_reg(&mut regs, Register::EAX, 5).unwrap();
        assert_eq!(regs.rax, 5, "32-bit writes zero-extend");
        regs.rbx = 0x1234_5678_9abc_def0;
        write_reg(&mut regs, Register::BX, 7).unwrap();
        assert_eq!(
            regs.rbx, 0x1234_5678_9abc_0007,
            "16-bit writes keep the rest"
        );
        assert_eq!(read_reg(&regs, Register::EBX), Some(0x9abc_0007));
    }

    #[test]
    fn descriptor_checks_follow_the_sdm() {
        let sregs = |cpl: u16| kvm_sregs {
            cs: kvm_segment {
                selector: 0x08 | cpl,
                ..Default::default()
            },
            ..Default::default()
        };
        let data = 0x00cf_9200_0000_ffffu64; // flat read/write data, DPL0, 4 KiB granular
        let code = 0x00af_9a00_0000_ffffu64; // 64-bit code, readable, DPL0
        let user_data = 0x00cf_f200_0000_ffffu64; // DPL3
        let tss = 0x0000_8900_0000_0067u64; // available 64-bit TSS, limit 0x67
        let k = sregs(0);
        assert_eq!(check_descriptor(Mnemonic::Verw, data, &k, 0x10), Some(0));
        assert_eq!(check_descriptor(Mnemonic::Verw, code, &k, 0x08), None);
        assert_eq!(check_descriptor(Mnemonic::Verr, code, &k, 0x08), Some(0));
        assert_eq!(
            check_descriptor(Mnemonic::Lsl, data, &k, 0x10),
            Some(0xffff_ffff)
        );
        assert_eq!(
            check_descriptor(Mnemonic::Lar, data, &k, 0x10),
            Some(0x00c0_9200)
        );
        assert_eq!(check_descriptor(Mnemonic::Lsl, tss, &k, 0x30), Some(0x67));
        assert_eq!(check_descriptor(Mnemonic::Verr, tss, &k, 0x30), None);
        // Privilege: a DPL0 segment is invisible to CPL3 and to RPL3, a DPL3 one is not.
        assert_eq!(
            check_descriptor(Mnemonic::Verw, data, &sregs(3), 0x13),
            None
        );
        assert_eq!(check_descriptor(Mnemonic::Verw, data, &k, 0x13), None);
        assert_eq!(
            check_descriptor(Mnemonic::Verw, user_data, &sregs(3), 0x23),
            Some(0)
        );
    }

    #[test]
    fn translate_walks_4_level_tables() {
        let mem = crate::memory::create(16 << 20).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; map va 0x40_0000_1000 -> 0x9000.
        let va: u64 = 0x40_0000_1000;
        let w = |v: u64, at: u64| mem.write_obj(v, GuestAddress(at)).unwrap();
        w(0x2003, 0x1000 + ((va >> 39) & 0x1ff) * 8);
        w(0x3003, 0x2000 + ((va >> 30) & 0x1ff) * 8);
        w(0x4003, 0x3000 + ((va >> 21) & 0x1ff) * 8);
        w(0x9003, 0x4000 + ((va >> 12) & 0x1ff) * 8);
        let sregs = kvm_sregs {
            cr0: 1 << 31,
            cr3: 0x1000,
            ..Default::default()
        };
        assert_eq!(translate(&mem, &sregs, va + 0x10), Some(0x9010));
        assert_eq!(translate(&mem, &sregs, va + 0x1000), None);
        // A 2 MiB page.
        w(0x20_0083, 0x3000 + (((va + 0x20_0000) >> 21) & 0x1ff) * 8);
        assert_eq!(translate(&mem, &sregs, va + 0x20_0123), Some(0x20_1123));
    }
}
