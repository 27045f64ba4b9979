//! The one owner of the vCPU's hardware debug state (`KVM_SET_GUEST_DEBUG`).
//!
//! x86 has four debug address registers, DR0..DR3, and three users in this VMM want them: the
//! SYSCALL completion of [`crate::compat`], the guest TSC sites of [`crate::tsc`] (with
//! `--guest-tsc breakpoints`) and the interrupt-window sites of [`crate::window`]. Each user
//! tells [`DebugRegs`] what it wants; [`DebugRegs::state`] computes the one `kvm_guest_debug`
//! from both, and [`DebugRegs::apply`] hands it to KVM. Nothing else calls
//! `KVM_SET_GUEST_DEBUG`.
//!
//! The slots are fixed for the life of the VM, so which sites are covered never changes while
//! it runs (and a restored VM gets the same ones):
//!
//! | slot | with the compatibility paths on | with them off |
//! | --- | --- | --- |
//! | DR0 | the SYSCALL completion's breakpoint on the guest's #PF entry (armed once the guest enabled `SYSCALL`) | guest TSC site 1 |
//! | DR1..DR3 | guest TSC sites 1..3 (`--guest-tsc breakpoints`), then window sites | guest TSC sites 2..4, then window sites |
//!
//! With `--guest-tsc patch` (the default) the TSC sites take no slot and the window sites have
//! DR1..DR3 (DR0..DR3 with the compatibility paths off).
//!
//! While the SYSCALL completion single-steps over a page fault, every breakpoint is disarmed:
//! the step runs the first instruction of the guest's #PF handler, which is no TSC site, and
//! the step looks exactly as it did before the TSC sites existed.

use kvm_bindings::{
    kvm_guest_debug, kvm_guest_debug_arch, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;

/// How many debug address registers x86 has.
pub const SLOTS: usize = 4;
/// DR7 bit 10 reads as 1.
const DR7_FIXED: u64 = 0x400;

/// DR7's local-enable bit for slot `n` (R/W and LEN stay 00: break on instruction execution).
fn dr7_local_enable(n: usize) -> u64 {
    1 << (2 * n)
}

/// What the users of the debug registers asked for, and the slot each one has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DebugRegs {
    /// DR0 belongs to the SYSCALL completion (the compatibility paths are on).
    syscall_slot: bool,
    /// The SYSCALL completion's breakpoint, when armed.
    syscall_bp: Option<u64>,
    /// The SYSCALL completion is stepping over a page fault.
    single_step: bool,
    /// Guest TSC sites, in the slots after the SYSCALL completion's.
    tsc_sites: Vec<u64>,
    /// Interrupt-window sites, in the slots after the TSC sites.
    window: Vec<u64>,
}

impl DebugRegs {
    /// The slots of a vCPU on which the SYSCALL completion runs (`syscall_slot`) or not.
    pub fn new(syscall_slot: bool) -> Self {
        DebugRegs {
            syscall_slot,
            ..Default::default()
        }
    }

    /// How many slots the guest TSC sites may have.
    pub fn tsc_slots(&self) -> usize {
        SLOTS - usize::from(self.syscall_slot)
    }

    /// The guest TSC sites to arm, in slot order. Sites beyond [`Self::tsc_slots`] are dropped
    /// (the caller chooses which ones fit: see [`crate::tsc`]).
    pub fn set_tsc_sites(&mut self, sites: &[u64]) {
        let n = sites.len().min(self.tsc_slots());
        self.tsc_sites = sites[..n].to_vec();
    }

    /// The interrupt-window sites to arm (empty: disarmed).
    pub fn set_window(&mut self, sites: &[u64]) {
        self.window = sites.to_vec();
    }

    /// The SYSCALL completion's breakpoint (`None`: disarmed) and whether it single-steps.
    pub fn set_syscall(&mut self, bp: Option<u64>, single_step: bool) {
        debug_assert!(self.syscall_slot || (bp.is_none() && !single_step));
        self.syscall_bp = bp;
        self.single_step = single_step;
    }

