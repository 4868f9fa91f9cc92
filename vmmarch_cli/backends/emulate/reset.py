"""The state of a vCPU before the VMM sets anything: the x86 power-up state.

Values from Intel SDM vol. 3A 9.1.1 (table 9-1, "IA-32 and Intel 64 Processor States Following
Power-up, Reset, or INIT") and 10.4.7.1 (local APIC after reset), with KVM's choices where the
SDM leaves room (arch/x86/kvm/x86.c kvm_vcpu_reset, lapic.c kvm_lapic_reset), so that a fresh
vCPU reads back the same on both backends.
"""

from __future__ import annotations

from vmmarch_cli.arch.x86_64 import lapic, layout
from vmmarch_cli.arch.x86_64.lapic import (
    APIC_DFR,
    APIC_ID,
    APIC_LVT_ERROR,
    APIC_LVT_PERF,
    APIC_LVT_THERMAL,
    APIC_LVT_TIMER,
    APIC_SVR,
    APIC_VERSION,
    LVT_MASKED,
    VERSION_VALUE,
)
from vmmarch_cli.vcpu import (
    ATTR_P,
    ATTR_S,
    ATTR_TYPE_ACCESSED,
    TYPE_CODE_XR,
    TYPE_DATA_RW,
    TYPE_LDT,
    TYPE_TSS_BUSY,
    DescriptorTable,
    Lapic,
    Regs,
    Segment,
    Sregs,
)

#: EDX after reset holds the processor signature; KVM uses family 6, model 0.
RESET_EDX = 0x600
RESET_RIP = 0xFFF0
RESET_CR0 = 0x6000_0010  # CD | NW | ET
#: IA32_APIC_BASE: the default base, enabled (bit 11), BSP flag (bit 8) on CPU 0 (SDM 10.4.4).
APIC_DEFAULT_BASE = layout.APIC_DEFAULT_ADDRESS
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_BSP = 1 << 8


def reset_regs() -> Regs:
    return Regs(rdx=RESET_EDX, rip=RESET_RIP, rflags=0x2)


def reset_sregs(index: int) -> Sregs:
    data = Segment(0, 0, 0xFFFF, ATTR_P | ATTR_S | TYPE_DATA_RW | ATTR_TYPE_ACCESSED)
    bsp = APIC_BASE_BSP if index == 0 else 0
    return Sregs(
        cs=Segment(0xF000, 0xFFFF_0000, 0xFFFF,
                   ATTR_P | ATTR_S | TYPE_CODE_XR | ATTR_TYPE_ACCESSED),
        ds=data, es=data, fs=data, gs=data, ss=data,
        tr=Segment(0, 0, 0xFFFF, ATTR_P | TYPE_TSS_BUSY),
        ldt=Segment(0, 0, 0xFFFF, ATTR_P | TYPE_LDT),
        gdt=DescriptorTable(0, 0xFFFF),
        idt=DescriptorTable(0, 0xFFFF),
        cr0=RESET_CR0,
        apic_base=APIC_DEFAULT_BASE | APIC_BASE_ENABLE | bsp,
    )


def reset_lapic(index: int) -> Lapic:
    page = Lapic()
    values = {
        APIC_ID: index << 24,
        APIC_VERSION: VERSION_VALUE,
        APIC_DFR: 0xFFFF_FFFF,
        APIC_SVR: 0xFF,
        APIC_LVT_TIMER: LVT_MASKED,
        APIC_LVT_THERMAL: LVT_MASKED,
        APIC_LVT_PERF: LVT_MASKED,
        # KVM wires the BSP's LINT0 to the PIC (ExtINT, unmasked) at reset, as a BIOS would.
        lapic.APIC_LVT0: (lapic.APIC_MODE_EXTINT << lapic.DELIVERY_MODE_SHIFT) if index == 0
        else LVT_MASKED,
        lapic.APIC_LVT1: LVT_MASKED,
        APIC_LVT_ERROR: LVT_MASKED,
    }
    return page.with_registers(values)
