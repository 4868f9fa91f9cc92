"""Xen PVH boot: ``hvm_start_info``, its module list and memory map.

Layouts: Xen's xen/include/public/arch-x86/hvm/start_info.h (version 1), as Linux reads them
in arch/x86/platform/pvh/enlighten.c; the entry state is docs/misc/pvh.pandoc.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64.e820 import E820Entry

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
START_INFO_VERSION = 1
#: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr,
#: memmap_paddr, memmap_entries, reserved
START_INFO_FORMAT = "<IIIIQQQQII"
MODLIST_ENTRY_FORMAT = "<QQQQ"  # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY_FORMAT = "<QQII"  # addr, size, type (e820 numbering), reserved


@dataclass(frozen=True)
class StartInfo:
    cmdline_address: int
    memmap_address: int
    memmap: Sequence[E820Entry]
    modlist_address: int
    modules: Sequence[tuple[int, int]] = ()  # (paddr, size): the initrd
    rsdp_address: int = 0


def build_start_info(si: StartInfo) -> bytes:
    return struct.pack(
        START_INFO_FORMAT,
        XEN_HVM_START_MAGIC_VALUE,
        START_INFO_VERSION,
        0,
        len(si.modules),
        si.modlist_address if si.modules else 0,
        si.cmdline_address,
        si.rsdp_address,
        si.memmap_address,
        len(si.memmap),
        0,
    )


def build_modlist(modules: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack(MODLIST_ENTRY_FORMAT, paddr, size, 0, 0)
                    for paddr, size in modules)


def build_memmap(entries: Sequence[E820Entry]) -> bytes:
    return b"".join(struct.pack(MEMMAP_ENTRY_FORMAT, e.address, e.size, e.type, 0)
                    for e in entries)


def read_start_info(data: bytes) -> dict[str, int]:
    names = ("magic", "version", "flags", "nr_modules", "modlist_paddr", "cmdline_paddr",
             "rsdp_paddr", "memmap_paddr", "memmap_entries", "reserved")
    return dict(zip(names, struct.unpack_from(START_INFO_FORMAT, data), strict=True))


def read_memmap(data: bytes) -> list[E820Entry]:
    """Decode ``hvm_memmap_table_entry`` records (as read back from guest memory)."""
    size = struct.calcsize(MEMMAP_ENTRY_FORMAT)
    return [E820Entry(a, s, t) for a, s, t, _ in
            struct.iter_unpack(MEMMAP_ENTRY_FORMAT, data[: len(data) // size * size])]
