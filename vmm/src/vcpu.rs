//! The vCPU loop: run the guest, handle each synchronous exit, inject interrupts at positions,
//! keep the exit digest.
//!
//! Interrupts are injected only right after a synchronous exit (or at a kick, which is not a
//! position: see [`crate::kick`]) and only when the guest can take one; otherwise the VMM asks
//! for an interrupt window, whose opening is itself a synchronous exit.

use crate::compat::{self, CompatError, SyscallFix};
use crate::debugregs::DebugRegs;
use crate::kick::Kicker;
use crate::memory::GuestMemoryMmap;
use crate::platform::{Action, Platform};
use crate::tsc::{GuestTsc, TscError};
use crate::window::Window;
use ft_core::exit::le_bytes_to_u64;
use ft_core::{Boundary, BoundaryError, ExitDigest, ExitKind, Point, RunEnd, SyncExit};
use kvm_bindings::{kvm_debug_exit_arch, kvm_interrupt};
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;
use vmm_sys_util::ioctl::ioctl_with_ref;

/// The KVM_INTERRUPT ioctl number, for the direct `ioctl_with_ref` call that injects an interrupt. `ioctl_iow_nr!` generates a
/// `pub fn` and takes no attributes, so the function lives in this private module: it needs no
/// docs and does not become part of the crate's API.
mod ioctls {
    use kvm_bindings::kvm_interrupt;
    use vmm_sys_util::ioctl_iow_nr;

    ioctl_iow_nr!(KVM_INTERRUPT, kvm_bindings::KVMIO, 0x86, kvm_interrupt);
}
use ioctls::KVM_INTERRUPT;

/// How a run of the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The guest wrote this status to the exit port.
    ExitPort(u8),
    /// The guest halted with interrupts disabled.
    Halted,
    /// The guest asked for a reset (keyboard controller).
    Reset,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault {
        /// The guest\'s instruction pointer (guest virtual address) at the exit.
        rip: u64,
    },
    /// The VMM was asked to stop (SIGTERM or SIGINT).
    Interrupted,
    /// Replay reached the end of a recording that was stopped there.
    EndOfLog,
    /// The run reached the exit it was asked to stop at ([`Vcpu::stop_at_exit`]).
    ExitReached,
}

impl Stop {
    /// The process exit status for this stop (docs/PLATFORM.md).
    pub fn status(self) -> u8 {
        match self {
            Stop::ExitPort(s) => s,
            Stop::Halted | Stop::Reset | Stop::EndOfLog | Stop::ExitReached => 0,
            Stop::TripleFault { .. } => 1,
            Stop::Interrupted => 130,
        }
    }

    /// Whether the guest ended the run or the VMM's user did.
    pub fn ended_by(self) -> RunEnd {
        match self {
            Stop::Interrupted | Stop::ExitReached => RunEnd::Vmm,
            Stop::ExitPort(_)
            | Stop::Halted
            | Stop::Reset
            | Stop::TripleFault { .. }
            | Stop::EndOfLog => RunEnd::Guest,
        }
    }
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug)]
pub enum Event {
    /// The guest stopped.
    Stopped(Stop),
    /// The vCPU was kicked with an input due and the boundary wants a checkpoint first; call
    /// [`Vcpu::kick_inputs`] after taking it.
    Checkpoint,
    /// The log has a checkpoint here: restore it, then call [`Vcpu::kick_inputs`].
    Restore(Vec<u8>),
    /// Another thread has a request for the vCPU ([`crate::control`]); serve it, then call
    /// [`Vcpu::run`] again (a halted guest goes on waiting).
    Control,
}

/// The state of the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Runs the guest.
    Running,
    /// Stopped for good.
    Finished(Stop),
}

