"""ACPI tables for a hardware-reduced x86 platform: RSDP, XSDT, FADT, DSDT, MADT.

Layouts: ACPI specification 6.5, chapter 5.2 ("ACPI System Description Tables"); section
numbers are given per record. Record layouts are declared as struct formats; one builder per
table; :func:`build` lays them out from one base address and fixes every checksum.

Why hardware-reduced (FADT flag HW_REDUCED_ACPI): the VMM emulates no PM1 event/control block,
PM timer or SCI, and the kernel then needs none (Linux ``acpi_generic_reduced_hw_init``).
Firecracker and Cloud Hypervisor describe their guests the same way. Debian's cloud kernel is
built without MP-table parsing, so this MADT is how it finds the APs and the IOAPIC.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64 import aml, board, layout
from vmmarch_cli.arch.x86_64.lapic import MAX_XAPIC_CPUS
from vmmarch_cli.arch.x86_64.record import Record

# --- record layouts -------------------------------------------------------------------------

class Rsdp(Record):  # 5.2.5.3, revision 2
    _fields_ = (("signature", ctypes.c_char * 8), ("checksum", ctypes.c_uint8),  # first 20 bytes
                ("oem_id", ctypes.c_char * 6), ("revision", ctypes.c_uint8),
                ("rsdt_address", ctypes.c_uint32), ("length", ctypes.c_uint32),
                ("xsdt_address", ctypes.c_uint64),
                ("extended_checksum", ctypes.c_uint8),  # all 36 bytes
                ("reserved", ctypes.c_uint8 * 3))


class SdtHeader(Record):  # 5.2.6 System Description Table header
    _fields_ = (("signature", ctypes.c_char * 4), ("length", ctypes.c_uint32),
                ("revision", ctypes.c_uint8), ("checksum", ctypes.c_uint8),
                ("oem_id", ctypes.c_char * 6), ("oem_table_id", ctypes.c_char * 8),
                ("oem_revision", ctypes.c_uint32), ("creator_id", ctypes.c_char * 4),
                ("creator_revision", ctypes.c_uint32))


RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has the XSDT address
RSDP_CHECKSUM_LENGTH = Rsdp.checksum.offset + 12  # 5.2.5.3: the ACPI 1.0 part, 20 bytes
SDT_HEADER_SIZE = SdtHeader.sizeof()  # 36

OEM_ID = b"VMMARC"
CREATOR_ID = b"VMMA"
OEM_REVISION = 1
CREATOR_REVISION = 1

# Table revisions as of ACPI 6.5.
XSDT_REVISION = 1  # 5.2.8
FADT_REVISION = 6  # 5.2.9, table 5.9
FADT_MINOR_REVISION = 5
DSDT_REVISION = 2  # 5.2.11.1: 2 = 64-bit AML integers
MADT_REVISION = 5  # 5.2.12, table 5.43 (6.5 keeps 5 for the x86 structures used here)

class Fadt(Record):
    """5.2.9 table 5.9: the FADT, 276 bytes in revision 6. Only the fields we set are named; the
    rest stay zero (no PM blocks, no GPEs, no SMI port: hardware-reduced)."""

    _fields_ = (("header", SdtHeader), ("_unset_36", ctypes.c_uint8 * 73),
                ("iapc_boot_arch", ctypes.c_uint16),  # offset 109
                ("reserved", ctypes.c_uint8), ("flags", ctypes.c_uint32),  # offset 112
                ("_unset_116", ctypes.c_uint8 * 15),  # RESET_REG, RESET_VALUE, ARM_BOOT_ARCH
                ("minor_revision", ctypes.c_uint8),  # offset 131
                ("x_firmware_ctrl", ctypes.c_uint64), ("x_dsdt", ctypes.c_uint64),  # 132, 140
                ("_unset_148", ctypes.c_uint8 * 120),
                ("hypervisor_vendor", ctypes.c_char * 8))  # offset 268


#: 5.2.9.1 table 5.10 fixed feature flags.
FADT_F_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FADT_F_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_F_HW_REDUCED_ACPI = 1 << 20
#: 5.2.9.3 table 5.11 IA-PC boot architecture flags.
IAPC_8042 = 1 << 1  # an i8042 at 0x60/0x64 (we answer its reset command)
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3  # no PCI, so no MSI
HYPERVISOR_VENDOR = b"VMMARCH\0"

class MadtBody(Record):  # 5.2.12 table 5.43, after the header
    _fields_ = (("lapic_address", ctypes.c_uint32), ("flags", ctypes.c_uint32))


_MADT_ENTRY = (("type", ctypes.c_uint8), ("length", ctypes.c_uint8))


class MadtLocalApic(Record):  # 5.2.12.2 Processor Local APIC
    _fields_ = (*_MADT_ENTRY, ("uid", ctypes.c_uint8), ("apic_id", ctypes.c_uint8),
                ("flags", ctypes.c_uint32))


class MadtIoApic(Record):  # 5.2.12.3
    _fields_ = (*_MADT_ENTRY, ("ioapic_id", ctypes.c_uint8), ("reserved", ctypes.c_uint8),
                ("address", ctypes.c_uint32), ("gsi_base", ctypes.c_uint32))


class MadtInterruptOverride(Record):  # 5.2.12.5 Interrupt Source Override
    _fields_ = (*_MADT_ENTRY, ("bus", ctypes.c_uint8), ("source", ctypes.c_uint8),
                ("gsi", ctypes.c_uint32), ("flags", ctypes.c_uint16))  # MPS INTI flags


class MadtLocalApicNmi(Record):  # 5.2.12.7
    _fields_ = (*_MADT_ENTRY, ("uid", ctypes.c_uint8), ("flags", ctypes.c_uint16),
                ("lint", ctypes.c_uint8))


MADT_PCAT_COMPAT = 1 << 0  # KVM's in-kernel irqchip includes the dual 8259
MADT_TYPE_LAPIC = 0
LAPIC_ENABLED = 1 << 0
MADT_TYPE_IOAPIC = 1
MADT_TYPE_ISO = 2
ISA_BUS = 0
MPS_INTI_CONFORMS = 0  # polarity and trigger "conform to the bus": ISA is edge, active high
MADT_TYPE_LAPIC_NMI = 4
ALL_PROCESSORS = 0xFF
NMI_LINT = 1  # LINT1 carries NMI, as in the MP table and on every PC

#: The board's ISA IRQs (board.ISA_IRQS_USED) each get an interrupt source override. KVM's
#: default GSI routing wires ISA IRQ n to IOAPIC pin n, so each states an identity mapping; IRQ 0
#: gets none because a hardware-reduced kernel never uses the PIT.

MAX_CPUS = MAX_XAPIC_CPUS

#: The board's serial ports as PNP0501 devices (16550-compatible): every port the machine wires.
COM_PORTS = tuple(aml.IsaDevice(p.name, "PNP0501", n, p.base, board.SERIAL_PORT_COUNT, p.irq)
                  for n, p in enumerate(board.SERIAL_PORTS, 1))

#: Tables are placed 16-byte aligned after the RSDP (5.2.5.1: the RSDP on a 16-byte boundary
#: in the BIOS read-only area 0xE0000-0xFFFFF, where a kernel without boot_params finds it).
TABLE_ALIGN = 16


@dataclass(frozen=True)
class AcpiTables:
    """The tables as laid out in guest memory: (address, bytes) each, and the RSDP address."""

    rsdp_address: int
    blobs: tuple[tuple[int, bytes], ...]

    @property
    def end(self) -> int:
        return max(address + len(data) for address, data in self.blobs)


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with it in place of a zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _header(signature: bytes, revision: int, length: int, table_id: bytes) -> SdtHeader:
    return SdtHeader(signature=signature, length=length, revision=revision, oem_id=OEM_ID,
                     oem_table_id=table_id.ljust(8, b" "), oem_revision=OEM_REVISION,
                     creator_id=CREATOR_ID, creator_revision=CREATOR_REVISION)


def _with_checksum(table: bytes) -> bytes:
    """``table`` with its header's checksum set: all its bytes sum to 0 mod 256 (5.2.6)."""
    out = bytearray(table)
    out[SdtHeader.checksum.offset] = checksum(out)
    return bytes(out)


