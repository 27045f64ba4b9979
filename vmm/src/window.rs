//! Interrupt-window sites: reproducible points in busy guest kernel code where a due interrupt
//! can be injected without a checkpoint.
//!
//! # Why
//!
//! An interrupt is injected only at a synchronous exit, where replay finds the same point again
//! (DESIGN.md section 2). A Linux guest on this project's KVM runs its kernel emulated, slowly,
//! and its exits are nearly all taken with interrupts off (UART and PIC accesses under
//! `spin_lock_irqsave`, the SYSCALL completion's page-fault entry, the TSC sites in interrupt
//! handlers). Measured on the `counter` workload (20 s, host clock, 2026-11-30): of ~520 exits
//! a second, ~35 found the guest interruptible, nearly all of them `HLT`s; from a timer tick
//! falling due to the next interruptible exit took 60 ms at the median and 470 ms at p99 (the
//! tick period is 10 ms). The kicks, meanwhile, found the guest interruptible 88% of the time,
//! in kernel code with interrupts on (`unmap_page_range`, `clear_page`, `copy_page_range`...),
//! and each one that delivered a tick cost a checkpoint (~17 a second).
//!
//! # What
//!
//! Execute breakpoints on the entries of a few kernel functions that busy kernel code calls
//! often, with interrupts on, from many paths (`__cond_resched` and `memcpy` by default,
//! `--window-sites`; `__alloc_pages` is not safe on this KVM, see [`DEFAULT_SITES`]): the debug registers left free by the SYSCALL completion and the guest
//! TSC sites ([`crate::debugregs`]; `--guest-tsc patch` leaves all three). They are armed for
//! the whole run, so their hits are a function of the guest's execution alone: each hit is a
//! synchronous exit ([`ExitKind::Debug`] with code [`DEBUG_WINDOW`]), counted, logged and met
//! again by replay, and the VMM delivers the inputs due there and injects a pending interrupt
//! when the guest can take it, exactly as after any other exit.
//!
//! This host's KVM does not let `RFLAGS.RF` suppress a breakpoint (ENVIRONMENT.md), so the
//! guest cannot simply be resumed at the site: the VMM executes the site's first instruction
//! itself ([`Step`]: a near `JMP`, a register-to-register `MOV`, a `MOV` from memory at a
//! register plus displacement or a RIP-relative address, a `PUSH` of a register, or a `NOP`/`ENDBR64`; a function whose first instruction
//! is anything else is not used) and resumes after it.

use crate::compat;
use crate::memory::GuestMemoryMmap;
use crate::tsc::{Kernel, TscError};
use ft_core::{ExitKind, SyncExit};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use std::path::Path;

/// The `Debug` exit code (in [`SyncExit::addr`]) of a window-site hit.
pub const DEBUG_WINDOW: u64 = 5;

/// The default sites, in the order they get debug registers. Chosen by measurement on the
/// project's Linux guest (see the module doc and docs/ARCHITECTURE.md). Not `__alloc_pages`:
/// on this KVM, timer interrupts injected at its entry left user processes of the networked
/// guest reading zeros where their data should be (docs/ARCHITECTURE.md, "Sites that are not
/// safe here").
pub const DEFAULT_SITES: &[&str] = &["__cond_resched", "memcpy"];

/// What the VMM does in place of a site's first instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `JMP` to this address.
    Jump(u64),
    /// `MOV dst, src` between 64-bit general registers, then this many bytes on.
    Mov {
        /// Destination.
        dst: Register,
        /// Source.
        src: Register,
        /// Instruction length.
        len: u64,
    },
    /// An instruction without effect (`NOP`, `ENDBR64`) of this length.
    Skip(u64),
    /// `PUSH` of a 64-bit general register.
    Push {
        /// The register.
        src: Register,
        /// Instruction length.
        len: u64,
    },
    /// `MOV` into a 64- or 32-bit general register (zero-extended) from memory at a
    /// displacement from a 64-bit register, or from a RIP-relative address.
    Load {
        /// The 64-bit register written.
        dst: Register,
        /// The base register (`None`: `disp` is the address itself, from a RIP-relative operand).
        base: Option<Register>,
        /// The displacement, or the address.
        disp: u64,
        /// 8 or 4 bytes.
        size: u8,
        /// Instruction length.
        len: u64,
    },
}

/// One window site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// The function.
    pub name: String,
    /// Its entry.
    pub addr: u64,
    /// Its first instruction, as the VMM executes it.
    pub step: Step,
}

