//! Building a VM from its configuration and running it.

use crate::boot::{self, BootError};
use crate::config::{VmConfig, MAX_MEMORY_BYTES, MIN_MEMORY_BYTES};
use crate::control::{VcpuControl, VcpuEvent, VcpuResponse};
use crate::cpuid::{self, DETERMINISTIC_PROFILE};
use crate::host::Mechanisms;
use crate::kick::Kicker;
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::platform::{Platform, VIRTIO_BLK_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::snapshot::{
    saveable_msrs, DirtySet, PageCache, Pages, Snapshot, SnapshotError, VcpuSnapshot,
};
use crate::tsc::GuestTsc;
use crate::vcpu::{Event, Stop, Vcpu, VcpuError};
use crate::window::Window;
use devices::disk::Disk;
use devices::virtio::MmioBlock;
use devices::Persist;
use ft_core::{Boundary, BoundaryError, ExitDigest};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

/// Errors building or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the one this VMM speaks.
    #[error("KVM API version {0}, ftvmm needs 12")]
    ApiVersion(i32),
    /// A KVM ioctl failed while building the VM.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl's name, e.g. `KVM_GET_REGS`.
        what: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Guest RAM size out of range.
    #[error("--memory {0} bytes is out of range: give between 4M and 3G")]
    MemorySize(u64),
    /// Guest RAM could not be allocated or registered with KVM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, initrd or boot structures could not be loaded into guest RAM.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A bzImage whose symbols cannot be read, where the run needs them.
    #[error(
        "kernel {path} is a bzImage whose symbols ftvmm cannot read: {why}. ftvmm finds the \
         kernel's entropy RDTSC sites (--guest-tsc) and interrupt-window sites (--window-sites) \
         by name, and without them a recorded run does not replay exactly. Boot the kernel's \
         vmlinux with its symbol table instead (a distribution's -dbg package has it), or add \
         `--guest-tsc off --window-sites none` to run this image without exact replay"
    )]
    KernelSymbols {
        /// The `--kernel` path as given.
        path: String,
        /// What the kallsyms reader found.
        why: String,
    },
    /// A disk image could not be opened, inspected or read (building the VM, or hashing the
    /// image for the replay's configuration identity).
    #[error("cannot open disk image {path}: {source}")]
    Disk {
        /// The image's path as given.
        path: String,
        /// The open's error.
        source: std::io::Error,
    },
    /// The determinism boundary failed outside the vCPU loop: the RTC epoch at build time, a
    /// checkpoint, inputs taken at a kick, or the end of the run.
    #[error(transparent)]
    Boundary(#[from] BoundaryError),
    /// The vCPU loop stopped on an error.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The OS refused to spawn the thread that kicks the vCPU out of long runs without exits.
    #[error("cannot start the vCPU kicker: {0}")]
    Kicker(#[source] std::io::Error),
    /// Saving or restoring a snapshot.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A snapshot's device state that a device refused (not one this VMM saved).
    #[error("cannot restore the snapshot's devices: {0}")]
    DeviceState(#[from] devices::RestoreError),
    /// The host cannot give the mechanisms asked for or recorded.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
}

/// The host-dependent mechanisms of a run with `config` on this host: those of the recording it
/// follows (if this host can honour them), or those chosen from the probe's findings.
pub fn mechanisms(config: &VmConfig) -> Result<Mechanisms, VmError> {
    let caps = crate::host::caps();
    let wants_breakpoints =
        !config.window_sites.is_empty() || config.guest_tsc == crate::GuestTscMode::Breakpoints;
    match config.follow {
        Some(m) => {
            caps.honours(&m, &format!("the recording ({m})"))?;
            Ok(m)
        }
        None => {
            let mut m = caps.choose(config.kvm_compat, config.irq_window)?;
            if config.guest_tsc == crate::GuestTscMode::Breakpoints && !m.breakpoints {
                caps.honours(
                    &Mechanisms {
                        breakpoints: true,
                        ..m
                    },
                    "--guest-tsc breakpoints",
                )?;
            }
            m.breakpoints &= wants_breakpoints;
            Ok(m)
        }
    }
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Kvm { what, source })
}

/// One VM: KVM handles, guest RAM, the platform and the vCPU.
///
/// Field order is drop order: the vCPU and VM fds go before the RAM they map.
pub struct Vm {
    vcpu: Vcpu,
    vm: VmFd,
    kvm: Kvm,
    platform: Platform,
    mem: GuestMemoryMmap,
    config: VmConfig,
    compat: bool,
    cmdline: String,
    msrs: Option<Vec<u32>>,
    stats: CheckpointStats,
    track_dirty: bool,
    shadow: Option<Vec<u8>>,
    /// Pages written since the last checkpoint.
    checkpoint_dirty: DirtySet,
    /// The pages of recent checkpoints, which checkpoints are encoded against.
    page_cache: PageCache,
    /// Pages written since the last harvest of a live transfer, while one runs.
    transfer_dirty: Option<DirtySet>,
    /// The thread that encodes checkpoints a boundary takes later, started at the first.
    encoder: Option<Encoder>,
}

/// A snapshot to encode, and where its bytes (or why not) go.
type EncodeJob = (
    Snapshot,
    std::sync::mpsc::SyncSender<Result<Vec<u8>, String>>,
);

/// Encodes checkpoints off the vCPU thread ([`Boundary::checkpoint_later`]): a snapshot in,
/// its bytes (or why not) out on the channel that came with it.
struct Encoder {
    tx: std::sync::mpsc::Sender<EncodeJob>,
    /// Bytes encoded so far.
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Encoder {
    fn start() -> std::io::Result<Encoder> {
        let (tx, rx) = std::sync::mpsc::channel::<EncodeJob>();
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = bytes.clone();
        std::thread::Builder::new()
            .name("checkpoint-encode".into())
            .spawn(move || {
                // Ends when the VM (the sender) goes.
                while let Ok((snap, reply)) = rx.recv() {
                    let r = snap.encode().map_err(|e| e.to_string());
                    if let Ok(b) = &r {
                        counted.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    let _ = reply.send(r);
                }
            })?;
        Ok(Encoder { tx, bytes })
    }
}

/// What checkpoints cost in this run.
#[derive(Clone, Debug, Default)]
pub struct CheckpointStats {
    /// Each pause, in microseconds.
    pub pauses_us: Vec<u32>,
    /// How many were taken.
    pub count: u64,
    /// Their encoded bytes, in all.
    pub bytes: u64,
    /// The longest pause one caused.
    pub max_pause: std::time::Duration,
    /// All pauses together.
    pub total_pause: std::time::Duration,
}

impl CheckpointStats {
    /// The `q` quantile (0..=1) of the pauses, in microseconds.
    pub fn pause_quantile_us(&self, q: f64) -> u64 {
        let mut v = self.pauses_us.clone();
        if v.is_empty() {
            return 0;
        }
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        u64::from(v[i.min(v.len() - 1)])
    }
}

impl Vm {
    /// Builds the VM described by `config`, ready to run from the kernel's entry point.
    /// `track_dirty` turns on KVM's dirty-page log, which incremental checkpoints need.
    /// `image` is the disk image as the role may use it (`None`: not to be touched, e.g. a
    /// backup's shared disk); the boundary decides what the guest's device gets from it.
    pub fn new(
        config: &VmConfig,
        boundary: &mut dyn Boundary,
        track_dirty: bool,
        image: Option<Box<dyn Disk>>,
    ) -> Result<Vm, VmError> {
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&config.memory_bytes) {
            return Err(VmError::MemorySize(config.memory_bytes));
        }
        let blk = match &config.disk {
            Some(path) => {
                let size = std::fs::metadata(path)
                    .map_err(|source| VmError::Disk {
                        path: path.display().to_string(),
                        source,
                    })?
                    .len();
                boundary.disk(image, size).map(|d| MmioBlock::new(d, false))
            }
            None => None,
        };

        let kvm_fd = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm_fd.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        let vm = kvm("KVM_CREATE_VM", kvm_fd.create_vm())?;
        // This host's KVM answers EINVAL (ENVIRONMENT.md); hardware KVM on Intel needs it.
        if let Err(e) = vm.set_tss_address(0xfffb_d000) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e} (tolerated)");
        }
        let mem = memory::create(config.memory_bytes)?;
        memory::register(&vm, &mem, track_dirty)?;

        // A bzImage is unpacked once, for the boot and the symbol lookups below (kernel.rs),
        // and dropped once the VM is built.
        let image = crate::kernel::open(&config.kernel).map_err(BootError::from)?;
        if let crate::kernel::KernelImage::BzImage(bz) = &image {
            let symbols_used = config.guest_tsc != crate::config::GuestTscMode::Off
                || !config.window_sites.is_empty();
            if let (true, Err(e)) = (symbols_used, bz.kallsyms()) {
                return Err(VmError::KernelSymbols {
                    path: config.kernel.display().to_string(),
                    why: e.to_string(),
                });
            }
        }
        let cmdline = kernel_cmdline(config);
        let boot = boot::load(&mem, &config.kernel, config.initrd.as_deref(), &cmdline)?;

        let fd = kvm("KVM_CREATE_VCPU", vm.create_vcpu(0))?;
        let table = kvm("KVM_GET_SUPPORTED_CPUID", cpuid::guest_cpuid(&kvm_fd))?;
        kvm("KVM_SET_CPUID2", fd.set_cpuid2(&table))?;
        let sregs = kvm("KVM_GET_SREGS", fd.get_sregs())?;
        kvm("KVM_SET_SREGS", fd.set_sregs(&boot::entry_sregs(sregs)))?;
        kvm("KVM_SET_REGS", fd.set_regs(&boot::entry_regs(boot.entry)))?;
        kvm("KVM_SET_FPU", fd.set_fpu(&boot::entry_fpu()))?;

        let mech = mechanisms(config)?;
        let compat = mech.compat;
        tracing::info!(
            "mechanisms: {mech} (--kvm-compat {:?}, --irq-window {:?}, host {})",
            config.kvm_compat,
            config.irq_window,
            crate::host::caps().kvm
        );
        let tsc_slots = if mech.breakpoints {
            crate::debugregs::DebugRegs::new(compat).tsc_slots()
        } else {
            0
        };
        let tsc = GuestTsc::setup(config.guest_tsc, &config.kernel, tsc_slots);
        let net = config
            .net
            .as_ref()
            .map(|n| devices::virtio::MmioNet::new(n.mac));
        let mut platform = Platform::new(boundary.rtc_epoch()?, blk, net, mem.clone());
        platform.set_reinject(config.timer_reinject);
        let free_slots = tsc_slots.saturating_sub(tsc.addresses().len());
        if !mech.breakpoints && !config.window_sites.is_empty() {
            tracing::info!(
                "interrupt window: no sites: breakpoints are off (`ftvmm probe` tells whether they fire on this host)"
            );
        }
        let sites: &[String] = if mech.breakpoints {
            &config.window_sites
        } else {
            &[]
        };
        let window = Window::setup(&config.kernel, sites, free_slots);
        drop(image);
        let mut vcpu = Vcpu::new(fd, compat, mech.irq_window, tsc, window);
        vcpu.patch_guest(&mem, true);
        vcpu.reapply_debug(&mem)?;
        // The boot writes are the same in every run: checkpoints start from here.
        memory::reset_vmm_dirty(&mem);
        Ok(Vm {
            vcpu,
            vm,
            kvm: kvm_fd,
            platform,
            mem,
            config: config.clone(),
            compat,
            cmdline,
            msrs: None,
            stats: CheckpointStats::default(),
            track_dirty,
            shadow: None,
            checkpoint_dirty: DirtySet::new(config.memory_bytes),
            page_cache: PageCache::default(),
            transfer_dirty: None,
            encoder: None,
        })
    }

    /// Guest RAM (a handle sharing the mapping, for the thread that copies it in a transfer).
    pub fn memory(&self) -> GuestMemoryMmap {
        self.mem.clone()
    }

    /// Guest RAM size in bytes.
    pub fn config_memory(&self) -> u64 {
        self.config.memory_bytes
    }

    /// Zeroes all of guest RAM (a backup, before it receives the primary's pages).
    pub fn zero_memory(&mut self) -> Result<(), VmError> {
        memory::zero(&self.mem).map_err(|e| {
            VmError::Snapshot(SnapshotError::Memory {
                addr: 0,
                why: e.to_string(),
            })
        })?;
        memory::reload(&self.vm, &self.mem, self.track_dirty)?;
        Ok(())
    }

    /// Turns KVM's dirty-page log on (a primary, when a backup attaches).
    pub fn track_dirty_pages(&mut self) -> Result<(), VmError> {
        if !self.track_dirty {
            // Delete and re-add the slot rather than only change its flags: with the flag
            // change alone, writes through mappings KVM had already made writable went
            // unlogged on this project's nested KVM (a backup's RAM differed from its
            // primary's in one page after a Linux run).
            memory::reload(&self.vm, &self.mem, true)?;
            self.track_dirty = true;
        }
        Ok(())
    }

    /// Collects the pages written since the last harvest into the checkpoint set and, during a
    /// transfer, the transfer set.
    fn harvest(&mut self) -> Result<(), VmError> {
        let set = DirtySet::harvest(&self.vm, &self.mem, self.track_dirty)?;
        self.checkpoint_dirty.merge(&set);
        if let Some(t) = &mut self.transfer_dirty {
            t.merge(&set);
        }
        Ok(())
    }

    /// A digest of the whole VM's state: RAM, vCPU registers, devices and virtual time. Equal
    /// digests on a primary and its backup at the same log position mean the same VM.
    pub fn state_digest(&mut self) -> Result<u64, VmError> {
        let ram = memory::digest(&self.mem);
        let msrs = self.msrs.clone().unwrap_or_default();
        let vcpu = VcpuSnapshot::save(self.vcpu.fd(), &msrs)?;
        let encode = |e: postcard::Error| SnapshotError::Encode(e.to_string());
        let platform = postcard::to_stdvec(&self.platform.state()).map_err(encode)?;
        let regs = postcard::to_stdvec(&vcpu.regs_only()).map_err(encode)?;
        let mut h = crc32c::crc32c(&ram.to_le_bytes());
        h = crc32c::crc32c_append(h, &regs);
        h = crc32c::crc32c_append(h, &platform);
        Ok((ram << 32) ^ u64::from(h))
    }

    /// Takes a snapshot: full, or the pages written since the last one.
    pub fn snapshot(&mut self, full: bool) -> Result<Snapshot, VmError> {
        let interrupt_flags = self.vcpu.interrupt_flags();
        self.vcpu.settle()?;
        self.harvest()?;
        let pages = if full {
            self.checkpoint_dirty.take();
            Pages::full(&self.mem)?
        } else {
            Pages::from_set(&self.mem, &self.checkpoint_dirty.take())?
        };
        if std::env::var_os("FTVMM_VERIFY_DIRTY").is_some() {
            self.verify_dirty(&pages);
        }
        self.snapshot_with(pages, full, full, interrupt_flags)
    }

    /// A snapshot of `pages` and the rest; `base`: one both sides start their page caches from
    /// (a full snapshot, an attach's final state), else a checkpoint encoded against the cache.
    fn snapshot_with(
        &mut self,
        mut pages: Pages,
        full: bool,
        base: bool,
        interrupt_flags: [u8; 3],
    ) -> Result<Snapshot, VmError> {
        let delta = if base {
            self.page_cache.clear();
            None
        } else {
            Some(self.page_cache.encode(&mut pages))
        };
        if self.msrs.is_none() {
            self.msrs = Some(saveable_msrs(&self.kvm, self.vcpu.fd())?);
        }
        let msrs = self.msrs.as_deref().unwrap_or(&[]);
        Ok(Snapshot {
            full,
            vcpu: VcpuSnapshot::save(self.vcpu.fd(), msrs)?,
            platform: self.platform.state(),
            pages,
            digest: self.vcpu.digest().clone(),
            interrupt_flags,
            compat: self.vcpu.syscall_fix().cloned(),
            halted: self.vcpu.halted(),
            delta,
        })
    }

    /// The final state of a live transfer, taken while the vCPU is paused: the pages written
    /// since the transfer's last harvest, and everything else. The checkpoint set keeps its
    /// pages, so the next checkpoint covers everything since the previous one.
    fn transfer_snapshot(&mut self) -> Result<Snapshot, VmError> {
        let interrupt_flags = self.vcpu.interrupt_flags();
        self.vcpu.settle()?;
        self.harvest()?;
        let rest = self.transfer_dirty.take().unwrap_or_default();
        let pages = Pages::from_set(&self.mem, &rest)?;
        // The backup's state is this one: the next checkpoint needs only what changes after,
        // against a page cache both sides start empty here (a base snapshot).
        self.checkpoint_dirty.take();
        self.snapshot_with(pages, false, true, interrupt_flags)
    }

    /// Debugging aid (FTVMM_VERIFY_DIRTY=1): compares all of RAM with a copy taken at the
    /// previous checkpoint and reports pages that changed but are not in `pages`.
    fn verify_dirty(&mut self, pages: &Pages) {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
        let size = (self.mem.last_addr().0 + 1) as usize;
        let mut now = vec![0u8; size];
        if self.mem.read_slice(&mut now, GuestAddress(0)).is_err() {
            return;
        }
        if let Some(prev) = &self.shadow {
            let listed: std::collections::HashSet<u64> = pages.pages.iter().map(|p| p.0).collect();
            let mut missed = Vec::new();
            for (pfn, (a, b)) in prev.chunks(4096).zip(now.chunks(4096)).enumerate() {
                if a != b && !listed.contains(&(pfn as u64)) {
                    missed.push(pfn);
                }
            }
            if !missed.is_empty() {
                tracing::warn!(
                    "dirty tracking missed {} changed pages (of {} listed): {:x?}",
                    missed.len(),
                    listed.len(),
                    &missed[..missed.len().min(16)]
                );
            }
        }
        self.shadow = Some(now);
    }

    /// Puts the VM in the state of `snap` (a full snapshot on a fresh VM, or a checkpoint on
    /// the state it was taken from).
    pub fn restore(&mut self, snap: &Snapshot) -> Result<(), VmError> {
        // A port or MMIO read of the last exit is completed by KVM on its next entry, from the
        // instruction-emulation context it saved at the exit: after a restore that would write
        // the old registers over the restored ones (seen in replay: a checkpoint right after an
        // MMIO read diverged a few exits later; the `readspin` guest reproduces it). Complete it
        // now, on the old state.
        self.vcpu.settle()?;
        match &snap.delta {
            None => {
                self.page_cache.clear();
                snap.pages.apply(&self.mem, snap.full)?;
            }
            Some(codes) => self
                .page_cache
                .decode(&snap.pages, codes)?
                .apply(&self.mem, snap.full)?,
        }
        memory::reload(&self.vm, &self.mem, self.track_dirty)?;
        snap.vcpu.restore(self.vcpu.fd())?;
        self.platform.restore(&snap.platform)?;
        // KVM's kvm_run flags are those of the last exit, not of the restored state: put back
        // the ones the snapshot was taken with, so injection decides exactly as it did there.
        self.vcpu.restore_extra(
            snap.digest.clone(),
            snap.interrupt_flags,
            snap.compat.clone(),
        );
        self.vcpu.patch_guest(&self.mem, false);
        // Then the debug registers, from the restored SYSCALL completion state (a snapshot
        // taken mid-step must go on stepping) and the TSC sites.
        self.vcpu.reapply_debug(&self.mem)?;
        self.vcpu.set_halted(snap.halted);
        if snap.full {
            // Whoever replays from here restores the same snapshot first: the next checkpoint
            // needs only what changes after it (not every page the restore wrote).
            self.harvest()?;
            self.checkpoint_dirty.take();
        }
        Ok(())
    }

    /// Virtual time now.
    pub fn now_ns(&self) -> u64 {
        self.platform.now_ns()
    }

    /// Checkpoint statistics of this run.
    pub fn checkpoint_stats(&self) -> CheckpointStats {
        let mut stats = self.stats.clone();
        if let Some(e) = &self.encoder {
            stats.bytes += e.bytes.load(std::sync::atomic::Ordering::Relaxed);
        }
        stats
    }

    /// Hands `snap` to the encoder thread (started at the first call); the bytes come on the
    /// returned checkpoint. `Err(snap)`: there is no encoder thread (it could not start, or is
    /// gone), for the caller to encode it.
    fn encode_later(
        &mut self,
        snap: Snapshot,
    ) -> Result<ft_core::log::PendingCheckpoint, Box<Snapshot>> {
        if self.encoder.is_none() {
            match Encoder::start() {
                Ok(e) => self.encoder = Some(e),
                Err(e) => tracing::warn!("no thread to encode a checkpoint ({e}): the vCPU does"),
            }
        }
        let Some(encoder) = &self.encoder else {
            return Err(Box::new(snap));
        };
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        match encoder.tx.send((snap, reply)) {
            Ok(()) => Ok(ft_core::log::PendingCheckpoint::new(rx)),
            Err(std::sync::mpsc::SendError((snap, _))) => {
                // The thread is gone (it does not end on its own while the VM lives): the next
                // checkpoint starts another.
                self.encoder = None;
                Err(Box::new(snap))
            }
        }
    }

    /// Encodes checkpoint pages against the page cache (`true`, the default) or raw. Only the
    /// encoding side needs to know: a checkpoint says how each page is encoded.
    pub fn set_checkpoint_delta(&mut self, on: bool) {
        self.page_cache.raw_only = !on;
    }

    /// Checkpoint pages encoded (or decoded) against the page cache, and raw.
    pub fn page_cache_stats(&self) -> (u64, u64) {
        (self.page_cache.hits, self.page_cache.misses)
    }

    /// The platform (its timer-interrupt statistics).
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The full kernel command line the guest got.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Whether the compatibility paths are on.
    pub fn compat(&self) -> bool {
        self.compat
    }

    /// Runs the guest until it stops, taking and restoring checkpoints where the boundary asks
    /// and serving the requests of `control`.
    pub fn run(
        &mut self,
        boundary: &mut dyn Boundary,
        control: &VcpuControl,
    ) -> Result<Stop, VmError> {
        let kicker =
            Kicker::start(self.config.quantum, control.attention()).map_err(VmError::Kicker)?;
        boundary.set_attention(control.attention());
        control.running(true);
        let result = self.run_loop(boundary, control, &kicker);
        control.running(false);
        // Whoever still waits for an answer learns that the vCPU is gone.
        while let Some((_, reply)) = control.next(None) {
            let _ = reply.send(VcpuResponse::Stopped);
        }
        result
    }

    fn run_loop(
        &mut self,
        boundary: &mut dyn Boundary,
        control: &VcpuControl,
        kicker: &Kicker,
    ) -> Result<Stop, VmError> {
        loop {
            let attention = || control.pending();
            let event =
                match self
                    .vcpu
                    .run(&mut self.platform, &self.mem, boundary, kicker, &attention)
                {
                    Err(VcpuError::Boundary(BoundaryError::EndOfLog)) => {
                        Event::Stopped(Stop::EndOfLog)
                    }
                    other => other?,
                };
            match event {
                Event::Stopped(stop) => {
                    boundary.finish(self.vcpu.digest(), stop.ended_by())?;
                    return Ok(stop);
                }
                Event::Checkpoint => {
                    let start = std::time::Instant::now();
                    let snap = self.snapshot(false)?;
                    let taken = start.elapsed();
                    let pages = snap.pages.pages.len();
                    // A boundary that can take it later gets it from the encoder thread, and
                    // the guest runs on meanwhile: what the vCPU waits for is the taking.
                    let later = if boundary.defers_checkpoints() {
                        self.encode_later(snap)
                    } else {
                        Err(Box::new(snap))
                    };
                    let encoded_bytes = match later {
                        Ok(later) => {
                            boundary.checkpoint_later(later)?;
                            None
                        }
                        Err(snap) => {
                            let bytes = snap.encode()?;
                            boundary.checkpoint(&bytes)?;
                            self.stats.bytes += bytes.len() as u64;
                            Some(bytes.len())
                        }
                    };
                    let pause = start.elapsed();
                    tracing::debug!(
                        "checkpoint: {pages} pages; taken in {} us, encoded ({}) and logged in {} us more",
                        taken.as_micros(),
                        encoded_bytes.map_or("on the encoder thread".to_string(), |b| format!("{b} bytes")),
                        (pause - taken).as_micros()
                    );
                    self.stats.count += 1;
                    self.stats.max_pause = self.stats.max_pause.max(pause);
                    let us = u32::try_from(pause.as_micros()).unwrap_or(u32::MAX);
                    self.stats.pauses_us.push(us);
                    self.stats.total_pause += pause;
                    self.vcpu
                        .kick_inputs(&mut self.platform, &self.mem, boundary)?;
                }
                Event::Restore(bytes) => {
                    let snap = Snapshot::decode(&bytes)?;
                    self.restore(&snap)?;
                    self.vcpu
                        .kick_inputs(&mut self.platform, &self.mem, boundary)?;
                }
                Event::Control => {
                    if let Some(stop) = self.serve(control, kicker)? {
                        boundary.finish(self.vcpu.digest(), stop.ended_by())?;
                        return Ok(stop);
                    }
                }
            }
        }
    }

    /// Serves the control requests that are waiting, and, once paused, all requests until a
    /// `Resume`. Returns a stop if one was asked for.
    fn serve(&mut self, control: &VcpuControl, kicker: &Kicker) -> Result<Option<Stop>, VmError> {
        let mut paused = false;
        loop {
            if kicker.stop_requested() {
                return Ok(Some(Stop::Interrupted));
            }
            let wait = paused.then_some(std::time::Duration::from_millis(50));
            let Some((event, reply)) = control.next(wait) else {
                if paused {
                    continue;
                }
                return Ok(None);
            };
            let response = match event {
                VcpuEvent::Pause => {
                    paused = true;
                    VcpuResponse::Paused
                }
                VcpuEvent::Resume => {
                    paused = false;
                    VcpuResponse::Resumed
                }
                VcpuEvent::Snapshot { .. } if !paused => {
                    VcpuResponse::Refused("a snapshot needs the vCPU paused first".into())
                }
                VcpuEvent::Snapshot { full } => {
                    let snap = if full {
                        self.snapshot(true)
                    } else {
                        self.transfer_snapshot()
                    };
                    match snap {
                        Ok(s) => VcpuResponse::Snapshot(Box::new(s)),
                        Err(e) => VcpuResponse::Refused(e.to_string()),
                    }
                }
                VcpuEvent::StartDirtyTracking => {
                    match self.track_dirty_pages().and_then(|_| self.harvest()) {
                        Ok(()) => {
                            self.transfer_dirty = Some(DirtySet::new(self.config.memory_bytes));
                            VcpuResponse::Ok
                        }
                        Err(e) => VcpuResponse::Refused(e.to_string()),
                    }
                }
                VcpuEvent::DirtyPages => match self.harvest() {
                    Ok(()) => match &mut self.transfer_dirty {
                        Some(t) => VcpuResponse::DirtyPages(t.take().pfns().collect()),
                        None => VcpuResponse::Refused("no transfer is tracking pages".into()),
                    },
                    Err(e) => VcpuResponse::Refused(e.to_string()),
                },
                VcpuEvent::StopDirtyTracking => {
                    self.transfer_dirty = None;
                    VcpuResponse::Ok
                }
                VcpuEvent::Stop => {
                    let _ = reply.send(VcpuResponse::Stopped);
                    return Ok(Some(Stop::Interrupted));
                }
            };
            let _ = reply.send(response);
            if !paused && !control.pending() {
                return Ok(None);
            }
        }
    }

    /// The digest over the synchronous exits so far.
    pub fn digest(&self) -> &ExitDigest {
        self.vcpu.digest()
    }

    /// How many times the vCPU was kicked.
    pub fn kicks(&self) -> u64 {
        self.vcpu.kicks()
    }

    /// The vCPU (its counters and compatibility-path statistics).
    pub fn vcpu(&self) -> &Vcpu {
        &self.vcpu
    }

    /// Stops the run at this exit count ([`Vcpu::stop_at_exit`]).
    pub fn stop_at_exit(&mut self, count: Option<u64>) {
        self.vcpu.stop_at_exit(count);
    }

    /// This process's resident memory, how much of it is guest RAM, and how much of the rest is
    /// private (anonymous), in KiB (from /proc/self/smaps). The VMM's own footprint is the
    /// difference between the first two.
    pub fn memory_stats(&self) -> Option<MemoryStats> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        let guest: Vec<(u64, u64)> = self
            .mem
            .iter()
            .filter_map(|r| {
                let start = r.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
                Some((start, start + r.len()))
            })
            .collect();
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let (mut total, mut guest_kib, mut private_kib) = (0u64, 0u64, 0u64);
        let mut in_guest = false;
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    in_guest = guest.iter().any(|(s, e)| a >= *s && b <= *e);
                    continue;
                }
            }
            let mut kib = || -> u64 { words.next().and_then(|v| v.parse().ok()).unwrap_or(0) };
            match first {
                "Rss:" => {
                    let kib = kib();
                    total += kib;
                    if in_guest {
                        guest_kib += kib;
                    }
                }
                "Anonymous:" if !in_guest => private_kib += kib(),
                _ => {}
            }
        }
        Some(MemoryStats {
            rss_kib: total,
            guest_rss_kib: guest_kib,
            private_kib,
        })
    }
}