/// Errors of the vCPU loop.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A vCPU ioctl of the loop failed (`KVM_RUN`, register access, interrupt injection,
    /// guest debug).
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl's name, e.g. `KVM_GET_REGS`.
        what: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// The boundary failed (input, output, or a replay mismatch).
    #[error(transparent)]
    Boundary(#[from] BoundaryError),
    /// The compatibility paths failed.
    #[error(transparent)]
    Compat(#[from] CompatError),
    /// Completing a guest TSC site failed.
    #[error(transparent)]
    Tsc(TscError),
    /// An emulation failure happened with the compatibility paths off.
    #[error("KVM could not emulate the instruction at rip {rip:#x} and --kvm-compat is off")]
    EmulationFailure {
        /// The guest\'s instruction pointer (guest virtual address) at the exit.
        rip: u64,
    },
    /// KVM stopped with an exit the platform has no use for.
    #[error("unexpected VM exit {what} at rip {rip:#x}")]
    UnexpectedExit {
        /// What KVM reported.
        what: String,
        /// The guest\'s instruction pointer (guest virtual address) at the exit.
        rip: u64,
    },
}

impl From<TscError> for VcpuError {
    fn from(e: TscError) -> Self {
        match e {
            // A clock read that failed is the boundary's error (a divergence, the end of the log).
            TscError::Boundary(b) => VcpuError::Boundary(b),
            other => VcpuError::Tsc(other),
        }
    }
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
    r.map_err(|source| VcpuError::Kvm { what, source })
}

/// What one `KVM_RUN` returned, without borrowing the vCPU.
enum Exit {
    Sync {
        kind: ExitKind,
        addr: u64,
        data: u64,
        len: u8,
        action: Action,
    },
    Kick,
    Debug(kvm_debug_exit_arch),
    InternalError,
    Shutdown,
    Other(String),
}

/// The single vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    state: VcpuState,
    digest: ExitDigest,
    compat: bool,
    /// A pending interrupt asks KVM for an interrupt-window exit (the host places them
    /// exactly: [`crate::host`]); otherwise it waits for a synchronous exit or a kick.
    irq_window: bool,
    syscall_fix: Option<SyscallFix>,
    /// The guest kernel's RDTSC sites the VMM completes ([`crate::tsc`]).
    tsc: GuestTsc,
    /// DR0..DR3, shared by the SYSCALL completion and the TSC sites.
    debug: DebugRegs,
    kicks: u64,
    /// The guest executed HLT with interrupts on and is waiting for one: the next `run` waits
    /// before it enters the guest again (KVM resumes after the HLT).
    halted: bool,
    /// The interrupt-window sites ([`crate::window`]), armed for the whole run.
    window: Window,
    /// Since when (host time) an interrupt has been pending without being injected: how long
    /// it has waited for a reproducible point, for the decision at a kick (which is live only).
    pending_since: Option<std::time::Instant>,
    /// Measurement aid (FTVMM_EXIT_TRACE=path): one line per exit.
    trace: Option<(std::time::Instant, std::io::BufWriter<std::fs::File>)>,
    /// Stop once this many synchronous exits have been counted ([`Vcpu::stop_at_exit`]).
    stop_at: Option<u64>,
}

impl Vcpu {
    fn trace(&mut self, what: &str, addr: u64) {
        if self.trace.is_none() {
            return;
        }
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let run = self.fd.get_kvm_run();
        let (f, r) = (run.if_flag, run.ready_for_interrupt_injection);
        if let Some((t0, w)) = &mut self.trace {
            use std::io::Write;
            let _ = writeln!(
                w,
                "{} {what} {addr:#x} {rip:#x} {f} {r}",
                t0.elapsed().as_nanos()
            );
        }
    }

    /// Wraps a configured vCPU. Its debug registers are programmed by the first
    /// [`Vcpu::reapply_debug`].
    pub fn new(fd: VcpuFd, compat: bool, irq_window: bool, tsc: GuestTsc, window: Window) -> Self {
        let mut debug = DebugRegs::new(compat);
        debug.set_tsc_sites(&tsc.addresses());
        debug.set_window(&window.addresses());
        Vcpu {
            fd,
            state: VcpuState::Running,
            digest: ExitDigest::new(),
            compat,
            irq_window,
            syscall_fix: compat.then(SyscallFix::default),
            tsc,
            debug,
            kicks: 0,
            stop_at: None,
            halted: false,
            window,
            pending_since: None,
            trace: std::env::var_os("FTVMM_EXIT_TRACE").and_then(|p| {
                Some((
                    std::time::Instant::now(),
                    std::io::BufWriter::new(std::fs::File::create(p).ok()?),
                ))
            }),
        }
    }

