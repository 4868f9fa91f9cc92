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

import struct
from collections.abc import Callable
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64 import aml, board, layout
from vmmarch_cli.arch.x86_64.lapic import MAX_XAPIC_CPUS

# --- record layouts -------------------------------------------------------------------------

#: 5.2.5.3 RSDP (revision 2): signature, checksum (first 20 bytes), OEMID, revision,
#: RsdtAddress, length, XsdtAddress, extended checksum (all 36 bytes), reserved.
RSDP_FORMAT = "<8sB6sBIIQB3s"
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has the XSDT address
RSDP_CHECKSUM_OFFSET = 8
RSDP_CHECKSUM_LENGTH = 20
RSDP_EXT_CHECKSUM_OFFSET = 32

#: 5.2.6 System Description Table header: signature, length, revision, checksum, OEMID,
#: OEM table ID, OEM revision, creator ID, creator revision.
SDT_HEADER_FORMAT = "<4sIBB6s8sI4sI"
SDT_HEADER_SIZE = struct.calcsize(SDT_HEADER_FORMAT)  # 36
SDT_CHECKSUM_OFFSET = 9

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

#: 5.2.9 table 5.9: the FADT is 276 bytes in revision 6. Only the fields we set are named;
#: the rest stay zero (no PM blocks, no GPEs, no SMI port: hardware-reduced).
FADT_SIZE = 276
FADT_FIELDS: dict[str, tuple[int, str]] = {
    "iapc_boot_arch": (109, "<H"),
    "flags": (112, "<I"),
    "minor_revision": (131, "<B"),
    "x_dsdt": (140, "<Q"),
    "hypervisor_vendor": (268, "<8s"),
}
#: 5.2.9.1 table 5.10 fixed feature flags.
FADT_F_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FADT_F_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_F_HW_REDUCED_ACPI = 1 << 20
#: 5.2.9.3 table 5.11 IA-PC boot architecture flags.
IAPC_8042 = 1 << 1  # an i8042 at 0x60/0x64 (we answer its reset command)
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3  # no PCI, so no MSI
HYPERVISOR_VENDOR = b"VMMARCH\0"

#: 5.2.12 table 5.43: local interrupt controller address, flags.
MADT_BODY_FORMAT = "<II"
MADT_PCAT_COMPAT = 1 << 0  # KVM's in-kernel irqchip includes the dual 8259
#: 5.2.12.2 Processor Local APIC: type, length, ACPI processor UID, APIC ID, flags.
MADT_LAPIC_FORMAT = "<BBBBI"
MADT_TYPE_LAPIC = 0
LAPIC_ENABLED = 1 << 0
#: 5.2.12.3 I/O APIC: type, length, IOAPIC ID, reserved, address, GSI base.
MADT_IOAPIC_FORMAT = "<BBBBII"
MADT_TYPE_IOAPIC = 1
#: 5.2.12.5 Interrupt Source Override: type, length, bus, source, GSI, MPS INTI flags.
MADT_ISO_FORMAT = "<BBBBIH"
MADT_TYPE_ISO = 2
ISA_BUS = 0
MPS_INTI_CONFORMS = 0  # polarity and trigger "conform to the bus": ISA is edge, active high
#: 5.2.12.7 Local APIC NMI: type, length, ACPI processor UID, flags, LINT#.
MADT_LAPIC_NMI_FORMAT = "<BBBHB"
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


