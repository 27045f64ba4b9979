//! What the KVM under ftvmm can do, found by running tiny guests, not assumed from its name.
//!
//! ftvmm's mechanisms lean on KVM behaviour that differs between hosts (docs/HARDWARE.md): the
//! paravirtual nested KVM of the development machines emulates guest kernel code and stops on
//! some instructions; a stock `kvm_amd` inside QEMU's TCG drops the interrupt shadow when it
//! re-enters a guest and ignores the debug registers a VMRUN loads; hardware `kvm_intel` and
//! `kvm_amd` do neither. [`probe`] runs one small guest per question (a few milliseconds each)
//! and [`HostCaps`] holds the answers; [`Mechanisms`] is what a run chooses from them and what
//! its log header records, so that a replay or a backup on another host can tell whether that
//! host can honour the recording.
//!
//! Each guest runs in 64-bit mode at CPL0 or CPL3 in 4 MiB of RAM (identity-mapped with two
//! 2 MiB pages), as `tools/kvm-probe` of the development notes did in Python.

use crate::config::{CompatMode, IrqWindowMode};
use kvm_bindings::{
    kvm_guest_debug, kvm_segment, kvm_userspace_memory_region, Msrs, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;
use thiserror::Error;

/// A host that cannot give what a run asked for.
#[derive(Debug, Error)]
pub enum HostError {
    /// Interrupt-window exits were asked for on a host that does not place them exactly.
    #[error("{what} uses interrupt-window exits as positions, and this host's KVM ({kvm}) does not place them exactly: {detail}")]
    IrqWindow {
        /// The run or recording that asked.
        what: String,
        /// This host's KVM.
        kvm: String,
        /// The probe's finding.
        detail: String,
    },
    /// Breakpoints were asked for on a host where they do not fire.
    #[error("{what} needs hardware breakpoints in guest kernel code, and they do not fire on this host's KVM ({kvm}): {detail}")]
    Breakpoints {
        /// The run or recording that asked.
        what: String,
        /// This host's KVM.
        kvm: String,
        /// The probe's finding.
        detail: String,
    },
}

/// One answer of the probe: whether the host does it, and what was seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Whether it works as ftvmm needs it.
    pub ok: bool,
    /// What the guest did, for a person.
    pub detail: String,
}

impl Finding {
    fn new(ok: bool, detail: impl Into<String>) -> Self {
        Finding {
            ok,
            detail: detail.into(),
        }
    }
}

/// What this host's KVM gives, as the probe found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCaps {
    /// The KVM module loaded (`kvm_pvm`, `kvm_amd`, `kvm_intel`), and the CPU vendor.
    pub kvm: String,
    /// Interrupt-window exits come at the first instruction where the guest can take an
    /// interrupt, also when the guest left KVM inside an interrupt shadow.
    pub exact_irq_window: Finding,
    /// Hardware execute breakpoints fire in guest kernel code (CPL0).
    pub breakpoints_cpl0: Finding,
    /// Hardware execute breakpoints fire in guest user code (CPL3).
    pub breakpoints_cpl3: Finding,
    /// Single-step works in guest kernel code.
    pub single_step_cpl0: Finding,
    /// Single-step works in guest user code.
    pub single_step_cpl3: Finding,
    /// KVM's dirty page log sees guest writes.
    pub dirty_log: Finding,
    /// KVM runs every instruction of guest kernel code (POPCNT and FNCLEX tried): where it
    /// does not, the compatibility paths complete them.
    pub complete_emulation: Finding,
    /// `SYSCALL` from user mode enters the kernel at CPL0.
    pub syscall: Finding,
    /// A hardware counter of retired branches can be opened for the vCPU thread
    /// (`perf_event_open`): what exact asynchronous positions would need (docs/HARDWARE.md).
    pub branch_counter: Finding,
    /// How long the probe took, in milliseconds.
    pub probe_ms: u64,
}

impl HostCaps {
    /// Whether the compatibility paths ([`crate::compat`]) have something to complete here.
    pub fn needs_compat(&self) -> bool {
        !self.complete_emulation.ok || !self.syscall.ok
    }