/// The window sites of this VM and their counters.
#[derive(Clone, Debug, Default)]
pub struct Window {
    sites: Vec<Site>,
    /// Hits so far.
    pub hits: u64,
    /// Hits at which an interrupt was injected.
    pub injections: u64,
}

/// How the VMM can execute `code`'s first instruction (at `addr`), if it can.
pub fn step_of(code: &[u8], addr: u64) -> Option<Step> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return None;
    }
    let len = instr.len() as u64;
    match instr.mnemonic() {
        Mnemonic::Jmp
            if instr.flow_control() == FlowControl::UnconditionalBranch
                && matches!(instr.op0_kind(), OpKind::NearBranch64) =>
        {
            Some(Step::Jump(instr.near_branch_target()))
        }
        Mnemonic::Mov
            if instr.op_count() == 2
                && instr.op0_kind() == OpKind::Register
                && instr.op1_kind() == OpKind::Register
                && instr.op0_register().is_gpr64()
                && instr.op1_register().is_gpr64() =>
        {
            Some(Step::Mov {
                dst: instr.op0_register(),
                src: instr.op1_register(),
                len,
            })
        }
        Mnemonic::Mov
            if instr.op_count() == 2
                && instr.op0_kind() == OpKind::Register
                && instr.op1_kind() == OpKind::Memory
                && instr.memory_index() == Register::None
                && instr.segment_prefix() == Register::None
                && (instr.is_ip_rel_memory_operand() || instr.memory_base().is_gpr64())
                && (instr.op0_register().is_gpr64() || instr.op0_register().is_gpr32()) =>
        {
            let r = instr.op0_register();
            let (base, disp) = if instr.is_ip_rel_memory_operand() {
                (None, instr.ip_rel_memory_address())
            } else {
                (Some(instr.memory_base()), instr.memory_displacement64())
            };
            Some(Step::Load {
                dst: r.full_register(),
                base,
                disp,
                size: if r.is_gpr64() { 8 } else { 4 },
                len,
            })
        }
        Mnemonic::Push
            if instr.op_count() == 1
                && instr.op0_kind() == OpKind::Register
                && instr.op0_register().is_gpr64() =>
        {
            Some(Step::Push {
                src: instr.op0_register(),
                len,
            })
        }
        Mnemonic::Nop | Mnemonic::Endbr64 => Some(Step::Skip(len)),
        _ => None,
    }
}

impl Step {
    /// Whether executing it reads or writes guest memory (and so needs the page tables).
    pub fn touches_memory(self) -> bool {
        matches!(self, Step::Push { .. } | Step::Load { .. })
    }

    /// Executes the instruction on `regs` (RIP at the site); memory through `sregs`' page
    /// tables. Fails, changing nothing, if the memory it needs is not mapped.
    pub fn apply(
        self,
        regs: &mut kvm_regs,
        mem: &GuestMemoryMmap,
        sregs: Option<&kvm_sregs>,
    ) -> Result<(), String> {
        let need = || sregs.ok_or_else(|| "no page tables".to_string());
        match self {
            Step::Jump(target) => regs.rip = target,
            Step::Mov { dst, src, len } => {
                let value = compat::gpr_mut(regs, src).map(|v| *v);
                if let (Some(v), Some(d)) = (value, compat::gpr_mut(regs, dst)) {
                    *d = v;
                }
                regs.rip = regs.rip.wrapping_add(len);
            }
            Step::Skip(len) => regs.rip = regs.rip.wrapping_add(len),
            Step::Push { src, len } => {
                let value = compat::gpr_mut(regs, src).map_or(0, |v| *v);
                let rsp = regs.rsp.wrapping_sub(8);
                compat::write_virt(mem, need()?, rsp, &value.to_le_bytes())?;
                regs.rsp = rsp;
                regs.rip = regs.rip.wrapping_add(len);
            }
            Step::Load {
                dst,
                base,
                disp,
                size,
                len,
            } => {
                let addr = match base {
                    Some(b) => compat::gpr_mut(regs, b)
                        .map_or(0, |v| *v)
                        .wrapping_add(disp),
                    None => disp,
                };
                let mut buf = [0u8; 8];
                compat::read_virt(mem, need()?, addr, &mut buf[..usize::from(size)])?;
                if let Some(d) = compat::gpr_mut(regs, dst) {
                    *d = u64::from_le_bytes(buf);
                }
                regs.rip = regs.rip.wrapping_add(len);
            }
        }
        Ok(())
    }
}