def _sdt(signature: bytes, revision: int, body: bytes, table_id: bytes) -> bytes:
    header = struct.pack(SDT_HEADER_FORMAT, signature, SDT_HEADER_SIZE + len(body), revision, 0,
                         OEM_ID, table_id.ljust(8, b" "), OEM_REVISION, CREATOR_ID,
                         CREATOR_REVISION)
    table = bytearray(header + body)
    table[SDT_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def rsdp(xsdt_address: int) -> bytes:
    data = bytearray(struct.pack(RSDP_FORMAT, RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0,
                                 struct.calcsize(RSDP_FORMAT), xsdt_address, 0, bytes(3)))
    data[RSDP_CHECKSUM_OFFSET] = checksum(data[:RSDP_CHECKSUM_LENGTH])
    data[RSDP_EXT_CHECKSUM_OFFSET] = checksum(data)
    return bytes(data)


def xsdt(table_addresses: list[int]) -> bytes:
    body = b"".join(struct.pack("<Q", a) for a in table_addresses)
    return _sdt(b"XSDT", XSDT_REVISION, body, b"VMMAXSDT")


def fadt(dsdt_address: int) -> bytes:
    body = bytearray(FADT_SIZE - SDT_HEADER_SIZE)
    values = {
        "iapc_boot_arch": IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED,
        "flags": FADT_F_HW_REDUCED_ACPI | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON,
        "minor_revision": FADT_MINOR_REVISION,
        "x_dsdt": dsdt_address,
        "hypervisor_vendor": HYPERVISOR_VENDOR,
    }
    for name, value in values.items():
        offset, fmt = FADT_FIELDS[name]
        struct.pack_into(fmt, body, offset - SDT_HEADER_SIZE, value)
    return _sdt(b"FACP", FADT_REVISION, bytes(body), b"VMMAFACP")


def dsdt(devices: tuple[aml.IsaDevice, ...] = COM_PORTS) -> bytes:
    """The definition block: ``devices`` under \\_SB (the CPUs and the IOAPIC are in the MADT).
    Without them a hardware-reduced kernel cannot give the COM ports their IRQs (aml.py)."""
    return _sdt(b"DSDT", DSDT_REVISION,
                aml.scope("_SB", b"".join(d.aml() for d in devices)), b"VMMADSDT")


def madt(cpus: int) -> bytes:
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"the MADT describes 1..{MAX_CPUS} xAPIC CPUs, not {cpus}")
    ioapic_id = board.ioapic_id(cpus)
    records = [struct.pack(MADT_BODY_FORMAT, layout.APIC_DEFAULT_ADDRESS, MADT_PCAT_COMPAT)]
    records += [struct.pack(MADT_LAPIC_FORMAT, MADT_TYPE_LAPIC,
                            struct.calcsize(MADT_LAPIC_FORMAT), i, i, LAPIC_ENABLED)
                for i in range(cpus)]
    records.append(struct.pack(MADT_IOAPIC_FORMAT, MADT_TYPE_IOAPIC,
                               struct.calcsize(MADT_IOAPIC_FORMAT), ioapic_id, 0,
                               layout.IOAPIC_ADDRESS, 0))
    records += [struct.pack(MADT_ISO_FORMAT, MADT_TYPE_ISO, struct.calcsize(MADT_ISO_FORMAT),
                            ISA_BUS, irq, irq, MPS_INTI_CONFORMS) for irq in board.ISA_IRQS_USED]
    records.append(struct.pack(MADT_LAPIC_NMI_FORMAT, MADT_TYPE_LAPIC_NMI,
                               struct.calcsize(MADT_LAPIC_NMI_FORMAT), ALL_PROCESSORS, 0,
                               NMI_LINT))
    return _sdt(b"APIC", MADT_REVISION, b"".join(records), b"VMMAMADT")


def _align(address: int) -> int:
    return (address + TABLE_ALIGN - 1) & ~(TABLE_ALIGN - 1)


def build(cpus: int, address: int = layout.ACPI_RSDP_START) -> AcpiTables:
    """RSDP at ``address``, then DSDT, FADT, MADT and the XSDT that lists FADT and MADT."""
    rsdp_size = struct.calcsize(RSDP_FORMAT)
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

MADT_RECORD_FORMATS = {
    MADT_TYPE_LAPIC: (MADT_LAPIC_FORMAT, ("uid", "apic_id", "flags")),
    MADT_TYPE_IOAPIC: (MADT_IOAPIC_FORMAT, ("ioapic_id", "reserved", "address", "gsi_base")),
    MADT_TYPE_ISO: (MADT_ISO_FORMAT, ("bus", "source", "gsi", "flags")),
    MADT_TYPE_LAPIC_NMI: (MADT_LAPIC_NMI_FORMAT, ("uid", "flags", "lint")),
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
    header = read(address, SDT_HEADER_SIZE)
    signature, length, revision = struct.unpack_from("<4sIB", header)
    if not SDT_HEADER_SIZE <= length <= MAX_TABLE_LENGTH:
        raise ValueError(f"ACPI table at {address:#x} claims length {length}")
    return Table(signature.decode("ascii", "replace"), address, revision, read(address, length))


def read_rsdp(read: Reader, address: int) -> dict[str, int | str | bool]:
    data = read(address, struct.calcsize(RSDP_FORMAT))
    sig, _, oem, revision, rsdt, length, xsdt_address, _, _ = struct.unpack(RSDP_FORMAT, data)
    return {"address": address, "signature": sig.decode("ascii", "replace"),
            "oem": oem.decode("ascii", "replace"), "revision": revision, "rsdt": rsdt,
            "xsdt": xsdt_address, "length": length,
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
            offset, fmt = FADT_FIELDS["x_dsdt"]
            (dsdt_address,) = struct.unpack_from(fmt, table.data, offset)
            tables.append(read_table(read, dsdt_address))
    return tables


def decode_madt(table: Table) -> list[dict[str, int | str]]:
    """The MADT's interrupt controller structures, in table order."""
    records: list[dict[str, int | str]] = []
    offset = SDT_HEADER_SIZE + struct.calcsize(MADT_BODY_FORMAT)
    while offset + 2 <= len(table.data):
        kind, length = table.data[offset], table.data[offset + 1]
        if length < 2:
            raise ValueError(f"MADT record at offset {offset} has length {length}")
        known = MADT_RECORD_FORMATS.get(kind)
        record: dict[str, int | str] = {"type": MADT_RECORD_NAMES.get(kind, str(kind))}
        if known is not None and length == struct.calcsize(known[0]):
            values = struct.unpack_from(known[0], table.data, offset)[2:]
            record.update(zip(known[1], values, strict=True))
        records.append(record)
        offset += length
    return records