    /// The findings as `name: yes|no (detail)` lines.
    pub fn lines(&self) -> Vec<String> {
        let f = |name: &str, f: &Finding| {
            format!(
                "{name:<22} {} ({})",
                if f.ok { "yes" } else { "no" },
                f.detail
            )
        };
        vec![
            format!("{:<22} {}", "kvm", self.kvm),
            f("exact irq windows", &self.exact_irq_window),
            f("breakpoints cpl0", &self.breakpoints_cpl0),
            f("breakpoints cpl3", &self.breakpoints_cpl3),
            f("single-step cpl0", &self.single_step_cpl0),
            f("single-step cpl3", &self.single_step_cpl3),
            f("dirty log", &self.dirty_log),
            f("complete emulation", &self.complete_emulation),
            f("syscall", &self.syscall),
            f("branch counter", &self.branch_counter),
            format!("{:<22} {} ms", "probe time", self.probe_ms),
        ]
    }

    /// The mechanisms a new run (standalone, primary, backup) uses on this host.
    pub fn choose(
        &self,
        compat: CompatMode,
        irq_window: IrqWindowMode,
    ) -> Result<Mechanisms, HostError> {
        let compat = match compat {
            CompatMode::On => true,
            CompatMode::Off => false,
            CompatMode::Auto => self.needs_compat(),
        };
        let irq_window = match irq_window {
            IrqWindowMode::Off => false,
            IrqWindowMode::Auto => self.exact_irq_window.ok,
            IrqWindowMode::On => true,
        };
        let m = Mechanisms {
            compat,
            irq_window,
            breakpoints: self.breakpoints_cpl0.ok,
        };
        self.honours(&m, "--irq-window on")?;
        Ok(m)
    }

    /// Whether this host can run `m` exactly as it was recorded (`what` names the recording).
    pub fn honours(&self, m: &Mechanisms, what: &str) -> Result<(), HostError> {
        if m.irq_window && !self.exact_irq_window.ok {
            return Err(HostError::IrqWindow {
                what: what.to_string(),
                kvm: self.kvm.clone(),
                detail: self.exact_irq_window.detail.clone(),
            });
        }
        if m.breakpoints && !self.breakpoints_cpl0.ok {
            return Err(HostError::Breakpoints {
                what: what.to_string(),
                kvm: self.kvm.clone(),
                detail: self.breakpoints_cpl0.detail.clone(),
            });
        }
        Ok(())
    }
}

pub use ft_core::log::Mechanisms;

/// This host's findings as a status document shows them: the KVM and, per question, whether
/// the host gives it (`ftvmm probe` has the details).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostStatus {
    /// The KVM module loaded and the CPU vendor ([`HostCaps::kvm`]).
    pub kvm: String,
    /// [`HostCaps::exact_irq_window`].
    pub exact_irq_window: bool,
    /// [`HostCaps::breakpoints_cpl0`].
    pub breakpoints_cpl0: bool,
    /// [`HostCaps::breakpoints_cpl3`].
    pub breakpoints_cpl3: bool,
    /// [`HostCaps::single_step_cpl0`].
    pub single_step_cpl0: bool,
    /// [`HostCaps::single_step_cpl3`].
    pub single_step_cpl3: bool,
    /// [`HostCaps::dirty_log`].
    pub dirty_log: bool,
    /// [`HostCaps::complete_emulation`].
    pub complete_emulation: bool,
    /// [`HostCaps::syscall`].
    pub syscall: bool,
    /// [`HostCaps::branch_counter`].
    pub branch_counter: bool,
}

/// This host's findings for a status document ([`HostStatus`]).
pub fn status() -> HostStatus {
    let c = caps();
    HostStatus {
        kvm: c.kvm.clone(),
        exact_irq_window: c.exact_irq_window.ok,
        breakpoints_cpl0: c.breakpoints_cpl0.ok,
        breakpoints_cpl3: c.breakpoints_cpl3.ok,
        single_step_cpl0: c.single_step_cpl0.ok,
        single_step_cpl3: c.single_step_cpl3.ok,
        dirty_log: c.dirty_log.ok,
        complete_emulation: c.complete_emulation.ok,
        syscall: c.syscall.ok,
        branch_counter: c.branch_counter.ok,
    }
}