def _sdt(signature: bytes, revision: int, body: bytes, table_id: bytes) -> bytes:
    header = _header(signature, revision, SDT_HEADER_SIZE + len(body), table_id)
    return _with_checksum(header.pack() + body)


def rsdp(xsdt_address: int) -> bytes:
    record = Rsdp(signature=RSDP_SIGNATURE, oem_id=OEM_ID, revision=RSDP_REVISION,
                  length=Rsdp.sizeof(), xsdt_address=xsdt_address)
    record.checksum = checksum(record.pack()[:RSDP_CHECKSUM_LENGTH])
    record.extended_checksum = checksum(record.pack())
    return record.pack()


def xsdt(table_addresses: list[int]) -> bytes:
    body = b"".join(struct.pack("<Q", a) for a in table_addresses)
    return _sdt(b"XSDT", XSDT_REVISION, body, b"VMMAXSDT")


def fadt(dsdt_address: int) -> bytes:
    table = Fadt(header=_header(b"FACP", FADT_REVISION, Fadt.sizeof(), b"VMMAFACP"),
                 iapc_boot_arch=IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED,
                 flags=FADT_F_HW_REDUCED_ACPI | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON,
                 minor_revision=FADT_MINOR_REVISION, x_dsdt=dsdt_address,
                 hypervisor_vendor=HYPERVISOR_VENDOR)
    return _with_checksum(table.pack())


