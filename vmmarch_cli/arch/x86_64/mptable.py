"""The Intel MultiProcessor Specification 1.4 tables: floating pointer, configuration table.

Record layouts are declared as data (struct formats, MP spec 1.4 chapter 4, tables 4-1 to 4-12);
one writer per record type; the composer lays them out and fixes both checksums.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmmarch_cli.arch.x86_64 import board, layout
from vmmarch_cli.arch.x86_64.lapic import MAX_XAPIC_CPUS

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

MAX_CPUS = MAX_XAPIC_CPUS


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
    ioapic_id = board.ioapic_id(cpus)
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


# --- reader: decode the table back from guest memory (``dump-regs --tables``) ----------------

ENTRY_SIZES = {MP_PROCESSOR: struct.calcsize(MPC_CPU_FORMAT), MP_BUS: 8, MP_IOAPIC: 8,
               MP_INTSRC: 8, MP_LINTSRC: 8}


def read(read_fn: Callable[[int, int], bytes], address: int) -> dict[str, Any]:
    """The floating pointer at ``address`` and the configuration table it points at."""
    mpf = read_fn(address, struct.calcsize(MPF_FORMAT))
    signature, table_address, _, revision, _, _, _, _ = struct.unpack(MPF_FORMAT, mpf)
    if signature != MPF_SIGNATURE:
        raise ValueError(f"no MP floating pointer at {address:#x}")
    header = read_fn(table_address, struct.calcsize(MPC_HEADER_FORMAT))
    fields = struct.unpack(MPC_HEADER_FORMAT, header)
    length, count, lapic_address = fields[1], fields[8], fields[9]
    if fields[0] != MPC_SIGNATURE or length < len(header):
        raise ValueError(f"no MP configuration table at {table_address:#x}")
    table = read_fn(table_address, length)
    cpus: list[dict[str, Any]] = []
    ioapics: list[dict[str, Any]] = []
    kinds: dict[str, int] = {}
    pos = len(header)
    for _ in range(count):
        kind = table[pos]
        size = ENTRY_SIZES.get(kind)
        if size is None or pos + size > length:
            raise ValueError(f"MP table entry {kind} at offset {pos} does not fit")
        if kind == MP_PROCESSOR:
            _, apic_id, _, flags, _, _, _ = struct.unpack_from(MPC_CPU_FORMAT, table, pos)
            cpus.append({"apic_id": apic_id, "enabled": bool(flags & CPU_ENABLED),
                         "bsp": bool(flags & CPU_BOOTPROCESSOR)})
        elif kind == MP_IOAPIC:
            _, ioapic_id, _, _, ioapic_address = struct.unpack_from(MPC_IOAPIC_FORMAT, table, pos)
            ioapics.append({"id": ioapic_id, "address": ioapic_address})
        name = {MP_BUS: "buses", MP_INTSRC: "io_interrupts", MP_LINTSRC: "local_interrupts"}
        if kind in name:
            kinds[name[kind]] = kinds.get(name[kind], 0) + 1
        pos += size
    return {"address": address, "table_address": table_address, "spec_revision": revision,
            "lapic_address": lapic_address, "checksum_ok": sum(mpf) & 0xFF == 0
            and sum(table) & 0xFF == 0, "cpus": cpus, "ioapics": ioapics, **kinds}