/// This host's capabilities: probed once per boot of the host and per ftvmm binary (kept
/// under /run/ftvmm, a tmpfs that a reboot empties: a module reloaded with other parameters
/// needs `ftvmm probe`, which always probes afresh and refreshes it), once per process.
pub fn caps() -> &'static HostCaps {
    static CAPS: OnceLock<HostCaps> = OnceLock::new();
    CAPS.get_or_init(|| {
        let cached = cache_path().and_then(|p| {
            let caps: HostCaps = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
            tracing::info!(
                "host (probed earlier in this boot): {}",
                caps.lines().join("; ")
            );
            Some(caps)
        });
        cached.unwrap_or_else(probe)
    })
}

/// Where this boot's findings for this binary are kept.
fn cache_path() -> Option<std::path::PathBuf> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let exe = std::fs::metadata(std::env::current_exe().ok()?).ok()?;
    let mtime = exe
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    let key = format!("{}-{}-{mtime}", boot.trim(), exe.len());
    Some(Path::new("/run/ftvmm").join(format!("host-{:016x}.json", fnv64(key.as_bytes()))))
}

/// A 64-bit FNV-1a hash (a file name, not a security boundary).
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn save(caps: &HostCaps) {
    let Some(path) = cache_path() else { return };
    let Ok(json) = serde_json::to_vec(caps) else {
        return;
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::create_dir_all("/run/ftvmm");
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// Runs every probe (on a thread of its own, so that a guest that never exits is interrupted
/// rather than hanging the VMM).
pub fn probe() -> HostCaps {
    let start = std::time::Instant::now();
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(run_probes());
    });
    let thread = {
        use std::os::unix::thread::JoinHandleExt;
        worker.as_pthread_t()
    };
    let _ = vmm_sys_util::signal::register_signal_handler(crate::kick::kick_signal(), on_signal);
    let mut caps = loop {
        match rx.recv_timeout(Duration::from_millis(2000)) {
            Ok(caps) => break caps,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // A guest that did not exit: interrupt its KVM_RUN (it reports no exit).
                // SAFETY: the thread is alive until it has sent its result; the signal's
                // handler does nothing, so it only makes KVM_RUN return EINTR.
                unsafe { libc::pthread_kill(thread, crate::kick::kick_signal()) };
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break unusable("the probe thread panicked")
            }
        }
    };
    let _ = worker.join();
    caps.probe_ms = start.elapsed().as_millis() as u64;
    tracing::info!("host: {}", caps.lines().join("; "));
    if caps.dirty_log.ok {
        // A probe that could not run its guests is not kept: the next run tries again.
        save(&caps);
    }
    caps
}

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn unusable(why: &str) -> HostCaps {
    let no = || Finding::new(false, why);
    HostCaps {
        kvm: kvm_module(),
        exact_irq_window: no(),
        breakpoints_cpl0: no(),
        breakpoints_cpl3: no(),
        single_step_cpl0: no(),
        single_step_cpl3: no(),
        dirty_log: no(),
        complete_emulation: no(),
        syscall: no(),
        branch_counter: branch_counter(),
        probe_ms: 0,
    }
}

fn run_probes() -> HostCaps {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => return unusable(&format!("cannot open /dev/kvm: {e}")),
    };
    let attempt = |f: &dyn Fn(&Kvm) -> Result<Finding, String>| {
        f(&kvm).unwrap_or_else(|e| Finding::new(false, format!("probe failed: {e}")))
    };
    HostCaps {
        kvm: kvm_module(),
        exact_irq_window: attempt(&irq_window),
        breakpoints_cpl0: attempt(&|k| breakpoint(k, 0)),
        breakpoints_cpl3: attempt(&|k| breakpoint(k, 3)),
        single_step_cpl0: attempt(&|k| single_step(k, 0)),
        single_step_cpl3: attempt(&|k| single_step(k, 3)),
        dirty_log: attempt(&dirty_log),
        complete_emulation: attempt(&emulation),
        syscall: attempt(&syscall),
        branch_counter: branch_counter(),
        probe_ms: 0,
    }
}