    /// The interrupt-window sites and their counters.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// Whether the guest is halted waiting for an interrupt (part of a snapshot).
    pub fn halted(&self) -> bool {
        self.halted
    }

    /// Restores the halted state from a snapshot.
    pub fn set_halted(&mut self, halted: bool) {
        self.halted = halted;
    }

    /// Stops the run once `count` synchronous exits have been counted (the numbering of the
    /// digest line and of a divergence report, restored exits included): a point in the
    /// instruction stream that does not depend on the host, where a snapshot or a look at the
    /// guest is the same on every run of a deterministic execution.
    pub fn stop_at_exit(&mut self, count: Option<u64>) {
        self.stop_at = count;
    }

    /// The digest over the synchronous exits so far.
    pub fn digest(&self) -> &ExitDigest {
        &self.digest
    }

    /// The state.
    pub fn state(&self) -> VcpuState {
        self.state
    }

    /// The vCPU fd, for saving and restoring state.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// How many times the vCPU was kicked.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// The SYSCALL completion's counters, when the compatibility paths are on.
    pub fn syscall_fix(&self) -> Option<&SyscallFix> {
        self.syscall_fix.as_ref()
    }

    /// The guest TSC sites and their counters.
    pub fn tsc(&self) -> &GuestTsc {
        &self.tsc
    }

