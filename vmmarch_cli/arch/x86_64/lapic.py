"""The local APIC: its register map, and LINT0/LINT1 wired as a PC's BIOS leaves them (Intel MP
spec 1.4, 3.6.2.2, "virtual wire mode"): LINT0 takes the 8259 PIC's output as ExtINT, LINT1 is
the NMI line. Every module that names an APIC register takes it from here.
"""

from __future__ import annotations

from vmmarch_cli.vcpu import Lapic

#: xAPIC IDs are 8 bits and 0xFF is the broadcast ID (SDM vol. 3A 10.6.2.1); the IOAPIC takes
#: the ID after the CPUs' 0..N-1 in both the MP table and the MADT: at most 254 CPUs.
MAX_XAPIC_CPUS = 254

# Register offsets in the 4 KiB xAPIC page (SDM vol. 3A, table 10-1).
APIC_ID = 0x20
APIC_VERSION = 0x30
APIC_TPR = 0x80
APIC_PPR = 0xA0
APIC_EOI = 0xB0
APIC_LDR = 0xD0
APIC_DFR = 0xE0
APIC_SVR = 0xF0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ESR = 0x280
APIC_ICR_LOW = 0x300
APIC_ICR_HIGH = 0x310
APIC_LVT_TIMER = 0x320
APIC_LVT_THERMAL = 0x330
APIC_LVT_PERF = 0x340
APIC_LVT0 = 0x350  # LINT0
APIC_LVT1 = 0x360  # LINT1
APIC_LVT_ERROR = 0x370
APIC_TIMER_INITIAL = 0x380
APIC_TIMER_CURRENT = 0x390
APIC_TIMER_DIVIDE = 0x3E0

#: The version register of an integrated xAPIC (0x14) with 6 LVT entries (bits 23:16 hold the
#: number of entries - 1), as KVM reports (SDM vol. 3A 10.4.8).
VERSION = 0x14
VERSION_VALUE = VERSION | (5 << 16)
LVT_MASKED = 1 << 16  # SDM figure 10-8
DELIVERY_MODE_MASK = 0x700  # LVT and ICR bits 10:8
DELIVERY_MODE_SHIFT = 8
APIC_MODE_FIXED = 0x0
APIC_MODE_LOWEST = 0x1
APIC_MODE_NMI = 0x4
APIC_MODE_INIT = 0x5
APIC_MODE_STARTUP = 0x6
APIC_MODE_EXTINT = 0x7
#: xAPIC ID 0xFF addresses every local APIC (SDM vol. 3A 10.6.2.1).
BROADCAST_ID = 0xFF

# The interrupt command register (SDM vol. 3A figure 10-12): vector and delivery mode as in an
# LVT entry, then these; the destination is in ICR high's top byte.
ICR_VECTOR = 0xFF
ICR_LOGICAL = 1 << 11  # destination mode
ICR_DELIVERY_STATUS = 1 << 12  # send pending
ICR_LEVEL_ASSERT = 1 << 14
ICR_SHORTHAND_SHIFT = 18  # 00 none, 01 self, 10 all including self, 11 all excluding self
ICR_DEST_SHIFT = 24  # in ICR high


def set_delivery_mode(value: int, mode: int) -> int:
    """Replace only the delivery-mode bits of an LVT entry, keeping mask, trigger and vector."""
    return (value & ~DELIVERY_MODE_MASK) | (mode << DELIVERY_MODE_SHIFT)


def virtual_wire(lapic: Lapic) -> Lapic:
    lvt0 = set_delivery_mode(lapic.register(APIC_LVT0), APIC_MODE_EXTINT)
    lvt1 = set_delivery_mode(lapic.register(APIC_LVT1), APIC_MODE_NMI)
    return lapic.with_registers({APIC_LVT0: lvt0, APIC_LVT1: lvt1})
