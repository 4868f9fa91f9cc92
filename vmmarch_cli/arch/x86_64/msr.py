"""The MSRs set at boot, named after the Intel SDM vol. 4 (Model-Specific Registers), table 2-2."""

from __future__ import annotations

from vmmarch_cli.vcpu import MsrEntry

MSR_IA32_TSC = 0x10
MSR_IA32_APIC_BASE = 0x1B
MSR_IA32_ARCH_CAPABILITIES = 0x10A
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
#: The MTRRs a guest programs (SDM vol. 3A 11.11.2): variable ranges as base/mask pairs from
#: 200H (as many pairs as IA32_MTRRCAP.VCNT says; 8 here, the most KVM offers), and the
#: fixed ranges below 1 MiB.
MSR_MTRR_PHYS_BASE0 = 0x200
MTRR_VARIABLE_PAIRS = 8
MSR_MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
MTRR_MSRS = (*range(MSR_MTRR_PHYS_BASE0, MSR_MTRR_PHYS_BASE0 + 2 * MTRR_VARIABLE_PAIRS),
             *MSR_MTRR_FIXED, MSR_MTRR_DEF_TYPE)
MSR_EFER = 0xC000_0080
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

#: IA32_MISC_ENABLE bit 0: fast-string operations (rep movs/stos) enabled.
MISC_ENABLE_FAST_STRING = 1 << 0
#: IA32_MTRR_DEF_TYPE: bit 11 enables MTRRs, type 6 is write-back (SDM vol. 3A 11.11.2.1).
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

#: IA32_ARCH_CAPABILITIES bits that say the CPU is not affected by a speculative-execution
#: attack (SDM vol. 4, table 2-2; bit 62 from Intel's "Indirect Target Selection" guidance,
#: 2025; Linux names them ARCH_CAP_*_NO in msr-index.h).
ARCH_CAP_RDCL_NO = 1 << 0  # Meltdown (rogue data cache load)
ARCH_CAP_SSB_NO = 1 << 4  # speculative store bypass
ARCH_CAP_MDS_NO = 1 << 5  # microarchitectural data sampling
ARCH_CAP_PSCHANGE_MC_NO = 1 << 6  # machine check on a page-size change
ARCH_CAP_TAA_NO = 1 << 8  # TSX asynchronous abort
ARCH_CAP_SBDR_SSDP_NO = 1 << 13  # MMIO stale data: shared buffers, sideband stale data
ARCH_CAP_FBSDP_NO = 1 << 14  # MMIO stale data: fill buffer
ARCH_CAP_PSDP_NO = 1 << 15  # MMIO stale data: primary stale data
ARCH_CAP_BHI_NO = 1 << 20  # branch history injection
ARCH_CAP_PBRSB_NO = 1 << 24  # post-barrier return stack buffer predictions
ARCH_CAP_GDS_NO = 1 << 26  # gather data sampling
ARCH_CAP_RFDS_NO = 1 << 27  # register file data sampling
ARCH_CAP_ITS_NO = 1 << 62  # indirect target selection
#: All of them: a CPU that executes nothing speculatively.
ARCH_CAP_NOT_AFFECTED = (
    ARCH_CAP_RDCL_NO | ARCH_CAP_SSB_NO | ARCH_CAP_MDS_NO | ARCH_CAP_PSCHANGE_MC_NO
    | ARCH_CAP_TAA_NO | ARCH_CAP_SBDR_SSDP_NO | ARCH_CAP_FBSDP_NO | ARCH_CAP_PSDP_NO
    | ARCH_CAP_BHI_NO | ARCH_CAP_PBRSB_NO | ARCH_CAP_GDS_NO | ARCH_CAP_RFDS_NO
    | ARCH_CAP_ITS_NO
)

MSR_NAMES = {
    MSR_IA32_TSC: "IA32_TSC",
    MSR_IA32_APIC_BASE: "IA32_APIC_BASE",
    MSR_IA32_ARCH_CAPABILITIES: "IA32_ARCH_CAPABILITIES",
    MSR_IA32_SYSENTER_CS: "IA32_SYSENTER_CS",
    MSR_IA32_SYSENTER_ESP: "IA32_SYSENTER_ESP",
    MSR_IA32_SYSENTER_EIP: "IA32_SYSENTER_EIP",
    MSR_IA32_MISC_ENABLE: "IA32_MISC_ENABLE",
    MSR_MTRR_DEF_TYPE: "IA32_MTRR_DEF_TYPE",
    MSR_EFER: "IA32_EFER",
    MSR_STAR: "IA32_STAR",
    MSR_LSTAR: "IA32_LSTAR",
    MSR_CSTAR: "IA32_CSTAR",
    MSR_SYSCALL_MASK: "IA32_FMASK",
    MSR_KERNEL_GS_BASE: "IA32_KERNEL_GS_BASE",
}


def boot_msrs() -> list[MsrEntry]:
    """The MSR values a freshly booted kernel expects (Firecracker ``create_boot_msr_entries``).

    The SYSCALL/SYSENTER MSRs are zeroed so nothing is left from a previous guest; the kernel
    programs them itself. MTRRs default to write-back, or the kernel maps all RAM uncached.
    """
    return [
        MsrEntry(MSR_IA32_SYSENTER_CS, 0),
        MsrEntry(MSR_IA32_SYSENTER_ESP, 0),
        MsrEntry(MSR_IA32_SYSENTER_EIP, 0),
        MsrEntry(MSR_STAR, 0),
        MsrEntry(MSR_CSTAR, 0),
        MsrEntry(MSR_KERNEL_GS_BASE, 0),
        MsrEntry(MSR_SYSCALL_MASK, 0),
        MsrEntry(MSR_LSTAR, 0),
        MsrEntry(MSR_IA32_TSC, 0),
        MsrEntry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        MsrEntry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