def dsdt(devices: tuple[aml.IsaDevice, ...] = COM_PORTS) -> bytes:
    """The definition block: ``devices`` under \\_SB (the CPUs and the IOAPIC are in the MADT).
    Without them a hardware-reduced kernel cannot give the COM ports their IRQs (aml.py)."""
    return _sdt(b"DSDT", DSDT_REVISION,
                aml.scope("_SB", b"".join(d.aml() for d in devices)), b"VMMADSDT")


def madt(cpus: int) -> bytes:
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"the MADT describes 1..{MAX_CPUS} xAPIC CPUs, not {cpus}")
    ioapic_id = board.ioapic_id(cpus)
    records: list[Record] = [MadtBody(lapic_address=layout.APIC_DEFAULT_ADDRESS,
                                      flags=MADT_PCAT_COMPAT)]
    records += [MadtLocalApic(type=MADT_TYPE_LAPIC, length=MadtLocalApic.sizeof(), uid=i,
                              apic_id=i, flags=LAPIC_ENABLED) for i in range(cpus)]
    records.append(MadtIoApic(type=MADT_TYPE_IOAPIC, length=MadtIoApic.sizeof(),
                              ioapic_id=ioapic_id, address=layout.IOAPIC_ADDRESS))
    records += [MadtInterruptOverride(type=MADT_TYPE_ISO, length=MadtInterruptOverride.sizeof(),
                                      bus=ISA_BUS, source=irq, gsi=irq, flags=MPS_INTI_CONFORMS)
                for irq in board.ISA_IRQS_USED]
    records.append(MadtLocalApicNmi(type=MADT_TYPE_LAPIC_NMI, length=MadtLocalApicNmi.sizeof(),
                                    uid=ALL_PROCESSORS, lint=NMI_LINT))
    return _sdt(b"APIC", MADT_REVISION, b"".join(r.pack() for r in records), b"VMMAMADT")


def _align(address: int) -> int:
    return (address + TABLE_ALIGN - 1) & ~(TABLE_ALIGN - 1)


def build(cpus: int, address: int = layout.ACPI_RSDP_START) -> AcpiTables:
    """RSDP at ``address``, then DSDT, FADT, MADT and the XSDT that lists FADT and MADT."""
    rsdp_size = Rsdp.sizeof()
    dsdt_data = dsdt()
    dsdt_at = _align(address + rsdp_size)
    fadt_data = fadt(dsdt_at)
    fadt_at = _align(dsdt_at + len(dsdt_data))
    madt_data = madt(cpus)
    madt_at = _align(fadt_at + len(fadt_data))
    xsdt_data = xsdt([fadt_at, madt_at])
    xsdt_at = _align(madt_at + len(madt_data))
    tables = AcpiTables(address, (
        (address, rsdp(xsdt_at)),
        (dsdt_at, dsdt_data),
        (fadt_at, fadt_data),
        (madt_at, madt_data),
        (xsdt_at, xsdt_data),
    ))
    if tables.end > layout.BIOS_END:
        raise ValueError(f"ACPI tables for {cpus} CPUs end at {tables.end:#x}, past 1 MiB")
    return tables


