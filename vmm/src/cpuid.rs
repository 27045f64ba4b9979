//! The CPUID table the guest sees, and the command-line profile that covers what the table
//! cannot hide on hosts that ignore it.
//!
//! DESIGN.md section 1: the guest gets no TSC, TSC-deadline, APIC/x2APIC, XSAVE/AVX,
//! RDRAND/RDSEED, PMU or kvmclock. On hardware KVM the table alone does that. On this
//! project's development hosts (ENVIRONMENT.md) leaf 1 ECX/EDX show the host's bits whatever the
//! table says, so [`DETERMINISTIC_PROFILE`] also tells the kernel, on its command line.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Kernel command-line switches that keep a Linux guest on the deterministic platform even
/// where the host's KVM leaks CPU features through CPUID (ENVIRONMENT.md, measured). Each one:
///
/// - `notsc`, `nolapic`, `noapic`: the hidden TSC, local APIC and I/O APIC.
/// - `clearcpuid=...`: leaf 1 and leaf 7 features the kernel would otherwise use. `tsc` first:
///   `notsc` only marks the TSC unstable; with the feature cleared the kernel keeps no time with
///   it. It does not stop the entropy reads: `random_get_entropy()` is `rdtsc()` whenever the
///   kernel is built with `CONFIG_X86_TSC` (always on x86-64), so [`crate::tsc`] completes
///   those in the VMM. `xsave` (Linux 6.1 has no `noxsave` any more) takes away AVX and everything else built on
///   it. Then RDRAND/RDSEED/RDPID/RDTSCP (random or host-time input), SMAP/SMEP/UMIP
///   (CLAC/STAC and friends), POPCNT/MOVBE/FSGSBASE/BMI/ABM (instructions this host's CPL0
///   emulator cannot run, or that only matter for speed), ERMS/FSRM (else copies use
///   `rep movsb`, which the emulator runs a byte at a time), `cx16` (CMPXCHG16B: the emulator
///   cannot run it and SLUB's fast path would run it tens of thousands of times per boot;
///   without it SLUB takes its lock instead) and `sse2`. The kernel reads at most 127
///   characters of this option: keep it short. Clearing a feature also clears every feature
///   that depends on it in the kernel's table (arch/x86/kernel/cpu/cpuid-deps.c, applied
///   transitively by `setup_clear_cpu_cap`), which is how a short option hides a lot: `xsave`
///   takes AVX, AVX2, AVX-512, FMA, PKU, XSAVEOPT/C/S with it; `sse2` takes SSE3, SSSE3,
///   SSE4.1, SSE4.2, PCLMULQDQ, AES-NI, SHA-NI, GFNI and F16C, whose kernel users (BLAKE2s,
///   ChaCha, CRC32C, AES... in a distribution kernel) would otherwise run SSE code the
///   emulator cannot. SSE2 itself stays usable: on x86-64 it is in the kernel's required
///   features, whose tests compile to constants, so no code path changes for it.
/// - `cryptomgr.notests`: no boot-time self-tests of the kernel's crypto algorithms. They
///   check the implementations against known answers (RSA, DH, ECDSA... in a distribution
///   kernel: ~20 minutes of emulated arithmetic here) and change nothing the guest runs with;
///   kernels without the crypto manager ignore it.
/// - `norandmaps`: no user-space address randomization, whatever the random state.
/// - Not here: `nopti`, `mitigations=off`. They weaken the guest (speculative-execution
///   mitigations off), which is the user's choice (docs/STOCK-KERNELS.md). With them dropped a
///   stock Debian kernel still boots and replays here (VERW, the MDS buffer clear, is
///   completed by [`crate::compat`]), ~12% slower.
/// - `nokaslr`: the same addresses in every boot, so exits compare across runs.
/// - `lpj=5000`: no delay-loop calibration (it times a loop against the clock); 5000 loops per
///   jiffy matches the speed of emulated CPL0 code here (ENVIRONMENT.md).
/// - `no_timer_check`: skip the check that the timer interrupt works, which reads the clock
///   against a busy loop.
pub const DETERMINISTIC_PROFILE: &str = "notsc nolapic noapic nokaslr norandmaps \
     lpj=5000 no_timer_check cryptomgr.notests \
     clearcpuid=tsc,xsave,rdrand,rdseed,rdpid,rdtscp,smap,smep,umip,popcnt,movbe,fsgsbase,\
     erms,fsrm,bmi1,bmi2,abm,cx16,sse2";

// Leaf 1 ECX.
const ECX_SSE3: u32 = 1;
const ECX_PCLMULQDQ: u32 = 1 << 1;
const ECX_SSSE3: u32 = 1 << 9;
const ECX_CX16: u32 = 1 << 13;
const ECX_SSE41: u32 = 1 << 19;
const ECX_SSE42: u32 = 1 << 20;
const ECX_MONITOR: u32 = 1 << 3;
const ECX_VMX: u32 = 1 << 5;
const ECX_FMA: u32 = 1 << 12;
const ECX_PCID: u32 = 1 << 17;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_MOVBE: u32 = 1 << 22;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_AES: u32 = 1 << 25;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_RDRAND: u32 = 1 << 30;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const EDX_TSC: u32 = 1 << 4;
const EDX_APIC: u32 = 1 << 9;
// 0x80000001 ECX / EDX.
const EXT_ECX_SVM: u32 = 1 << 2;
const EXT_ECX_PERFCTR_CORE: u32 = 1 << 23;
const EXT_EDX_RDTSCP: u32 = 1 << 27;
// 0x80000008 EBX.
const EXT8_EBX_XSAVEERPTR: u32 = 1 << 2;