    /// Runs the guest until it stops or the VMM must act on the whole VM (a checkpoint).
    pub fn run(
        &mut self,
        platform: &mut Platform,
        mem: &GuestMemoryMmap,
        boundary: &mut dyn Boundary,
        kicker: &Kicker,
        attention: &dyn Fn() -> bool,
    ) -> Result<Event, VcpuError> {
        while self.state == VcpuState::Running {
            if kicker.stop_requested() {
                self.finish(Stop::Interrupted);
                break;
            }
            if self.stop_at.is_some_and(|n| self.digest.count() >= n) {
                self.finish(Stop::ExitReached);
                break;
            }
            if attention() {
                return Ok(Event::Control);
            }
            if self.halted {
                match self.halt(platform, boundary) {
                    Err(VcpuError::Boundary(BoundaryError::Interrupted)) => continue,
                    other => other?,
                }
                if self.state == VcpuState::Running {
                    self.after_exit(platform, mem, boundary)?;
                }
                continue;
            }
            if let Some(data) = boundary.pending_checkpoint()? {
                return Ok(Event::Restore(data));
            }
            kicker.enter();
            let exit = self.run_once(platform, mem, boundary);
            kicker.leave();
            match exit? {
                Exit::Sync {
                    kind,
                    addr,
                    data,
                    len,
                    action,
                } => {
                    self.trace(&format!("k{}", kind as u8), addr);
                    let rip = kvm("KVM_GET_REGS", self.fd.get_regs())?.rip;
                    if kind == ExitKind::Hlt && self.tsc.is_patched_hlt(rip) {
                        self.patched_tsc(rip, platform, boundary)?;
                        continue;
                    }
                    self.synchronous(
                        SyncExit {
                            kind,
                            addr,
                            data,
                            len,
                            rip,
                        },
                        boundary,
                    )?;
                    platform.flush_output(boundary)?;
                    match action {
                        Action::Continue => {}
                        Action::Exit(status) => self.finish(Stop::ExitPort(status)),
                        Action::Reset => self.finish(Stop::Reset),
                    }
                    if kind == ExitKind::Hlt && self.state == VcpuState::Running {
                        if self.fd.get_kvm_run().if_flag == 0 {
                            self.finish(Stop::Halted);
                        } else {
                            self.halted = true;
                            // A wait cut short by a request resumes at the top of the loop.
                            continue;
                        }
                    }
                    if self.state == VcpuState::Running {
                        self.after_exit(platform, mem, boundary)?;
                    }
                }
                Exit::Kick => {
                    self.trace("kick", 0);
                    self.kicks += 1;
                    // Where a guest computes without exits, sampled at kicks: enable with
                    // `--log-level warn,ftvmm::profile=trace` (docs/STOCK-KERNELS.md).
                    if tracing::enabled!(target: "ftvmm::profile", tracing::Level::TRACE) {
                        if let Ok(regs) = self.fd.get_regs() {
                            tracing::trace!(target: "ftvmm::profile", "kick rip={:#x}", regs.rip);
                        }
                    }
                    if boundary.acts_at_kicks() {
                        // Without exact interrupt windows (see `exact_irq_window`), a pending
                        // interrupt also waits for a point like this one.
                        let injectable = platform.interrupt_pending() && self.interruptible();
                        // Ticks owed to a guest that is behind (reinjection) are catch-up:
                        // they wait for a reproducible point rather than cost a checkpoint
                        // each (a fresh deadline still can, through `kick_due`).
                        let waiting = self
                            .pending_since
                            .filter(|_| injectable && !platform.ticks_owed())
                            .map(|t| t.elapsed());
                        if boundary.kick_due(&platform.wait_request(), waiting)? {
                            if boundary.wants_checkpoints() {
                                return Ok(Event::Checkpoint);
                            }
                            self.kick_inputs(platform, mem, boundary)?;
                        }
                    }
                }
                Exit::Debug(arch) if !self.stepping() && self.window.site(arch.pc).is_some() => {
                    self.trace("win", arch.pc);
                    self.window_hit(arch.pc, platform, mem, boundary)?;
                }
                Exit::Debug(arch) => {
                    self.trace("debug", arch.pc);
                    // A TSC site, unless the SYSCALL completion is stepping (all breakpoints
                    // are off then: the exit is its step).
                    let stepping = self.syscall_fix.as_ref().is_some_and(SyscallFix::stepping);
                    let mut exit = None;
                    if !stepping {
                        let mut now = || {
                            let t = boundary.read_clock()?;
                            platform.advance_time(t);
                            Ok(platform.now_ns())
                        };
                        exit = self.tsc.complete(&self.fd, mem, arch.pc, &mut now)?;
                    }
                    if let (None, Some(fix)) = (exit, &mut self.syscall_fix) {
                        exit = fix.on_debug(&self.fd, mem, &arch, &mut self.debug)?;
                    }
                    let Some(exit) = exit else {
                        return Err(VcpuError::UnexpectedExit {
                            what: format!("debug exception {} dr6={:#x}", arch.exception, arch.dr6),
                            rip: arch.pc,
                        });
                    };
                    self.synchronous(exit, boundary)?;
                    // The VMM changed the vCPU's registers: KVM's view of interruptibility
                    // is stale, so pending interrupts wait for a window.
                    self.inputs(Point::Exit, platform, boundary, false)?;
                }
                Exit::InternalError => {
                    if !self.compat {
                        let rip = kvm("KVM_GET_REGS", self.fd.get_regs())?.rip;
                        return Err(VcpuError::EmulationFailure { rip });
                    }
                    let exit = compat::complete_emulation_failure(&mut self.fd, mem)?;
                    self.synchronous(exit, boundary)?;
                    self.inputs(Point::Exit, platform, boundary, false)?;
                }
                Exit::Shutdown => {
                    let rip = kvm("KVM_GET_REGS", self.fd.get_regs())?.rip;
                    self.finish(Stop::TripleFault { rip });
                }
                Exit::Other(what) => {
                    let rip = kvm("KVM_GET_REGS", self.fd.get_regs())?.rip;
                    return Err(VcpuError::UnexpectedExit { what, rip });
                }
            }
        }
        match self.state {
            VcpuState::Finished(stop) => Ok(Event::Stopped(stop)),
            VcpuState::Running => unreachable!("the loop runs until the vCPU finishes"),
        }
    }

    /// Whether KVM's interrupt-window exit comes at the first instruction where the guest can
    /// take an interrupt, as VMX and SVM make it on hardware. The probe decides
    /// ([`crate::host`]): the development hosts' paravirtual KVM places it wherever it next
    /// looks (two identical Linux boots diverged at the first window exit, at RIPs that were
    /// not even instruction boundaries), and a `kvm_amd` under QEMU 7.2's TCG opens it inside
    /// an `STI` shadow when the guest left KVM there (docs/HARDWARE.md).
    fn exact_irq_window(&self) -> bool {
        self.irq_window
    }

