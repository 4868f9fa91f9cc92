"""The Intel MultiProcessor Specification 1.4 tables: floating pointer, configuration table.

Each record is declared once as a structure (MP spec 1.4 chapter 4, tables 4-1 to 4-12); the
composer writes them by field name and fixes both checksums, the reader reads the same names.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmmarch_cli.arch.x86_64 import board, lapic, layout
from vmmarch_cli.arch.x86_64.lapic import MAX_XAPIC_CPUS
from vmmarch_cli.arch.x86_64.record import Record

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REVISION = 4  # 1.4



class MpFloatingPointer(Record):  # table 4-1
    _fields_ = (("signature", ctypes.c_char * 4), ("physptr", ctypes.c_uint32),
                ("length", ctypes.c_uint8),  # in 16-byte units
                ("spec_rev", ctypes.c_uint8), ("checksum", ctypes.c_uint8),
                ("features", ctypes.c_uint8 * 5))


class MpConfigHeader(Record):  # table 4-2
    _fields_ = (("signature", ctypes.c_char * 4), ("length", ctypes.c_uint16),
                ("spec_rev", ctypes.c_uint8), ("checksum", ctypes.c_uint8),
                ("oem_id", ctypes.c_char * 8), ("product_id", ctypes.c_char * 12),
                ("oem_table", ctypes.c_uint32), ("oem_table_size", ctypes.c_uint16),
                ("entry_count", ctypes.c_uint16), ("lapic_address", ctypes.c_uint32),
                ("extended_length", ctypes.c_uint16), ("extended_checksum", ctypes.c_uint8),
                ("reserved", ctypes.c_uint8))


class MpProcessor(Record):  # table 4-4
    _fields_ = (("type", ctypes.c_uint8), ("apic_id", ctypes.c_uint8),
                ("apic_version", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("signature", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("reserved", ctypes.c_uint8 * 8))


class MpBus(Record):  # table 4-8
    _fields_ = (("type", ctypes.c_uint8), ("bus_id", ctypes.c_uint8),
                ("bus_type", ctypes.c_char * 6))


class MpIoApic(Record):  # table 4-9
    _fields_ = (("type", ctypes.c_uint8), ("apic_id", ctypes.c_uint8),
                ("apic_version", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("address", ctypes.c_uint32))


class MpInterrupt(Record):  # tables 4-10 (I/O) and 4-12 (local): the same layout
    _fields_ = (("type", ctypes.c_uint8), ("irq_type", ctypes.c_uint8),
                ("flags", ctypes.c_uint16),  # polarity and trigger mode
                ("source_bus", ctypes.c_uint8), ("source_irq", ctypes.c_uint8),
                ("dest_apic", ctypes.c_uint8), ("dest_pin", ctypes.c_uint8))


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
IOAPIC_PINS = board.IOAPIC_PINS
ALL_APICS = lapic.BROADCAST_ID
NMI_LINT = 1  # LINT1 carries NMI on every PC

MAX_CPUS = MAX_XAPIC_CPUS


@dataclass(frozen=True)
class MpTable:
    address: int
    data: bytes


def size(cpus: int) -> int:
    return (MpFloatingPointer.sizeof() + MpConfigHeader.sizeof() + cpus * MpProcessor.sizeof()
            + MpBus.sizeof() + MpIoApic.sizeof() + (IOAPIC_PINS + 2) * MpInterrupt.sizeof())


def build(cpus: int, address: int = layout.SYSTEM_MEM_START) -> MpTable:
    """Floating pointer at ``address``, the configuration table right after it."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"the MP table describes 1..{MAX_CPUS} CPUs, not {cpus}")
    ioapic_id = board.ioapic_id(cpus)
    entries: list[Record] = [cpu_entry(i) for i in range(cpus)]
    entries.append(MpBus(type=MP_BUS, bus_id=0, bus_type=b"ISA   "))
    entries.append(MpIoApic(type=MP_IOAPIC, apic_id=ioapic_id, apic_version=lapic.VERSION,
                            flags=IOAPIC_USABLE, address=layout.IOAPIC_ADDRESS))
    entries += [MpInterrupt(type=MP_INTSRC, irq_type=MP_IRQ_INT, flags=MP_IRQ_POLARITY_DEFAULT,
                            source_irq=irq, dest_apic=ioapic_id, dest_pin=irq)
                for irq in range(IOAPIC_PINS)]
    entries.append(MpInterrupt(type=MP_LINTSRC, irq_type=MP_IRQ_EXTINT,
                               flags=MP_IRQ_POLARITY_DEFAULT))  # LINT0: the PIC, ExtINT
    entries.append(MpInterrupt(type=MP_LINTSRC, irq_type=MP_IRQ_NMI,
                               flags=MP_IRQ_POLARITY_DEFAULT, dest_apic=ALL_APICS,
                               dest_pin=NMI_LINT))
    body = b"".join(e.pack() for e in entries)
    header = MpConfigHeader(signature=MPC_SIGNATURE, length=MpConfigHeader.sizeof() + len(body),
                            spec_rev=MP_SPEC_REVISION, oem_id=b"VMMARCH ",
                            product_id=b"000000000000", entry_count=len(entries),
                            lapic_address=layout.APIC_DEFAULT_ADDRESS)
    table = with_checksum(header.pack() + body, offset=MpConfigHeader.checksum.offset)
    mpf = MpFloatingPointer(signature=MPF_SIGNATURE, physptr=address + MpFloatingPointer.sizeof(),
                            length=MpFloatingPointer.sizeof() // 16, spec_rev=MP_SPEC_REVISION)
    return MpTable(address,
                   with_checksum(mpf.pack(), offset=MpFloatingPointer.checksum.offset) + table)


def cpu_entry(index: int) -> MpProcessor:
    flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if index == 0 else 0)
    return MpProcessor(type=MP_PROCESSOR, apic_id=index, apic_version=lapic.VERSION, flags=flags,
                       signature=CPU_SIGNATURE, features=CPU_FEATURE_APIC | CPU_FEATURE_FPU)