# --- reader: decode the tables back from guest memory (``dump-regs --tables``, tests) ---------

#: Reads ``size`` bytes at a guest-physical address (``GuestMemory.read``: bounds-checked).
Reader = Callable[[int, int], bytes]

#: Upper bound on a table length we will read back: far above any table built here (the MADT
#: for 254 CPUs is about 2 KiB), so a corrupted length cannot make us read a whole guest.
MAX_TABLE_LENGTH = 64 * 1024

MADT_RECORDS: dict[int, type[Record]] = {
    MADT_TYPE_LAPIC: MadtLocalApic, MADT_TYPE_IOAPIC: MadtIoApic,
    MADT_TYPE_ISO: MadtInterruptOverride, MADT_TYPE_LAPIC_NMI: MadtLocalApicNmi,
}
MADT_RECORD_NAMES = {MADT_TYPE_LAPIC: "local_apic", MADT_TYPE_IOAPIC: "io_apic",
                     MADT_TYPE_ISO: "interrupt_override", MADT_TYPE_LAPIC_NMI: "local_apic_nmi"}


@dataclass(frozen=True)
class Table:
    signature: str
    address: int
    revision: int
    data: bytes

    @property
    def checksum_ok(self) -> bool:
        return sum(self.data) & 0xFF == 0


def read_table(read: Reader, address: int) -> Table:
    header = SdtHeader.read(read(address, SDT_HEADER_SIZE))
    if not SDT_HEADER_SIZE <= header.length <= MAX_TABLE_LENGTH:
        raise ValueError(f"ACPI table at {address:#x} claims length {header.length}")
    return Table(header.signature.decode("ascii", "replace"), address, header.revision,
                 read(address, header.length))


def read_rsdp(read: Reader, address: int) -> dict[str, int | str | bool]:
    data = read(address, Rsdp.sizeof())
    r = Rsdp.read(data)
    return {"address": address, "signature": r.signature.decode("ascii", "replace"),
            "oem": r.oem_id.decode("ascii", "replace"), "revision": r.revision,
            "rsdt": r.rsdt_address, "xsdt": r.xsdt_address, "length": r.length,
            "checksum_ok": sum(data[:RSDP_CHECKSUM_LENGTH]) & 0xFF == 0
            and sum(data) & 0xFF == 0}


def read_all(read: Reader, rsdp_address: int) -> list[Table]:
    """XSDT, every table it lists, and the DSDT the FADT points at, in that order."""
    rsdp_fields = read_rsdp(read, rsdp_address)
    if rsdp_fields["signature"] != RSDP_SIGNATURE.decode():
        raise ValueError(f"no RSDP at {rsdp_address:#x}")
    root = read_table(read, int(rsdp_fields["xsdt"]))
    tables = [root]
    body = root.data[SDT_HEADER_SIZE:]
    for (address,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8]):
        table = read_table(read, address)
        tables.append(table)
        if table.signature == "FACP":
            tables.append(read_table(read, Fadt.read(table.data).x_dsdt))
    return tables


def decode_madt(table: Table) -> list[dict[str, int | str]]:
    """The MADT's interrupt controller structures, in table order."""
    records: list[dict[str, int | str]] = []
    offset = SDT_HEADER_SIZE + MadtBody.sizeof()
    while offset + 2 <= len(table.data):
        kind, length = table.data[offset], table.data[offset + 1]
        if length < 2:
            raise ValueError(f"MADT record at offset {offset} has length {length}")
        known = MADT_RECORDS.get(kind)
        record: dict[str, int | str] = {"type": MADT_RECORD_NAMES.get(kind, str(kind))}
        if known is not None and length == known.sizeof():
            entry = known.read(table.data, offset)
            record.update((name, getattr(entry, name)) for name in entry.field_names()[2:])
        records.append(record)
        offset += length
    return records
