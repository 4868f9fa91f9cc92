"""Xen PVH boot: ``hvm_start_info``, its module list and memory map.

Layouts: Xen's xen/include/public/arch-x86/hvm/start_info.h (version 1), as Linux reads them
in arch/x86/platform/pvh/enlighten.c; the entry state is docs/misc/pvh.pandoc.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64.e820 import E820Entry
from vmmarch_cli.arch.x86_64.record import Record

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
START_INFO_VERSION = 1


class HvmStartInfo(Record):  # struct hvm_start_info, version 1
    _fields_ = (("magic", ctypes.c_uint32), ("version", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("nr_modules", ctypes.c_uint32),
                ("modlist_paddr", ctypes.c_uint64), ("cmdline_paddr", ctypes.c_uint64),
                ("rsdp_paddr", ctypes.c_uint64), ("memmap_paddr", ctypes.c_uint64),
                ("memmap_entries", ctypes.c_uint32), ("reserved", ctypes.c_uint32))


class HvmModlistEntry(Record):  # struct hvm_modlist_entry
    _fields_ = (("paddr", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("cmdline_paddr", ctypes.c_uint64), ("reserved", ctypes.c_uint64))


class HvmMemmapEntry(Record):  # struct hvm_memmap_table_entry: type in e820 numbering
    _fields_ = (("addr", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("type", ctypes.c_uint32), ("reserved", ctypes.c_uint32))


@dataclass(frozen=True)
class StartInfo:
    cmdline_address: int
    memmap_address: int
    memmap: Sequence[E820Entry]
    modlist_address: int
    modules: Sequence[tuple[int, int]] = ()  # (paddr, size): the initrd
    rsdp_address: int = 0


def build_start_info(si: StartInfo) -> bytes:
    return HvmStartInfo(magic=XEN_HVM_START_MAGIC_VALUE, version=START_INFO_VERSION,
                        nr_modules=len(si.modules),
                        modlist_paddr=si.modlist_address if si.modules else 0,
                        cmdline_paddr=si.cmdline_address, rsdp_paddr=si.rsdp_address,
                        memmap_paddr=si.memmap_address, memmap_entries=len(si.memmap)).pack()


def build_modlist(modules: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(HvmModlistEntry(paddr=paddr, size=size).pack() for paddr, size in modules)


def build_memmap(entries: Sequence[E820Entry]) -> bytes:
    return b"".join(HvmMemmapEntry(addr=e.address, size=e.size, type=e.type).pack()
                    for e in entries)


def read_start_info(data: bytes) -> HvmStartInfo:
    return HvmStartInfo.read(data)


def read_memmap(data: bytes) -> list[E820Entry]:
    """Decode ``hvm_memmap_table_entry`` records (as read back from guest memory)."""
    size = HvmMemmapEntry.sizeof()
    entries = (HvmMemmapEntry.read(data, at) for at in range(0, len(data) - size + 1, size))
    return [E820Entry(e.addr, e.size, e.type) for e in entries]
