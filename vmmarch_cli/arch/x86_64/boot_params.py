"""Linux ``struct boot_params`` (the zero page): layout as data, a writer and a reader.

Offsets: arch/x86/include/uapi/asm/bootparam.h and Documentation/arch/x86/boot.rst ("The real-mode
kernel header", "Details of header fields"). The setup header is the 0x1F1.. part a bzImage carries
in its own first sector; for an ELF vmlinux we fill the fields a boot loader must set.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64.e820 import E820Entry
from vmmarch_cli.arch.x86_64.record import Record

ZERO_PAGE_SIZE = 4096

#: Field name -> (offset in boot_params, struct format). Little-endian throughout.
FIELDS: dict[str, tuple[int, str]] = {
    "acpi_rsdp_addr": (0x070, "<Q"),
    "ext_ramdisk_image": (0x0C0, "<I"),
    "ext_ramdisk_size": (0x0C4, "<I"),
    "ext_cmd_line_ptr": (0x0C8, "<I"),
    "e820_entries": (0x1E8, "<B"),
    "sentinel": (0x1EF, "<B"),
    # struct setup_header starts at 0x1F1
    "setup_sects": (0x1F1, "<B"),
    "root_flags": (0x1F2, "<H"),
    "syssize": (0x1F4, "<I"),
    "vid_mode": (0x1FA, "<H"),
    "boot_flag": (0x1FE, "<H"),
    "jump": (0x200, "<H"),
    "header": (0x202, "<I"),
    "version": (0x206, "<H"),
    "kernel_version": (0x20E, "<H"),  # from 0x200: the kernel version string
    "type_of_loader": (0x210, "<B"),
    "loadflags": (0x211, "<B"),
    "code32_start": (0x214, "<I"),
    "ramdisk_image": (0x218, "<I"),
    "ramdisk_size": (0x21C, "<I"),
    "heap_end_ptr": (0x224, "<H"),
    "cmd_line_ptr": (0x228, "<I"),
    "initrd_addr_max": (0x22C, "<I"),
    "kernel_alignment": (0x230, "<I"),
    "relocatable_kernel": (0x234, "<B"),
    "min_alignment": (0x235, "<B"),
    "xloadflags": (0x236, "<H"),
    "cmdline_size": (0x238, "<I"),
    "payload_offset": (0x248, "<I"),
    "payload_length": (0x24C, "<I"),
    "setup_data": (0x250, "<Q"),
    "pref_address": (0x258, "<Q"),
    "init_size": (0x260, "<I"),
    "handover_offset": (0x264, "<I"),
    "kernel_info_offset": (0x268, "<I"),
}

SETUP_HEADER_START = 0x1F1
#: The header ends at the byte given by the jump at 0x200: 0x202 + (jump >> 8).
SETUP_HEADER_MAX_END = 0x290
E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128

BOOT_FLAG_MAGIC = 0xAA55  # boot.rst: "boot_flag ... Contains 0xAA55"
HDRS_MAGIC = 0x53726448  # "HdrS", little-endian
#: boot.rst: the real-mode code is the 512-byte boot sector plus setup_sects more sectors, and
#: "If this field is 0, the real value is 4."
SECTOR_SIZE = 512
SETUP_SECTS_DEFAULT = 4
#: The 2-byte jump at 0x200 ends the header: it ends at 0x202 + (jump >> 8); kernel_version
#: counts from 0x200 too.
JUMP_BASE = 0x200
HEADER_END_BASE = 0x202
#: type_of_loader 0xFF: "undefined" boot loader (boot.rst, type_of_loader).
LOADER_TYPE_UNDEFINED = 0xFF
LOADFLAGS_LOADED_HIGH = 0x01
LOADFLAGS_CAN_USE_HEAP = 0x80


class BootE820Entry(Record):  # struct boot_e820_entry (bootparam.h), packed: 20 bytes
    _fields_ = (("addr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("type", ctypes.c_uint32))


@dataclass(frozen=True)
class ZeroPage:
    """What the boot loader tells the kernel. ``setup_header`` seeds 0x1F1.. for a bzImage."""

    cmdline_address: int
    cmdline_size: int  # including the NUL
    e820: Sequence[E820Entry]
    initrd_address: int = 0
    initrd_size: int = 0
    setup_header: bytes = b""
    kernel_alignment: int = 0
    acpi_rsdp_address: int = 0


def build(zp: ZeroPage) -> bytes:
    """The 4 KiB zero page: zeroed, the image's header copied in, then the loader's fields."""
    if len(zp.e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(zp.e820)} e820 entries; the zero page holds 128")
    page = bytearray(ZERO_PAGE_SIZE)
    header = zp.setup_header[: SETUP_HEADER_MAX_END - SETUP_HEADER_START]
    page[SETUP_HEADER_START : SETUP_HEADER_START + len(header)] = header
    put(page, "boot_flag", BOOT_FLAG_MAGIC)
    put(page, "header", HDRS_MAGIC)
    put(page, "type_of_loader", LOADER_TYPE_UNDEFINED)
    put(page, "cmd_line_ptr", zp.cmdline_address)
    put(page, "cmdline_size", zp.cmdline_size)
    put(page, "ramdisk_image", zp.initrd_address & 0xFFFF_FFFF)
    put(page, "ramdisk_size", zp.initrd_size & 0xFFFF_FFFF)
    put(page, "ext_ramdisk_image", zp.initrd_address >> 32)
    put(page, "ext_ramdisk_size", zp.initrd_size >> 32)
    if zp.kernel_alignment:
        put(page, "kernel_alignment", zp.kernel_alignment)
    if zp.acpi_rsdp_address:
        put(page, "acpi_rsdp_addr", zp.acpi_rsdp_address)
    put(page, "e820_entries", len(zp.e820))
    for i, e in enumerate(zp.e820):
        at = E820_TABLE + BootE820Entry.sizeof() * i
        page[at : at + BootE820Entry.sizeof()] = BootE820Entry(addr=e.address, size=e.size,
                                                              type=e.type).pack()
    return bytes(page)


def put(page: bytearray, name: str, value: int) -> None:
    offset, fmt = FIELDS[name]
    struct.pack_into(fmt, page, offset, value)


def get(page: bytes, name: str) -> int:
    """A field of a zero page, or of an image's first sectors (the setup header sits at the same
    offsets in both)."""
    offset, fmt = FIELDS[name]
    value: int = struct.unpack_from(fmt, page, offset)[0]
    return value


def end_of(name: str) -> int:
    """The offset just past field ``name``: how much of an image holds it."""
    offset, fmt = FIELDS[name]
    return offset + struct.calcsize(fmt)


def setup_sectors(image: bytes) -> int:
    """How many 512-byte setup sectors follow the boot sector."""
    return get(image, "setup_sects") or SETUP_SECTS_DEFAULT


def read_e820(page: bytes) -> list[E820Entry]:
    """Decode the e820 table from a zero page (as read back from guest memory)."""
    count = min(get(page, "e820_entries"), E820_MAX_ENTRIES_ZEROPAGE)
    entries = (BootE820Entry.read(page, E820_TABLE + BootE820Entry.sizeof() * i)
               for i in range(count))
    return [E820Entry(e.addr, e.size, e.type) for e in entries]
