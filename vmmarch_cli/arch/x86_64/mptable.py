"""The Intel MultiProcessor Specification 1.4 tables: floating pointer, configuration table.

Record layouts are declared as data (struct formats, MP spec 1.4 chapter 4, tables 4-1 to 4-12);
one writer per record type; the composer lays them out and fixes both checksums.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64 import layout

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REVISION = 4  # 1.4
APIC_VERSION = 0x14  # an integrated (xAPIC) local APIC, as KVM reports it

# Table 4-1 floating pointer: signature, physptr, length (16-byte units), spec, checksum,
# feature bytes 1..5.
MPF_FORMAT = "<4sIBBBB3sB"
# Table 4-2 configuration table header.
MPC_HEADER_FORMAT = "<4sHBB8s12sIHHII"
MPC_CPU_FORMAT = "<BBBBII8s"  # table 4-4
MPC_BUS_FORMAT = "<BB6s"  # table 4-8
MPC_IOAPIC_FORMAT = "<BBBBI"  # table 4-9
MPC_INTSRC_FORMAT = "<BBHBBBB"  # table 4-10 (I/O interrupt assignment)
MPC_LINTSRC_FORMAT = "<BBHBBBB"  # table 4-12 (local interrupt assignment)

# Entry types (table 4-3).
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

CPU_ENABLED = 0x1
CPU_BOOTPROCESSOR = 0x2
#: CPU signature family 6 and feature flags FPU|APIC (table 4-5, 4-6), what KVM guests report.
CPU_SIGNATURE = 0x600
CPU_FEATURE_FPU = 0x1
CPU_FEATURE_APIC = 0x200
IOAPIC_USABLE = 0x1
MP_IRQ_INT = 0  # vectored interrupt (table 4-11)
MP_IRQ_NMI = 1
MP_IRQ_EXTINT = 3
MP_IRQ_POLARITY_DEFAULT = 0
IOAPIC_PINS = 24  # KVM's in-kernel IOAPIC
ALL_APICS = 0xFF

#: xAPIC IDs are 8 bits and 0xFF is broadcast; one ID goes to the IOAPIC.
MAX_CPUS = 254


@dataclass(frozen=True)
class MpTable:
    address: int
    data: bytes


def size(cpus: int) -> int:
    return (struct.calcsize(MPF_FORMAT) + struct.calcsize(MPC_HEADER_FORMAT)
            + cpus * struct.calcsize(MPC_CPU_FORMAT) + struct.calcsize(MPC_BUS_FORMAT)
            + struct.calcsize(MPC_IOAPIC_FORMAT) + IOAPIC_PINS * struct.calcsize(MPC_INTSRC_FORMAT)
            + 2 * struct.calcsize(MPC_LINTSRC_FORMAT))


def build(cpus: int, address: int = layout.SYSTEM_MEM_START) -> MpTable:
    """Floating pointer at ``address``, the configuration table right after it."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"the MP table describes 1..{MAX_CPUS} CPUs, not {cpus}")
    ioapic_id = cpus  # the first ID after the CPUs' 0..cpus-1
    entries = [cpu_entry(i) for i in range(cpus)]
    entries.append(struct.pack(MPC_BUS_FORMAT, MP_BUS, 0, b"ISA   "))
    entries.append(struct.pack(MPC_IOAPIC_FORMAT, MP_IOAPIC, ioapic_id, APIC_VERSION,
                               IOAPIC_USABLE, layout.IOAPIC_ADDRESS))
    entries += [struct.pack(MPC_INTSRC_FORMAT, MP_INTSRC, MP_IRQ_INT, MP_IRQ_POLARITY_DEFAULT,
                            0, irq, ioapic_id, irq) for irq in range(IOAPIC_PINS)]
    entries.append(struct.pack(MPC_LINTSRC_FORMAT, MP_LINTSRC, MP_IRQ_EXTINT,
                               MP_IRQ_POLARITY_DEFAULT, 0, 0, 0, 0))
    entries.append(struct.pack(MPC_LINTSRC_FORMAT, MP_LINTSRC, MP_IRQ_NMI,
                               MP_IRQ_POLARITY_DEFAULT, 0, 0, ALL_APICS, 1))
    body = b"".join(entries)
    table_address = address + struct.calcsize(MPF_FORMAT)
    header_len = struct.calcsize(MPC_HEADER_FORMAT)
    header = struct.pack(MPC_HEADER_FORMAT, MPC_SIGNATURE, header_len + len(body),
                         MP_SPEC_REVISION, 0, b"VMMARCH ", b"000000000000", 0, 0, len(entries),
                         layout.APIC_DEFAULT_ADDRESS, 0)
    table = with_checksum(header + body, offset=7)
    mpf = struct.pack(MPF_FORMAT, MPF_SIGNATURE, table_address, 1, MP_SPEC_REVISION, 0, 0,
                      b"\0\0\0", 0)
    return MpTable(address, with_checksum(mpf, offset=10) + table)


def cpu_entry(index: int) -> bytes:
    flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if index == 0 else 0)
    return struct.pack(MPC_CPU_FORMAT, MP_PROCESSOR, index, APIC_VERSION, flags, CPU_SIGNATURE,
                       CPU_FEATURE_APIC | CPU_FEATURE_FPU, bytes(8))


def with_checksum(data: bytes, offset: int) -> bytes:
    """Set the byte at ``offset`` so that all bytes sum to 0 mod 256 (MP spec 4.1, 4.2)."""
    out = bytearray(data)
    out[offset] = 0
    out[offset] = -sum(out) & 0xFF
    return bytes(out)
