"""The BIOS e820 memory map handed to the kernel (ACPI spec 6.5, 15.1 "INT 15H E820H").

Entries are sorted by address and never overlap; the low reserved areas (the MP table and the
BIOS area up to 1 MiB) and the 32-bit MMIO gap are left out of RAM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64 import layout

# Address range types (ACPI 6.5 table 15.1).
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4

TYPE_NAMES = {E820_RAM: "usable", E820_RESERVED: "reserved", E820_ACPI: "ACPI data",
              E820_NVS: "ACPI NVS"}


@dataclass(frozen=True, order=True)
class E820Entry:
    address: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.address + self.size


def memory_map(ram_regions: Sequence[tuple[int, int]]) -> list[E820Entry]:
    """The map for guest RAM laid out as ``ram_regions`` (sorted, non-overlapping)."""
    entries = [E820Entry(layout.SYSTEM_MEM_START, layout.BIOS_END - layout.SYSTEM_MEM_START,
                         E820_RESERVED)]
    for start, length in ram_regions:
        end = start + length
        # Conventional memory below the EBDA, then everything from 1 MiB on.
        low = (start, min(end, layout.EBDA_START))
        high = (max(start, layout.HIMEM_START), end)
        for a, b in (low, high):
            if b > a:
                entries.append(E820Entry(a, b - a, E820_RAM))
    return sorted(entries)


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM regions for ``mem_size`` bytes: below the 32-bit MMIO gap, the rest above 4 GiB."""
    below = min(mem_size, layout.MMIO32_START)
    regions = [(0, below)]
    if mem_size > below:
        regions.append((layout.MMIO32_END, mem_size - below))
    return regions