    /// A `HLT` that `--guest-tsc patch` put in place of an `RDTSC` (RIP past it): completed
    /// like a breakpoint on the site, and the same synchronous exit.
    fn patched_tsc(
        &mut self,
        rip_after: u64,
        platform: &mut Platform,
        boundary: &mut dyn Boundary,
    ) -> Result<(), VcpuError> {
        let mut now = || {
            let t = boundary.read_clock()?;
            platform.advance_time(t);
            Ok(platform.now_ns())
        };
        let Some(exit) = self.tsc.complete_hlt(&self.fd, rip_after, &mut now)? else {
            return Ok(());
        };
        self.synchronous(exit, boundary)?;
        // The VMM changed RAX, RDX (ECX) and RIP only: IF and the interrupt shadow are as KVM
        // saw them at the HLT, so a pending interrupt can be injected here. It must: a guest
        // that loops over RDTSC with interrupts on (try_to_generate_entropy(), waiting for
        // timer jitter before its CRNG is ready) exits at every read, is never kicked, and
        // would otherwise never get the timer interrupt it waits for (measured: mke2fs stalled
        // with ~1500 reads a second and 149 timer interrupts in 90 s).
        self.inputs(Point::Exit, platform, boundary, true)?;
        Ok(())
    }

    /// Whether the SYSCALL completion is single-stepping (every breakpoint is off then).
    fn stepping(&self) -> bool {
        self.syscall_fix.as_ref().is_some_and(SyscallFix::stepping)
    }

    /// A hit of an interrupt-window site at `pc`: a synchronous exit where the inputs due are
    /// delivered and a pending interrupt is injected if the guest can take it. The VMM
    /// executes the site's first instruction ([`crate::window::Step`]): the breakpoint would
    /// fire again if the guest resumed on it. KVM's view of interruptibility is the one at the
    /// site, and a jump, a register move or a no-op does not change it.
    fn window_hit(
        &mut self,
        pc: u64,
        platform: &mut Platform,
        mem: &GuestMemoryMmap,
        boundary: &mut dyn Boundary,
    ) -> Result<(), VcpuError> {
        let Some(step) = self.window.site(pc).map(|s| s.step) else {
            return Ok(());
        };
        self.window.hits += 1;
        self.synchronous(Window::exit(pc), boundary)?;
        let mut regs = kvm("KVM_GET_REGS", self.fd.get_regs())?;
        let sregs = if step.touches_memory() {
            Some(kvm("KVM_GET_SREGS", self.fd.get_sregs())?)
        } else {
            None
        };
        step.apply(&mut regs, mem, sregs.as_ref())
            .map_err(|why| VcpuError::UnexpectedExit {
                what: format!("interrupt-window site: cannot execute its first instruction: {why}"),
                rip: pc,
            })?;
        // The instruction completed: RF is clear after it, as after any other.
        regs.rflags &= !(1 << 16);
        kvm("KVM_SET_REGS", self.fd.set_regs(&regs))?;
        let injected = self.inputs(Point::Exit, platform, boundary, true)?;
        if injected {
            self.window.injections += 1;
        }
        Ok(())
    }

