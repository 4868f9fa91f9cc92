"""Local APIC LINT0/LINT1 wiring, as a PC's BIOS leaves it (Intel MP spec 1.4, 3.6.2.2, "virtual
wire mode"): LINT0 takes the 8259 PIC's output as ExtINT, LINT1 is the NMI line.

Register offsets and the LVT delivery-mode field: Intel SDM vol. 3A 10.5.1, figure 10-8.
"""

from __future__ import annotations

from vmmarch_cli.vcpu import Lapic

#: xAPIC IDs are 8 bits and 0xFF is the broadcast ID (SDM vol. 3A 10.6.2.1); the IOAPIC takes
#: the ID after the CPUs' 0..N-1 in both the MP table and the MADT: at most 254 CPUs.
MAX_XAPIC_CPUS = 254

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
DELIVERY_MODE_MASK = 0x700  # LVT bits 10:8
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def set_delivery_mode(value: int, mode: int) -> int:
    """Replace only the delivery-mode bits of an LVT entry, keeping mask, trigger and vector."""
    return (value & ~DELIVERY_MODE_MASK) | (mode << 8)


def virtual_wire(lapic: Lapic) -> Lapic:
    lvt0 = set_delivery_mode(lapic.register(APIC_LVT0), APIC_MODE_EXTINT)
    lvt1 = set_delivery_mode(lapic.register(APIC_LVT1), APIC_MODE_NMI)
    return lapic.with_registers({APIC_LVT0: lvt0, APIC_LVT1: lvt1})
