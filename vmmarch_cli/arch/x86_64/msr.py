"""The MSRs set at boot, named after the Intel SDM vol. 4 (Model-Specific Registers), table 2-2."""

from __future__ import annotations

from vmmarch_cli.vcpu import MsrEntry

MSR_IA32_TSC = 0x10
MSR_IA32_APIC_BASE = 0x1B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
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

MSR_NAMES = {
    MSR_IA32_TSC: "IA32_TSC",
    MSR_IA32_APIC_BASE: "IA32_APIC_BASE",
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