    /// Whether the guest can take an interrupt now, by KVM's account at the last exit.
    fn interruptible(&mut self) -> bool {
        let run = self.fd.get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    /// Delivers the inputs due at a kick (after the checkpoint that makes the point
    /// reproducible, when there is one). The breakpoints follow the guest here too: a replay
    /// that restores the checkpoint computes them from the restored state, so the recording
    /// must have them from the same state.
    pub fn kick_inputs(
        &mut self,
        platform: &mut Platform,
        mem: &GuestMemoryMmap,
        boundary: &mut dyn Boundary,
    ) -> Result<(), VcpuError> {
        self.follow_debug(mem)?;
        self.inputs(Point::Kick, platform, boundary, true)?;
        Ok(())
    }

    /// Completes a pending port or MMIO read (KVM finishes it on the next entry) without running
    /// the guest further, so that the registers are the whole truth: run once with
    /// `immediate_exit` set.
    pub fn settle(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run();
        let outcome = match r {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(source) => Err(VcpuError::Kvm {
                what: "KVM_RUN (immediate exit)",
                source,
            }),
            Ok(exit) => Err(VcpuError::UnexpectedExit {
                what: format!("{exit:?} while settling"),
                rip: 0,
            }),
        };
        self.fd.set_kvm_immediate_exit(0);
        outcome
    }

    /// What kvm_run says about interrupts: (request_interrupt_window, if_flag,
    /// ready_for_interrupt_injection). The last two are KVM's view at the last exit; the VMM's
    /// injection decision depends on them, so a checkpoint carries them.
    pub fn interrupt_flags(&mut self) -> [u8; 3] {
        let run = self.fd.get_kvm_run();
        [
            run.request_interrupt_window,
            run.if_flag,
            run.ready_for_interrupt_injection,
        ]
    }

    /// Restores the digest, the interrupt flags and the compatibility state from a snapshot.
    pub fn restore_extra(&mut self, digest: ExitDigest, flags: [u8; 3], fix: Option<SyscallFix>) {
        self.digest = digest;
        let run = self.fd.get_kvm_run();
        run.request_interrupt_window = flags[0];
        run.if_flag = flags[1];
        run.ready_for_interrupt_injection = flags[2];
        if let (Some(mine), Some(theirs)) = (self.syscall_fix.as_mut(), fix) {
            *mine = theirs;
        }
    }

    /// `--guest-tsc patch`: puts `HLT` over the guest TSC sites in RAM, when the kernel is
    /// loaded (`boot`) and after a restore ([`GuestTsc::patch`]).
    pub fn patch_guest(&mut self, mem: &GuestMemoryMmap, boot: bool) {
        self.tsc.patch(mem, boot);
    }

    /// Programs the debug registers (the TSC sites and the SYSCALL completion's breakpoint) into
    /// KVM: when the VM is built, and after a restore, once [`Vcpu::restore_extra`] has put back
    /// the completion's state and RAM is restored.
    pub fn reapply_debug(&mut self, mem: &GuestMemoryMmap) -> Result<(), VcpuError> {
        self.tsc.follow(mem);
        self.debug.set_tsc_sites(&self.tsc.addresses());
        match &mut self.syscall_fix {
            Some(fix) => fix.reapply(&self.fd, mem, &mut self.debug)?,
            None => kvm("KVM_SET_GUEST_DEBUG", self.debug.apply(&self.fd))?,
        }
        Ok(())
    }

    fn finish(&mut self, stop: Stop) {
        self.state = VcpuState::Finished(stop);
    }

    fn synchronous(
        &mut self,
        exit: SyncExit,
        boundary: &mut dyn Boundary,
    ) -> Result<(), VcpuError> {
        tracing::trace!(n = self.digest.count(), "{exit}");
        boundary.exit(&exit)?;
        self.digest.add(&exit);
        Ok(())
    }

    /// One `KVM_RUN`, with the device access of the exit already done.
    fn run_once(
        &mut self,
        platform: &mut Platform,
        mem: &GuestMemoryMmap,
        boundary: &mut dyn Boundary,
    ) -> Result<Exit, VcpuError> {
        let sync = |kind, addr, data: &[u8], action| Exit::Sync {
            kind,
            addr,
            data: le_bytes_to_u64(data),
            len: data.len() as u8,
            action,
        };
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                platform.pio_read(port, data, boundary)?;
                Ok(sync(
                    ExitKind::PioIn,
                    u64::from(port),
                    data,
                    Action::Continue,
                ))
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let action = platform.pio_write(port, data, boundary)?;
                Ok(sync(ExitKind::PioOut, u64::from(port), data, action))
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                platform.mmio_read(addr, data, mem);
                Ok(sync(ExitKind::MmioRead, addr, data, Action::Continue))
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                platform.mmio_write(addr, data, mem);
                Ok(sync(ExitKind::MmioWrite, addr, data, Action::Continue))
            }
            Ok(VcpuExit::Hlt) => Ok(sync(ExitKind::Hlt, 0, &[], Action::Continue)),
            Ok(VcpuExit::IrqWindowOpen) => Ok(sync(ExitKind::IrqWindow, 0, &[], Action::Continue)),
            Ok(VcpuExit::Intr) => Ok(Exit::Kick),
            Ok(VcpuExit::Debug(arch)) => Ok(Exit::Debug(arch)),
            Ok(VcpuExit::InternalError) => Ok(Exit::InternalError),
            Ok(VcpuExit::Shutdown) => Ok(Exit::Shutdown),
            Ok(other) => Ok(Exit::Other(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Exit::Kick),
            Err(source) => Err(VcpuError::Kvm {
                what: "KVM_RUN",
                source,
            }),
        }
    }

