//! User configuration of a VM: what was asked for, not what is running.

use std::path::PathBuf;
use std::time::Duration;

/// Whether the compatibility paths for this host's KVM are on (see [`crate::compat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompatMode {
    /// Probe the host KVM at start-up and turn them on only where it has the gaps.
    Auto,
    /// Always on.
    On,
    /// Always off (hardware KVM).
    Off,
}

/// Whether a pending interrupt asks KVM for an interrupt-window exit, a position in the
/// instruction stream (see [`crate::host`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqWindowMode {
    /// Where the host's KVM places them exactly (the probe decides).
    Auto,
    /// Always (refused on a host that does not place them exactly).
    On,
    /// Never: a pending interrupt waits for the next synchronous exit or a kick.
    Off,
}

/// Whether the guest kernel's RDTSC at its entropy sites is completed by the VMM (see
/// [`crate::tsc`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestTscMode {
    /// Each site's instruction replaced by `HLT` in guest RAM (an exit on every KVM without an
    /// in-kernel irqchip), when the kernel has a symbol table: no debug register is used, and
    /// every site of the entropy functions is covered.
    Patch,
    /// Hardware breakpoints on the sites, when the kernel has a symbol table.
    Breakpoints,
    /// Off: the guest reads the host's TSC there, and replay's RAM differs from its recording's.
    Off,
}

/// Everything needed to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Uncompressed ELF kernel (a `vmlinux` or a test guest).
    pub kernel: PathBuf,
    /// Initial ramdisk, loaded at the top of RAM.
    pub initrd: Option<PathBuf>,
    /// The user's part of the kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// A raw disk image for virtio-blk.
    pub disk: Option<PathBuf>,
    /// Append the deterministic profile ([`crate::cpuid::DETERMINISTIC_PROFILE`]) to the command line.
    pub deterministic_profile: bool,
    /// Compatibility paths for this host's KVM.
    pub kvm_compat: CompatMode,
    /// Interrupt-window exits as positions.
    pub irq_window: IrqWindowMode,
    /// The mechanisms of a recording this run follows (a replay: from the log header); None
    /// for a new run, which chooses them from the host ([`crate::host::HostCaps::choose`]).
    pub follow: Option<crate::host::Mechanisms>,
    /// The guest kernel's RDTSC at its entropy sites.
    pub guest_tsc: GuestTscMode,
    /// Timer ticks that fall due while one waits are delivered one by one, not coalesced.
    pub timer_reinject: bool,
    /// Kernel functions whose entries are interrupt-window sites ([`crate::window`]).
    pub window_sites: Vec<String>,
    /// A vCPU that runs this long without a synchronous exit is kicked.
    pub quantum: Duration,
    /// A virtio-net NIC.
    pub net: Option<NetConfig>,
}

/// The guest's NIC: its host side and its MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap interface on this host (the backup's may have another name).
    pub tap: String,
    /// The guest's MAC address (the same on both hosts of a pair).
    pub mac: [u8; 6],
}

/// The MAC a NIC gets when none is given: locally administered, fixed (a pair's two sides
/// must agree on it).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xf7, 0x00, 0x01];

/// The largest guest RAM: it must stay below the MMIO hole at 0xd000_0000 (docs/PLATFORM.md).
pub const MAX_MEMORY_BYTES: u64 = 3 << 30;
/// The smallest guest RAM that holds the boot structures and a kernel at 1 MiB.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
