"""What the boot tables in guest memory say: the memory map, the MP table and the ACPI tables.

Everything is decoded from guest memory (bounds-checked ``GuestMemory`` reads), found the way
the kernel finds it: the memory map through boot_params or hvm_start_info, the MP floating
pointer by scanning the areas of MP spec 1.4 section 4 (top KiB of base memory, the BIOS ROM),
the RSDP through the pointer the boot protocol carries. ``dump-regs --tables`` shows it.
"""

from __future__ import annotations

from typing import Any

from vmmarch_cli.arch.x86_64 import acpi, aml, boot_params, e820, layout, mptable, pvh
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.errors import GuestMemoryError
from vmmarch_cli.vcpu import GuestMemory

#: MP spec 1.4 section 4: the floating pointer is in the first KiB of the EBDA, the last KiB
#: of base memory, or the BIOS ROM 0xF0000-0xFFFFF, on a 16-byte boundary.
MP_SCAN_AREAS = ((layout.EBDA_START, 0xA0000), (0xF0000, layout.BIOS_END))
PARAGRAPH = 16
#: More memmap entries than this in hvm_start_info is not something we wrote.
MAX_MEMMAP_ENTRIES = boot_params.E820_MAX_ENTRIES_ZEROPAGE


def find_mp_floating_pointer(mem: GuestMemory) -> int | None:
    for start, end in MP_SCAN_AREAS:
        area = mem.read(start, end - start)
        for offset in range(0, len(area) - PARAGRAPH + 1, PARAGRAPH):
            if area[offset : offset + 4] == mptable.MPF_SIGNATURE:
                return start + offset
    return None


def memory_map(mem: GuestMemory, protocol: BootProtocol) -> tuple[str, list[e820.E820Entry], int]:
    """(where it was found, the entries, the RSDP address the protocol carries)."""
    if protocol == BootProtocol.PVH:
        info = pvh.read_start_info(mem.read(layout.PVH_INFO_START, pvh.HvmStartInfo.sizeof()))
        count = min(info.memmap_entries, MAX_MEMMAP_ENTRIES)
        data = mem.read(info.memmap_paddr, count * pvh.HvmMemmapEntry.sizeof())
        return "hvm_start_info.memmap", pvh.read_memmap(data), info.rsdp_paddr
    page = mem.read(layout.ZERO_PAGE_START, boot_params.ZERO_PAGE_SIZE)
    return ("boot_params.e820_table", boot_params.read_e820(page),
            boot_params.get(page, "acpi_rsdp_addr"))


def read_boot_tables(mem: GuestMemory, protocol: BootProtocol) -> dict[str, Any]:
    source, entries, rsdp_address = memory_map(mem, protocol)
    doc: dict[str, Any] = {
        "e820": {"source": source, "entries": [
            {"start": f"{e.address:#x}", "end": f"{e.end - 1:#x}",
             "type": e820.TYPE_NAMES.get(e.type, str(e.type))} for e in entries]},
    }
    mpf = find_mp_floating_pointer(mem)
    try:
        doc["mptable"] = None if mpf is None else _hexify(mptable.read(mem.read, mpf))
    except (ValueError, GuestMemoryError) as e:
        doc["mptable"] = {"error": str(e)}
    try:
        doc["acpi"] = _acpi(mem, rsdp_address) if rsdp_address else None
    except (ValueError, GuestMemoryError) as e:
        doc["acpi"] = {"error": str(e)}
    return doc


def _acpi(mem: GuestMemory, rsdp_address: int) -> dict[str, Any]:
    tables = acpi.read_all(mem.read, rsdp_address)
    madt = next((t for t in tables if t.signature == "APIC"), None)
    dsdt = next((t for t in tables if t.signature == "DSDT"), None)
    devices: list[dict[str, Any]] | dict[str, str] = []
    if dsdt is not None:
        try:
            devices = [_hexify({"name": d.name, "hid": d.hid, "uid": d.uid,
                                "io_base": f"{d.io_base:#x}", "io_length": d.io_length,
                                "irq": d.irq})
                       for d in aml.decode_devices(dsdt.data[acpi.SDT_HEADER_SIZE:])]
        except aml.AmlError as e:
            devices = {"error": str(e)}
    return {
        "rsdp": _hexify(acpi.read_rsdp(mem.read, rsdp_address)),
        "tables": [{"signature": t.signature, "address": f"{t.address:#x}",
                    "length": len(t.data), "revision": t.revision,
                    "checksum_ok": t.checksum_ok} for t in tables],
        "madt": [] if madt is None else [_hexify(r) for r in acpi.decode_madt(madt)],
        "dsdt_devices": devices,
    }


#: Fields shown in hex: addresses, not counts.
HEX_FIELDS = {"address", "table_address", "lapic_address", "xsdt", "rsdt"}


def _hexify(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = [_hexify(x) if isinstance(x, dict) else x for x in v]
        elif k in HEX_FIELDS and isinstance(v, int):
            v = f"{v:#x}"
        out[k] = v
    return out