/// The KVM module and the CPU vendor.
fn kvm_module() -> String {
    let module = ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .unwrap_or("kvm (module unknown)");
    let id = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    // The hypervisor this host itself runs under, if any (CPUID.1:ECX bit 31, then the
    // signature of leaf 0x40000000: "TCGTCGTCGTCG" for QEMU's TCG, "KVMKVMKVM" for KVM).
    let nested = if std::arch::x86_64::__cpuid(1).ecx >> 31 == 1 {
        let hv = std::arch::x86_64::__cpuid(0x4000_0000);
        let sig: Vec<u8> = [hv.ebx, hv.ecx, hv.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .filter(|b| b.is_ascii_graphic())
            .collect();
        format!(", itself a guest of {:?}", String::from_utf8_lossy(&sig))
    } else {
        String::new()
    };
    format!("{module} on {}{nested}", String::from_utf8_lossy(&vendor))
}

/// Guest RAM of a probe guest.
const MEM: usize = 4 << 20;
const GDT: u64 = 0x5000;
const TSS: u64 = 0x6000;
const IDT: u64 = 0x7000;
const CODE: u64 = 0x10_0000;
const STACK: u64 = 0x8_0000;

/// One probe guest: a vCPU in long mode, its VM, its RAM (dropped in this order: the RAM
/// outlives the VM that maps it).
struct Guest {
    vcpu: VcpuFd,
    vm_fd: VmFd,
    mem: Ram,
}

/// The anonymous mapping of a probe guest's RAM.
struct Ram(*mut u8);

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: the mapping of MEM bytes made in `Guest::new`, unmapped once.
        unsafe { libc::munmap(self.0.cast(), MEM) };
    }
}

/// What one `KVM_RUN` of a probe guest ended with.
#[derive(Debug, PartialEq, Eq)]
enum Ran {
    Io(u16),
    Hlt,
    Debug(u64),
    Window,
    Shutdown,
    Internal,
    Interrupted,
    Other(String),
}

