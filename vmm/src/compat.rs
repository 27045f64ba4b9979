//! Completing in the VMM what this host's KVM cannot do itself.
//!
//! The development hosts of this project serve `/dev/kvm` from a paravirtual, nested backend
//! (`kvm_pvm`, ENVIRONMENT.md). It emulates guest CPL0 code and its emulator stops on some
//! instructions (`KVM_EXIT_INTERNAL_ERROR`, emulation failure). This module decodes such an
//! instruction and completes it: it applies its architectural effect and advances RIP, or
//! injects the exception it raises. Every completion happens at a synchronous exit and depends
//! only on guest state, so it is deterministic and replays like any other exit.
//!
//! It also completes `SYSCALL` from user mode, which this KVM starts (RCX and R11 loaded, RIP =
//! LSTAR) without switching to CPL0, so the first fetch at LSTAR faults (#PF) at CPL3. See
//! [`SyscallFix`].
//!
//! On hardware KVM none of this triggers; `--kvm-compat off` turns it off entirely.

use crate::config::CompatMode;
use crate::debugregs::DebugRegs;
use crate::memory::GuestMemoryMmap;
use ft_core::{ExitKind, SyncExit};
use iced_x86::{Decoder, DecoderOptions, FastFormatter, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, Msrs,
};
use kvm_ioctls::VcpuFd;
use std::path::Path;
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
        /// Where.
        rip: u64,
    },
    /// KVM reported an internal error that is not an emulation failure.
    #[error("KVM internal error, suberror {suberror}, at rip {rip:#x}")]
    Internal {
        /// KVM's suberror code.
        suberror: u32,
        /// Where.
        rip: u64,
    },
    /// The instruction's bytes or operand could not be read from guest memory.
    #[error("cannot read guest memory at virtual address {gva:#x} (rip {rip:#x}): {why}")]
    GuestMemory {
        /// The address.
        gva: u64,
        /// Where the guest was.
        rip: u64,
        /// Why.
        why: String,
    },
    /// A vCPU ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

/// Whether the host's KVM is the paravirtual nested backend whose gaps this module covers.
pub fn host_needs_compat() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Decides the mode from the user's choice and the host.
pub fn resolve(mode: CompatMode) -> bool {
    match mode {
        CompatMode::On => true,
        CompatMode::Off => false,
        CompatMode::Auto => host_needs_compat(),
    }
}

const RFLAGS_AC: u64 = 1 << 18;
const ARITH_FLAGS: u64 = 0x8d5; // CF PF AF ZF SF OF
const RFLAGS_ZF: u64 = 1 << 6;
const BP_VECTOR: u8 = 3;
const MF_VECTOR: u8 = 16;

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

fn gpr_mut(regs: &mut kvm_regs, r: Register) -> Option<&mut u64> {
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

/// Makes `vector` (an exception without error code) pending for the next entry.
fn inject_exception(vcpu: &VcpuFd, vector: u8) -> Result<(), CompatError> {
    let mut events: kvm_vcpu_events = kvm("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    kvm("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&events))
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
            let mut fpu = kvm("KVM_GET_FPU", vcpu.get_fpu())?;
            // Clear the exception flags, the stack fault, the summary and busy bits.
            fpu.fsw &= !0x80ff;
            kvm("KVM_SET_FPU", vcpu.set_fpu(&fpu))?;
            result = u64::from(fpu.fsw);
        }
        Mnemonic::Wait => {
            // FWAIT raises #MF when an unmasked x87 exception is pending, else does nothing.
            let fpu = kvm("KVM_GET_FPU", vcpu.get_fpu())?;
            let pending = fpu.fsw & 0x3f & !(fpu.fcw & 0x3f) != 0;
            if pending && fpu.fsw & 0x80 != 0 {
                // A fault: the handler sees RIP at the FWAIT.
                inject_exception(vcpu, MF_VECTOR)?;
                kvm("KVM_SET_REGS", vcpu.set_regs(&regs))?;
                return Ok(SyncExit {
                    kind: ExitKind::Emulated,
                    addr: instr.mnemonic() as u64,
                    data: u64::from(MF_VECTOR),
                    len: instr.len() as u8,
                    rip,
                });
            }
            result = u64::from(fpu.fsw);
        }
        Mnemonic::Fnstsw | Mnemonic::Fnstcw => {
            let fpu = kvm("KVM_GET_FPU", vcpu.get_fpu())?;
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
            let mut fpu = kvm("KVM_GET_FPU", vcpu.get_fpu())?;
            fpu.fcw = u16::from_le_bytes(buf);
            kvm("KVM_SET_FPU", vcpu.set_fpu(&fpu))?;
            result = u64::from(fpu.fcw);
        }
        Mnemonic::Int3 => {
            // A trap: the #BP handler sees RIP after the INT3.
            let mut events: kvm_vcpu_events = kvm("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            kvm("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&events))?;
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