/// Resident memory of the VMM process.
#[derive(Debug, Clone, Copy)]
pub struct MemoryStats {
    /// All of it.
    pub rss_kib: u64,
    /// The part that is guest RAM.
    pub guest_rss_kib: u64,
    /// Of the rest, what is the VMM's alone: anonymous memory (heap, stacks, relocated data),
    /// not the pages of the binary and libraries it maps, which the page cache holds and every
    /// process mapping them shares.
    pub private_kib: u64,
}

impl MemoryStats {
    /// The VMM's own footprint: everything but guest RAM.
    pub fn vmm_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_rss_kib)
    }
}

/// What a replay must match: a hash of everything that makes two runs the same machine, and a
/// summary for error messages.
pub fn config_identity(config: &VmConfig, cmdline: &str) -> Result<(u64, String), VmError> {
    let content = |p: &std::path::Path| -> Result<u32, VmError> {
        std::fs::read(p)
            .map(|d| crc32c::crc32c(&d))
            .map_err(|source| VmError::Disk {
                path: p.display().to_string(),
                source,
            })
    };
    let kernel = content(&config.kernel)?;
    let initrd = match &config.initrd {
        Some(p) => content(p)?,
        None => 0,
    };
    let disk = config
        .disk
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let net = config.net.as_ref().map_or("none".to_string(), |n| {
        let m = n.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    });
    let summary = format!(
        "kernel crc {kernel:08x}, initrd crc {initrd:08x}, {} MiB RAM, disk {disk} bytes, nic {net}, {}, guest TSC {:?}, window {:?}, timer reinject {}, cmdline {cmdline:?}",
        config.memory_bytes >> 20,
        mechanisms(config)?,
        config.guest_tsc,
        config.window_sites,
        config.timer_reinject,
    );
    Ok((u64::from(crc32c::crc32c(summary.as_bytes())), summary))
}

/// The command line the guest gets: the user's, the deterministic profile, the devices.
pub fn kernel_cmdline(config: &VmConfig) -> String {
    let mut parts = vec![config.cmdline.trim().to_string()];
    if config.deterministic_profile {
        parts.push(DETERMINISTIC_PROFILE.to_string());
    }
    if config.disk.is_some() {
        parts.push(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            VIRTIO_MMIO_SIZE / 1024,
            VIRTIO_MMIO_BASE,
            VIRTIO_BLK_IRQ
        ));
    }
    if config.net.is_some() {
        parts.push(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            VIRTIO_MMIO_SIZE / 1024,
            VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE,
            crate::platform::VIRTIO_NET_IRQ
        ));
    }
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}