def with_checksum(data: bytes, offset: int) -> bytes:
    """Set the byte at ``offset`` so that all bytes sum to 0 mod 256 (MP spec 4.1, 4.2)."""
    out = bytearray(data)
    out[offset] = 0
    out[offset] = -sum(out) & 0xFF
    return bytes(out)


# --- reader: decode the table back from guest memory (``dump-regs --tables``) ----------------

ENTRY_TYPES: dict[int, type[Record]] = {MP_PROCESSOR: MpProcessor, MP_BUS: MpBus,
                                         MP_IOAPIC: MpIoApic, MP_INTSRC: MpInterrupt,
                                         MP_LINTSRC: MpInterrupt}
COUNTED = {MP_BUS: "buses", MP_INTSRC: "io_interrupts", MP_LINTSRC: "local_interrupts"}


def read(read_fn: Callable[[int, int], bytes], address: int) -> dict[str, Any]:
    """The floating pointer at ``address`` and the configuration table it points at."""
    mpf_bytes = read_fn(address, MpFloatingPointer.sizeof())
    mpf = MpFloatingPointer.read(mpf_bytes)
    if mpf.signature != MPF_SIGNATURE:
        raise ValueError(f"no MP floating pointer at {address:#x}")
    header = MpConfigHeader.read(read_fn(mpf.physptr, MpConfigHeader.sizeof()))
    if header.signature != MPC_SIGNATURE or header.length < MpConfigHeader.sizeof():
        raise ValueError(f"no MP configuration table at {mpf.physptr:#x}")
    table = read_fn(mpf.physptr, header.length)
    cpus: list[dict[str, Any]] = []
    ioapics: list[dict[str, Any]] = []
    kinds: dict[str, int] = {}
    pos = MpConfigHeader.sizeof()
    for n in range(header.entry_count):
        if pos >= len(table):
            raise ValueError(f"the MP table ends before its entry {n}")
        kind = table[pos]
        record = ENTRY_TYPES.get(kind)
        if record is None or pos + record.sizeof() > header.length:
            raise ValueError(f"MP table entry {kind} at offset {pos} does not fit")
        if kind == MP_PROCESSOR:
            cpu = MpProcessor.read(table, pos)
            cpus.append({"apic_id": cpu.apic_id, "enabled": bool(cpu.flags & CPU_ENABLED),
                         "bsp": bool(cpu.flags & CPU_BOOTPROCESSOR)})
        elif kind == MP_IOAPIC:
            ioapic = MpIoApic.read(table, pos)
            ioapics.append({"id": ioapic.apic_id, "address": ioapic.address})
        if kind in COUNTED:
            kinds[COUNTED[kind]] = kinds.get(COUNTED[kind], 0) + 1
        pos += record.sizeof()
    return {"address": address, "table_address": mpf.physptr, "spec_revision": mpf.spec_rev,
            "lapic_address": header.lapic_address, "checksum_ok": sum(mpf_bytes) & 0xFF == 0
            and sum(table) & 0xFF == 0, "cpus": cpus, "ioapics": ioapics, **kinds}