/// Builds the guest's CPUID table from what KVM supports.
pub fn guest_cpuid(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    Ok(filter(supported))
}

/// Applies the platform's feature policy to a CPUID table.
pub fn filter(cpuid: CpuId) -> CpuId {
    let entries: Vec<_> = cpuid
        .as_slice()
        .iter()
        .copied()
        // No hypervisor leaves: no kvmclock, no paravirtual features.
        .filter(|e| !(0x4000_0000..0x5000_0000).contains(&e.function))
        .map(|mut e| {
            match e.function {
                1 => {
                    // SSE3 and later, CMPXCHG16B: the kernel-side reasons are in
                    // DETERMINISTIC_PROFILE; hiding them here too gives the guest the same
                    // features on every host, so a pair may span host kinds.
                    e.ecx &= !(ECX_SSE3
                        | ECX_SSSE3
                        | ECX_CX16
                        | ECX_SSE41
                        | ECX_SSE42
                        | ECX_PCLMULQDQ
                        | ECX_MONITOR
                        | ECX_VMX
                        | ECX_FMA
                        | ECX_PCID
                        | ECX_X2APIC
                        | ECX_MOVBE
                        | ECX_POPCNT
                        | ECX_TSC_DEADLINE
                        | ECX_AES
                        | ECX_XSAVE
                        | ECX_OSXSAVE
                        | ECX_AVX
                        | ECX_F16C
                        | ECX_RDRAND
                        | ECX_HYPERVISOR);
                    e.edx &= !(EDX_TSC | EDX_APIC);
                }
                // Monitor/mwait, thermal and power, PMU, XSAVE state, extended topology with
                // x2APIC IDs, and the leaf-7 structured features (RDSEED, SMAP, AVX2, ...).
                5 | 6 | 7 | 0xa | 0xb | 0xd | 0x1f => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                0x8000_0001 => {
                    e.ecx &= !(EXT_ECX_SVM | EXT_ECX_PERFCTR_CORE);
                    e.edx &= !EXT_EDX_RDTSCP;
                }
                // Invariant TSC and power management.
                0x8000_0007 => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                // The guest must not take the AMD FXSAVE-leak workaround (FNCLEX, which this
                // host's emulator cannot run): say the CPU does not leak.
                0x8000_0008 => e.ebx |= EXT8_EBX_XSAVEERPTR,
                _ => {}
            }
            e
        })
        .collect();
    CpuId::from_entries(&entries).unwrap_or(cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            edx,
            ebx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn clearcpuid_fits_the_kernels_buffer() {
        // arch/x86/kernel/cpu/common.c reads clearcpuid= into a 128-byte buffer.
        let arg = DETERMINISTIC_PROFILE
            .split_whitespace()
            .find_map(|w| w.strip_prefix("clearcpuid="))
            .unwrap();
        assert!(arg.len() < 128, "{} characters", arg.len());
        assert!(arg.starts_with("tsc,xsave,rdrand,rdseed"));
        assert!(
            !DETERMINISTIC_PROFILE.contains("noxsave"),
            "Linux 6.1 has no noxsave"
        );
    }

    #[test]
    fn hides_non_deterministic_features() {
        let table = CpuId::from_entries(&[
            entry(1, u32::MAX, u32::MAX),
            entry(7, u32::MAX, u32::MAX),
            entry(0x4000_0001, u32::MAX, u32::MAX),
            entry(0x8000_0008, 0, 0),
        ])
        .unwrap();
        let out = filter(table);
        let e: Vec<_> = out.as_slice().to_vec();
        assert_eq!(e.len(), 3, "hypervisor leaves are dropped");
        let leaf1 = e.iter().find(|x| x.function == 1).unwrap();
        assert_eq!(
            leaf1.ecx & (ECX_RDRAND | ECX_XSAVE | ECX_AVX | ECX_TSC_DEADLINE),
            0
        );
        assert_eq!(
            leaf1.ecx & (ECX_SSE3 | ECX_SSSE3 | ECX_SSE41 | ECX_SSE42 | ECX_CX16),
            0
        );
        assert_eq!(leaf1.edx & (EDX_TSC | EDX_APIC), 0);
        let leaf7 = e.iter().find(|x| x.function == 7).unwrap();
        assert_eq!((leaf7.ebx, leaf7.ecx, leaf7.edx), (0, 0, 0));
        let ext8 = e.iter().find(|x| x.function == 0x8000_0008).unwrap();
        assert_ne!(ext8.ebx & EXT8_EBX_XSAVEERPTR, 0);
    }
}