impl Guest {
    fn new(kvm: &Kvm, cpl: u8, dirty_log: bool) -> Result<Guest, String> {
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        // SAFETY: an anonymous private mapping of MEM bytes; checked below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err("cannot map the probe guest's RAM".into());
        }
        let ram = Ram(mem.cast());
        let mut g = Guest {
            vcpu: vm
                .create_vcpu(0)
                .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?,
            vm_fd: vm,
            mem: ram,
        };
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: g.mem.0 as u64,
        };
        // SAFETY: the region is the mapping above, which outlives the VM (`Guest`'s fields
        // drop in order: the vCPU, the VM, then the RAM).
        unsafe { g.vm_fd.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        // Page tables: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000, two 2 MiB pages, user-accessible.
        g.put_u64(0x1000, 0x2000 | 7);
        g.put_u64(0x2000, 0x3000 | 7);
        g.put_u64(0x3000, 0x87);
        g.put_u64(0x3008, (1 << 21) | 0x87);
        let desc = |base: u64, limit: u32, access: u8, flags: u8| -> u64 {
            u64::from(limit & 0xffff)
                | ((base & 0xff_ffff) << 16)
                | (u64::from(access) << 40)
                | (u64::from((limit >> 16) & 0xf) << 48)
                | (u64::from(flags) << 52)
                | (((base >> 24) & 0xff) << 56)
        };
        let gdt = [
            0,
            desc(0, 0xfffff, 0x9a, 0xa), // 0x08 kernel code
            desc(0, 0xfffff, 0x92, 0xc), // 0x10 kernel data
            desc(0, 0xfffff, 0xf2, 0xc), // 0x18 user data
            desc(0, 0xfffff, 0xfa, 0xa), // 0x20 user code
            desc(TSS, 0x67, 0x89, 0),    // 0x28 TSS
            0,
        ];
        for (i, d) in gdt.iter().enumerate() {
            g.put_u64(GDT + 8 * i as u64, *d);
        }
        g.put_u64(TSS + 4, 0x9_0000); // RSP0
        let mut sregs = g
            .vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        let seg = |selector: u16, type_: u8, dpl: u8, db: u8, l: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl,
            db,
            s: 1,
            l,
            g: 1,
            ..Default::default()
        };
        let (code, data) = if cpl == 3 {
            (seg(0x23, 11, 3, 0, 1), seg(0x1b, 3, 3, 1, 0))
        } else {
            (seg(0x08, 11, 0, 0, 1), seg(0x10, 3, 0, 1, 0))
        };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_segment {
            base: TSS,
            limit: 0x67,
            selector: 0x28,
            type_: 11,
            present: 1,
            ..Default::default()
        };
        sregs.gdt.base = GDT;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.idt.base = IDT;
        sregs.idt.limit = 0xfff;
        sregs.cr0 = 0x8000_0031;
        sregs.cr3 = 0x1000;
        sregs.cr4 = 0x20;
        sregs.efer = 0x501;
        g.vcpu
            .set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        Ok(g)
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        assert!(at as usize + bytes.len() <= MEM);
        // SAFETY: in bounds of the mapping (checked above); the guest is not running.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.mem.0.add(at as usize), bytes.len())
        };
    }

    fn put_u64(&mut self, at: u64, v: u64) {
        self.put(at, &v.to_le_bytes());
    }

    fn start(&mut self, rip: u64, rbx: u64) -> Result<(), String> {
        let regs = kvm_bindings::kvm_regs {
            rip,
            rsp: STACK,
            rbx,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))
    }

    fn rip(&self) -> Result<u64, String> {
        Ok(self
            .vcpu
            .get_regs()
            .map_err(|e| format!("KVM_GET_REGS: {e}"))?
            .rip)
    }

    fn run(&mut self) -> Result<Ran, String> {
        Ok(match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) | Ok(VcpuExit::IoIn(port, _)) => Ran::Io(port),
            Ok(VcpuExit::Hlt) => Ran::Hlt,
            Ok(VcpuExit::Debug(arch)) => Ran::Debug(arch.pc),
            Ok(VcpuExit::IrqWindowOpen) => Ran::Window,
            Ok(VcpuExit::Shutdown) => Ran::Shutdown,
            Ok(VcpuExit::InternalError) => Ran::Internal,
            Ok(VcpuExit::Intr) => Ran::Interrupted,
            Ok(other) => Ran::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR => Ran::Interrupted,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        })
    }

    fn debug(&mut self, control: u32, dr0: u64) -> Result<(), String> {
        let mut d = kvm_guest_debug {
            control,
            ..Default::default()
        };
        d.arch.debugreg[0] = dr0;
        d.arch.debugreg[7] = 0x400 | u64::from(dr0 != 0);
        self.vcpu
            .set_guest_debug(&d)
            .map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))
    }
}

/// The end of a probe guest's code: `HLT` at CPL0, `OUT 0x80` (#GP at IOPL 0: a shutdown
/// without an IDT, still an exit) at CPL3.
fn end(cpl: u8) -> &'static [u8] {
    if cpl == 0 {
        &[0xf4]
    } else {
        &[0xe6, 0x80]
    }
}