    /// After a synchronous exit (and the halt it began, if any): follow the guest for the TSC
    /// sites and the compatibility paths, deliver the inputs due, inject.
    fn after_exit(
        &mut self,
        platform: &mut Platform,
        mem: &GuestMemoryMmap,
        boundary: &mut dyn Boundary,
    ) -> Result<(), VcpuError> {
        self.follow_debug(mem)?;
        self.inputs(Point::Exit, platform, boundary, true)?;
        Ok(())
    }

    /// Moves the breakpoints with the guest: the TSC site that shares a register during boot,
    /// and the SYSCALL completion's #PF entry. Only at points a replay finds again (synchronous
    /// exits, checkpoints); a restore recomputes them from the restored state.
    fn follow_debug(&mut self, mem: &GuestMemoryMmap) -> Result<(), VcpuError> {
        if self.tsc.follow(mem) {
            self.debug.set_tsc_sites(&self.tsc.addresses());
            kvm("KVM_SET_GUEST_DEBUG", self.debug.apply(&self.fd))?;
        }
        if let Some(fix) = &mut self.syscall_fix {
            fix.follow_guest(&self.fd, mem, &mut self.debug)?;
        }
        Ok(())
    }

    /// The guest is halted with interrupts on: wait for inputs until an interrupt is pending.
    /// A wait cut short by a control request returns `Interrupted` with the vCPU still halted.
    fn halt(
        &mut self,
        platform: &mut Platform,
        boundary: &mut dyn Boundary,
    ) -> Result<(), VcpuError> {
        while !platform.interrupt_pending() {
            let req = platform.wait_request();
            tracing::trace!("halted: {req:?}");
            let input = boundary.wait(&req)?;
            platform.apply(input);
        }
        self.halted = false;
        Ok(())
    }

    /// Delivers the inputs due at this point, then injects a pending interrupt if the guest can
    /// take it (and `may_inject`), or asks for an interrupt window.
    fn inputs(
        &mut self,
        point: Point,
        platform: &mut Platform,
        boundary: &mut dyn Boundary,
        may_inject: bool,
    ) -> Result<bool, VcpuError> {
        while let Some(input) = boundary.poll(point, &platform.wait_request())? {
            platform.apply(input);
        }
        let stepping = self.syscall_fix.as_ref().is_some_and(SyscallFix::stepping);
        let exact_window = self.exact_irq_window();
        let interruptible = self.interruptible();
        if !platform.interrupt_pending() {
            self.pending_since = None;
        } else if self.pending_since.is_none() {
            self.pending_since = Some(std::time::Instant::now());
        }
        let run = self.fd.get_kvm_run();
        if !platform.interrupt_pending() || stepping {
            // While stepping over a page fault, an open window would exit at once, forever.
            run.request_interrupt_window = 0;
            return Ok(false);
        }
        if !may_inject || !interruptible {
            // Wait for the window to open: an exit of its own where KVM places it exactly, or
            // else the next synchronous exit (or kick) at which the guest is interruptible.
            run.request_interrupt_window = u8::from(exact_window);
            return Ok(false);
        }
        run.request_interrupt_window = 0;
        let Some(vector) = platform.acknowledge() else {
            return Ok(false);
        };
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one `struct kvm_interrupt`, which `irq` is, from a vCPU fd.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(VcpuError::Kvm {
                what: "KVM_INTERRUPT",
                source: kvm_ioctls::Error::last(),
            });
        }
        boundary.interrupt(vector)?;
        self.pending_since = None;
        self.trace("inj", u64::from(vector));
        Ok(true)
    }
}