    /// The debug state for KVM, computed from what both users asked for.
    pub fn state(&self) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug {
            control: 0,
            pad: 0,
            arch: kvm_guest_debug_arch { debugreg: [0; 8] },
        };
        if self.single_step {
            dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | KVM_GUESTDBG_SINGLESTEP;
            return dbg;
        }
        let first_tsc = usize::from(self.syscall_slot);
        let syscall = self
            .syscall_bp
            .filter(|_| self.syscall_slot)
            .map(|a| (0, a));
        let tsc = self
            .tsc_sites
            .iter()
            .enumerate()
            .map(|(i, &a)| (first_tsc + i, a));
        let first_window = first_tsc + self.tsc_sites.len();
        let window = self
            .window
            .iter()
            .enumerate()
            .map(|(i, &a)| (first_window + i, a))
            .filter(|(slot, _)| *slot < SLOTS);
        let mut dr7 = 0;
        for (slot, addr) in syscall.into_iter().chain(tsc).chain(window) {
            dbg.arch.debugreg[slot] = addr;
            dr7 |= dr7_local_enable(slot);
        }
        if dr7 != 0 {
            dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[7] = DR7_FIXED | dr7;
        }
        dbg
    }

    /// Programs KVM with [`Self::state`].
    pub fn apply(&self, vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        vcpu.set_guest_debug(&self.state())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PF: u64 = 0xffff_ffff_8160_0a40;
    const SITES: [u64; 5] = [0x1000, 0x2000, 0x3000, 0x4000, 0x5000];

    #[test]
    fn nothing_asked_for_is_debugging_off() {
        let regs = DebugRegs::new(true);
        assert_eq!(regs.state().control, 0);
        assert_eq!(regs.state().arch.debugreg, [0; 8]);
    }

    #[test]
    fn syscall_completion_has_dr0_and_tsc_sites_the_rest() {
        let mut regs = DebugRegs::new(true);
        assert_eq!(regs.tsc_slots(), 3);
        regs.set_tsc_sites(&SITES);
        // Only the first three sites fit; DR0 stays free until the #PF breakpoint is armed.
        let s = regs.state();
        assert_eq!(s.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(&s.arch.debugreg[..4], &[0, 0x1000, 0x2000, 0x3000]);
        assert_eq!(s.arch.debugreg[7], 0x400 | 0b0101_0100, "L1, L2, L3");
        regs.set_syscall(Some(PF), false);
        let s = regs.state();
        assert_eq!(&s.arch.debugreg[..4], &[PF, 0x1000, 0x2000, 0x3000]);
        assert_eq!(s.arch.debugreg[7], 0x400 | 0b0101_0101, "L0..L3");
    }

    #[test]
    fn stepping_disarms_every_breakpoint() {
        let mut regs = DebugRegs::new(true);
        regs.set_tsc_sites(&SITES[..2]);
        regs.set_syscall(Some(PF), true);
        let s = regs.state();
        assert_eq!(
            s.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | KVM_GUESTDBG_SINGLESTEP
        );
        assert_eq!(s.arch.debugreg, [0; 8]);
        // The step done, both users' breakpoints come back.
        regs.set_syscall(Some(PF), false);
        assert_eq!(&regs.state().arch.debugreg[..3], &[PF, 0x1000, 0x2000]);
        assert_eq!(regs.state().arch.debugreg[7], 0x400 | 0b0001_0101);
    }

    #[test]
    fn window_sites_take_the_slots_after_the_others() {
        let mut regs = DebugRegs::new(true);
        regs.set_window(&[0x7000, 0x8000, 0x9000]);
        regs.set_syscall(Some(PF), false);
        let s = regs.state();
        assert_eq!(&s.arch.debugreg[..4], &[PF, 0x7000, 0x8000, 0x9000]);
        // With a TSC site in DR1 the last window site has no slot.
        regs.set_tsc_sites(&SITES[..1]);
        let s = regs.state();
        assert_eq!(&s.arch.debugreg[..4], &[PF, 0x1000, 0x7000, 0x8000]);
        assert_eq!(s.arch.debugreg[7], 0x400 | 0b0101_0101);
        // Stepping disarms them too.
        regs.set_syscall(Some(PF), true);
        assert_eq!(regs.state().arch.debugreg, [0; 8]);
    }

    #[test]
    fn without_the_syscall_completion_tsc_sites_have_all_four() {
        let mut regs = DebugRegs::new(false);
        assert_eq!(regs.tsc_slots(), 4);
        regs.set_tsc_sites(&SITES);
        let s = regs.state();
        assert_eq!(&s.arch.debugreg[..4], &SITES[..4]);
        assert_eq!(s.arch.debugreg[7], 0x400 | 0b0101_0101);
    }
}