impl Window {
    /// Finds `names` in the kernel ELF at `path` and keeps those whose first instruction the VMM
    /// can execute, at most `slots` of them. Logs (info) what it chose.
    pub fn setup(kernel: &Path, names: &[String], slots: usize) -> Window {
        if names.is_empty() || slots == 0 {
            if !names.is_empty() {
                tracing::info!("interrupt window: no debug register free for {names:?}");
            }
            return Window::default();
        }
        let found = Kernel::open(kernel).and_then(|k| {
            let mut sites = Vec::new();
            for name in names {
                let Some((addr, code)) = k.function_code(name, 16)? else {
                    tracing::info!("interrupt window: the kernel has no function {name}");
                    continue;
                };
                match step_of(&code, addr) {
                    Some(step) => sites.push(Site {
                        name: name.clone(),
                        addr,
                        step,
                    }),
                    None => tracing::info!(
                        "interrupt window: {name}'s first instruction is not one the VMM executes: not used"
                    ),
                }
            }
            Ok::<_, TscError>(sites)
        });
        let mut sites = match found {
            Ok(s) => s,
            Err(e) => {
                tracing::info!("interrupt window: no sites ({e})");
                return Window::default();
            }
        };
        sites.truncate(slots);
        tracing::info!(
            "interrupt window: breakpoints on {}",
            sites
                .iter()
                .map(|s| format!("{} ({:#x})", s.name, s.addr))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Window {
            sites,
            ..Default::default()
        }
    }

    /// The addresses to break on.
    pub fn addresses(&self) -> Vec<u64> {
        self.sites.iter().map(|s| s.addr).collect()
    }

    /// The site at `pc`, if there is one.
    pub fn site(&self, pc: u64) -> Option<&Site> {
        self.sites.iter().find(|s| s.addr == pc)
    }

    /// The synchronous exit a hit at `pc` counts as.
    pub fn exit(pc: u64) -> SyncExit {
        SyncExit {
            kind: ExitKind::Debug,
            addr: DEBUG_WINDOW,
            data: 0,
            len: 0,
            rip: pc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executes_jumps_moves_and_nops() {
        // jmp rel32 (e9), jmp rel8 (eb), mov %rdx,%rax (48 89 d0), nop (90), endbr64.
        assert_eq!(
            step_of(&[0xe9, 0x2b, 0x00, 0x00, 0x00], 0x1000),
            Some(Step::Jump(0x1030))
        );
        assert_eq!(step_of(&[0xeb, 0x2e], 0x1000), Some(Step::Jump(0x1030)));
        let mov = step_of(&[0x48, 0x89, 0xd0], 0x1000).unwrap();
        assert_eq!(
            mov,
            Step::Mov {
                dst: Register::RAX,
                src: Register::RDX,
                len: 3
            }
        );
        let mut regs = kvm_regs {
            rip: 0x1000,
            rdx: 7,
            ..Default::default()
        };
        let mem = crate::memory::create(1 << 20).unwrap();
        mov.apply(&mut regs, &mem, None).unwrap();
        assert_eq!((regs.rax, regs.rip), (7, 0x1003));
        assert_eq!(step_of(&[0x90], 0), Some(Step::Skip(1)));
        assert_eq!(
            step_of(&[0x55], 0),
            Some(Step::Push {
                src: Register::RBP,
                len: 1
            })
        );
        // mov 0x10(%rip),%eax at 0x1000: reads 0x1016, 4 bytes, zero-extended into RAX.
        assert_eq!(
            step_of(&[0x8b, 0x05, 0x10, 0x00, 0x00, 0x00], 0x1000),
            Some(Step::Load {
                dst: Register::RAX,
                base: None,
                disp: 0x1016,
                size: 4,
                len: 6
            })
        );
        // mov 0x8(%rdi),%rcx
        assert_eq!(
            step_of(&[0x48, 0x8b, 0x4f, 0x08], 0x1000),
            Some(Step::Load {
                dst: Register::RCX,
                base: Some(Register::RDI),
                disp: 8,
                size: 8,
                len: 4
            })
        );
        assert_eq!(step_of(&[0xf3, 0x0f, 0x1e, 0xfa], 0), Some(Step::Skip(4)));
    }

    #[test]
    fn refuses_what_it_cannot_execute() {
        // mov (%rdi,%rsi,8),%rax, test %rdx,%rdx, jmp *%rax, truncated.
        for code in [
            &[0x48, 0x8b, 0x04, 0xf7][..],
            &[0x48, 0x85, 0xd2],
            &[0xff, 0xe0],
            &[0xe9, 0x00],
        ] {
            assert_eq!(step_of(code, 0x1000), None, "{code:02x?}");
        }
    }
}