/// The interrupt window: `CLI; OUT; STI; MOV AL,[RBX]; NOP; HLT`, with the window asked for at
/// the `OUT`. The window opens after the instruction in `STI`'s shadow, at the `NOP`. RBX
/// points at a page nobody has touched, so the `MOV` faults into KVM (a nested page fault)
/// inside the shadow: a host that loses the shadow when it re-enters the guest opens the
/// window at the `MOV` instead. Repeated on eight fresh pages, and eight times without the
/// fault.
fn irq_window(kvm: &Kvm) -> Result<Finding, String> {
    let mut g = Guest::new(kvm, 0, false)?;
    let code = [0xfa, 0xe6, 0x80, 0xfb, 0x8a, 0x03, 0x90, 0xf4];
    g.put(CODE, &code);
    let (at_mov, at_nop) = (CODE + 4, CODE + 6);
    let mut seen = Vec::new();
    let mut exact = 0;
    for i in 0..16u64 {
        // Trials 0..8 read a fresh page (in the second 2 MiB page, never written); 8..16 the
        // code page, which is mapped.
        let rbx = if i < 8 { 0x20_0000 + i * 0x1000 } else { CODE };
        g.start(CODE, rbx)?;
        g.vcpu.get_kvm_run().request_interrupt_window = 0;
        match g.run()? {
            Ran::Io(0x80) => {}
            other => {
                return Ok(Finding::new(
                    false,
                    format!("the guest did not reach its OUT: {other:?}"),
                ))
            }
        }
        g.vcpu.get_kvm_run().request_interrupt_window = 1;
        let ran = g.run()?;
        g.vcpu.get_kvm_run().request_interrupt_window = 0;
        let rip = g.rip()?;
        match (ran, rip) {
            (Ran::Window, r) if r == at_nop => exact += 1,
            (Ran::Window, r) if r == at_mov => seen.push(format!(
                "trial {i}: window inside STI's shadow (before the MOV)"
            )),
            (ran, r) => seen.push(format!("trial {i}: {ran:?} at rip {r:#x}")),
        }
    }
    Ok(if seen.is_empty() {
        Finding::new(
            true,
            "16 of 16 windows after STI's shadow, 8 of them with a nested page fault inside it",
        )
    } else {
        Finding::new(
            false,
            format!(
                "{exact} of 16 exact; {}",
                seen.into_iter().take(3).collect::<Vec<_>>().join("; ")
            ),
        )
    })
}

/// An execute breakpoint on the second of three `NOP`s.
fn breakpoint(kvm: &Kvm, cpl: u8) -> Result<Finding, String> {
    let mut g = Guest::new(kvm, cpl, false)?;
    g.put(CODE, &[0x90, 0x90, 0x90]);
    g.put(CODE + 3, end(cpl));
    g.start(CODE, 0)?;
    g.debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, CODE + 1)?;
    Ok(match g.run()? {
        Ran::Debug(pc) if pc == CODE + 1 => Finding::new(true, "fired at its address"),
        Ran::Debug(pc) => Finding::new(
            false,
            format!("a debug exit at {pc:#x}, not at {:#x}", CODE + 1),
        ),
        other => Finding::new(
            false,
            format!("did not fire: the guest ran on to {other:?}"),
        ),
    })
}

/// Single-step over `NOP; NOP`.
fn single_step(kvm: &Kvm, cpl: u8) -> Result<Finding, String> {
    let mut g = Guest::new(kvm, cpl, false)?;
    g.put(CODE, &[0x90, 0x90]);
    g.put(CODE + 2, end(cpl));
    g.start(CODE, 0)?;
    g.debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0)?;
    let first = g.run()?;
    let rip = g.rip()?;
    Ok(match first {
        Ran::Debug(_) if rip == CODE + 1 => Finding::new(true, "one instruction per step"),
        other => Finding::new(false, format!("{other:?} at rip {rip:#x}")),
    })
}

/// Two stores, then the dirty log.
fn dirty_log(kvm: &Kvm) -> Result<Finding, String> {
    let mut g = Guest::new(kvm, 0, true)?;
    let store = |a: u32| {
        let mut v = vec![0xc7, 0x04, 0x25];
        v.extend(a.to_le_bytes());
        v.extend(1u32.to_le_bytes());
        v
    };
    let mut code = store(0x18_0000);
    code.extend(store(0x1a_0000));
    code.push(0xf4);
    g.put(CODE, &code);
    g.start(CODE, 0)?;
    g.vm_fd
        .get_dirty_log(0, MEM)
        .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
    let ran = g.run()?;
    let bits = g
        .vm_fd
        .get_dirty_log(0, MEM)
        .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
    let dirty = |page: usize| bits[page / 64] >> (page % 64) & 1 == 1;
    Ok(if ran == Ran::Hlt && dirty(0x180) && dirty(0x1a0) {
        Finding::new(true, "both written pages reported")
    } else {
        Finding::new(
            false,
            format!(
                "{ran:?}; pages 0x180 {} 0x1a0 {}",
                dirty(0x180),
                dirty(0x1a0)
            ),
        )
    })
}

