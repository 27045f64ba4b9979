//! The ftvmm virtual machine monitor: one KVM VM with one vCPU, guest RAM, the 64-bit Linux
//! boot, the platform's device bus and the vCPU loop.
//!
//! - [`config`]: what the user asked for (kernel, memory, disk, ...), apart from runtime state.
//! - [`memory`]: guest RAM (vm-memory) and its KVM memory slot.
//! - [`boot`]: loading the kernel and initrd, boot_params, page tables, the entry state.
//! - [`cpuid`]: the CPUID table the guest sees and the deterministic command-line profile.
//! - [`platform`]: the devices on their ports and addresses, interrupt routing, virtual time.
//! - [`vcpu`]: the vCPU loop: synchronous exits, interrupt injection, kicks, the exit digest.
//! - [`host`]: what the host's KVM can do, probed with tiny guests, and the mechanisms a run
//!   chooses from it (recorded in the log header).
//! - [`compat`]: what this host's KVM cannot do itself, completed by the VMM (off on hardware KVM).
//! - [`tsc`]: the guest kernel's RDTSC at its entropy sites, completed by the VMM from the
//!   virtual clock (KVM has no RDTSC exiting for user space).
//! - [`window`]: interrupt-window sites, breakpoints in busy kernel code where a due interrupt
//!   is injected at a reproducible point instead of behind a checkpoint.
//! - [`debugregs`]: DR0..DR3, shared by the SYSCALL completion, the TSC sites and the window.
//! - [`kick`]: regaining control of a vCPU that runs a whole quantum without an exit.
//! - [`control`]: the control path into the vCPU (pause, snapshot, dirty pages, stop).
//! - [`snapshot`]: snapshots, checkpoints, dirty-page sets.
//! - [`transfer`]: the messages of a live state transfer to a backup.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod boot;
pub mod compat;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod debugregs;
pub mod host;
pub mod kernel;
pub mod kick;
pub mod memory;
pub mod platform;
pub mod snapshot;
pub mod tap;
pub mod transfer;
pub mod tsc;
pub mod vcpu;
pub mod vm;
pub mod window;

pub use config::{CompatMode, GuestTscMode, IrqWindowMode, NetConfig, VmConfig};
pub use host::{HostCaps, Mechanisms};
pub use vm::{config_identity, CheckpointStats, MemoryStats, Vm, VmError};
