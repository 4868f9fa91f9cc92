"""Identity page tables for the 64-bit entry, and a reader that walks a guest's tables.

4-level paging, Intel SDM vol. 3A 4.5: PML4 -> PDPT -> PD with 2 MiB pages (PS=1 in the PDE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64 import layout
from vmmarch_cli.arch.x86_64.regs import X86_CR0_PG
from vmmarch_cli.errors import GuestMemoryError
from vmmarch_cli.vcpu import GuestMemory, Sregs

#: A bounds-checked guest-physical u64 reader.
ReadU64 = Callable[[int], int]

# Paging-structure entry bits (SDM vol. 3A tables 4-15 to 4-18).
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7  # in a PDE: maps a 2 MiB page; in a PDPTE: a 1 GiB page
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 (MAXPHYADDR is at most 52)

PAGE_SIZE = 4 << 10  # the smallest page (SDM vol. 3A 4.5, table 4-1)
PAGE_SIZE_2M = 2 << 20
ENTRIES_PER_TABLE = 512


@dataclass(frozen=True)
class PageTables:
    """Bytes to write at each guest-physical address, and the CR3 that points at them."""

    cr3: int
    tables: tuple[tuple[int, bytes], ...]


def identity_tables(gib: int = layout.IDENTITY_MAP_GIB) -> PageTables:
    """Map guest-virtual == guest-physical for the low ``gib`` GiB with 2 MiB pages."""
    if not 1 <= gib <= ENTRIES_PER_TABLE:
        raise ValueError(f"can identity-map 1..512 GiB with one PDPT, not {gib}")
    table_flags = PTE_PRESENT | PTE_WRITABLE
    pml4 = _table([layout.PDPT_START | table_flags])
    pdpt = _table([layout.PD_START + i * 0x1000 | table_flags for i in range(gib)])
    tables = [(layout.PML4_START, pml4), (layout.PDPT_START, pdpt)]
    for g in range(gib):
        first = g * ENTRIES_PER_TABLE
        pd = _table(
            [(first + i) * PAGE_SIZE_2M | table_flags | PTE_PAGE_SIZE for i in range(512)]
        )
        tables.append((layout.PD_START + g * 0x1000, pd))
    return PageTables(cr3=layout.PML4_START, tables=tuple(tables))


def _table(entries: list[int]) -> bytes:
    out = bytearray(0x1000)
    for i, e in enumerate(entries):
        out[i * 8 : i * 8 + 8] = e.to_bytes(8, "little")
    return bytes(out)


def translate(cr3: int, virtual: int, read_u64: ReadU64) -> int | None:
    """Walk 4-level tables from ``cr3`` the way the CPU does; None where a level is absent.

    ``read_u64`` is a bounds-checked guest-memory reader: a table outside RAM raises there,
    so a guest-chosen CR3 can never make this read host memory.
    """
    found = walk(cr3, virtual, read_u64)
    return None if found is None else found[0]


def walk(cr3: int, virtual: int, read_u64: ReadU64) -> tuple[int, bool] | None:
    """``translate``, with whether every level allows writes (R/W set at each, SDM vol. 3A
    4.6.1: the access rights of a translation combine those of all its entries)."""
    writable = True
    entry = read_u64((cr3 & ADDRESS_MASK) + ((virtual >> 39) & 0x1FF) * 8)
    if not entry & PTE_PRESENT:
        return None
    writable &= bool(entry & PTE_WRITABLE)
    entry = read_u64((entry & ADDRESS_MASK) + ((virtual >> 30) & 0x1FF) * 8)
    if not entry & PTE_PRESENT:
        return None
    writable &= bool(entry & PTE_WRITABLE)
    if entry & PTE_PAGE_SIZE:
        return (entry & ADDRESS_MASK & ~((1 << 30) - 1)) | (virtual & ((1 << 30) - 1)), writable
    entry = read_u64((entry & ADDRESS_MASK) + ((virtual >> 21) & 0x1FF) * 8)
    if not entry & PTE_PRESENT:
        return None
    writable &= bool(entry & PTE_WRITABLE)
    if entry & PTE_PAGE_SIZE:
        return (entry & ADDRESS_MASK & ~((1 << 21) - 1)) | (virtual & ((1 << 21) - 1)), writable
    entry = read_u64((entry & ADDRESS_MASK) + ((virtual >> 12) & 0x1FF) * 8)
    if not entry & PTE_PRESENT:
        return None
    writable &= bool(entry & PTE_WRITABLE)
    return (entry & ADDRESS_MASK) | (virtual & 0xFFF), writable


def memory_u64(memory: GuestMemory) -> ReadU64:
    return lambda address: int.from_bytes(memory.read(address, 8), "little")


def guest_physical(sregs: Sregs, virtual: int, memory: GuestMemory) -> int | None:
    """The guest-physical address the CPU in ``sregs``'s state reaches for ``virtual``: the low
    32 bits with paging off (CR0.PG clear), else the 4-level walk from CR3; None where nothing
    is mapped or a table lies outside guest RAM."""
    if not sregs.cr0 & X86_CR0_PG:
        return virtual & 0xFFFF_FFFF
    try:
        return translate(sregs.cr3, virtual, memory_u64(memory))
    except GuestMemoryError:
        return None