/// `POPCNT` and `FNCLEX` in guest kernel code (the paravirtual KVM's emulator stops on both).
fn emulation(kvm: &Kvm) -> Result<Finding, String> {
    let mut failed = Vec::new();
    for (name, insn) in [
        ("popcnt", &[0xf3, 0x48, 0x0f, 0xb8, 0xc7][..]),
        ("fnclex", &[0xdb, 0xe2][..]),
    ] {
        let mut g = Guest::new(kvm, 0, false)?;
        g.put(CODE, insn);
        g.put(CODE + insn.len() as u64, &[0xf4]);
        g.start(CODE, 0)?;
        match g.run()? {
            Ran::Hlt => {}
            other => failed.push(format!("{name}: {other:?}")),
        }
    }
    Ok(if failed.is_empty() {
        Finding::new(true, "popcnt and fnclex ran")
    } else {
        Finding::new(false, failed.join(", "))
    })
}

/// `SYSCALL` from CPL3 to an LSTAR on a supervisor-only page: `OUT 0x81` there means the CPU
/// entered the kernel; the #PF handler's `OUT 0x8e` means it jumped without leaving CPL3.
fn syscall(kvm: &Kvm) -> Result<Finding, String> {
    let mut g = Guest::new(kvm, 3, false)?;
    g.put_u64(0x3008, (1 << 21) | 0x83); // 2-4 MiB: supervisor only
    g.put(CODE, &[0x0f, 0x05, 0xeb, 0xfc]); // syscall; jmp back
    g.put(0x20_0000, &[0xe6, 0x81, 0xf4]); // LSTAR: out 0x81
    g.put(0x20_0100, &[0xe6, 0x8e, 0xf4]); // #PF handler: out 0x8e
                                           // IDT entry 14: a 64-bit interrupt gate to 0x200100 in the kernel code segment.
    let handler: u64 = 0x20_0100;
    let low = (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16 & 0xffff) << 48);
    g.put_u64(IDT + 14 * 16, low);
    g.put_u64(IDT + 14 * 16 + 8, handler >> 32);
    let msrs = Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry {
            index: 0xc000_0081, // STAR
            data: (0x10 << 48) | (0x08 << 32),
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: 0xc000_0082, // LSTAR
            data: 0x20_0000,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: 0xc000_0084, // FMASK
            data: 0x200,
            ..Default::default()
        },
    ])
    .map_err(|e| format!("MSR list: {e:?}"))?;
    g.vcpu
        .set_msrs(&msrs)
        .map_err(|e| format!("KVM_SET_MSRS: {e}"))?;
    g.start(CODE, 0)?;
    Ok(match g.run()? {
        Ran::Io(0x81) => Finding::new(true, "entered LSTAR at CPL0"),
        Ran::Io(0x8e) => Finding::new(false, "jumped to LSTAR without leaving CPL3 (#PF)"),
        other => Finding::new(false, format!("{other:?}")),
    })
}

/// `perf_event_open` of the retired-branch counter for this thread, guest mode included.
fn branch_counter() -> Finding {
    // struct perf_event_attr (PERF_ATTR_SIZE_VER5, 112 bytes): type, size, config, then the
    // flag word at byte 40 (bit 0 disabled, bit 6 exclude_hv).
    let mut attr = [0u64; 16];
    attr[0] = 112 << 32; // type PERF_TYPE_HARDWARE (0), size 112
    attr[1] = 4; // PERF_COUNT_HW_BRANCH_INSTRUCTIONS
    attr[5] = 1 | (1 << 6);
    // SAFETY: perf_event_open reads `size` bytes of `attr`, which has 128; the returned file
    // descriptor is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Finding::new(false, format!("perf_event_open(branch-instructions): {e}"));
    }
    // SAFETY: a descriptor this function owns.
    unsafe { libc::close(fd as libc::c_int) };
    Finding::new(
        true,
        "perf_event_open(branch-instructions) opens; exactness not yet checked (docs/HARDWARE.md)",
    )
}
