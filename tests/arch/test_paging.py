"""Identity page tables (SDM vol. 3A 4.5) and the walker used by crash reports."""

import itertools

import pytest

from vmmarch_cli.arch.x86_64 import layout, paging
from vmmarch_cli.errors import GuestMemoryError
from vmmarch_cli.memory import MmapGuestMemory


def _memory_with_tables() -> MmapGuestMemory:
    mem = MmapGuestMemory([(0, 1 << 20)])
    for address, data in paging.identity_tables().tables:
        mem.write(address, data)
    return mem


def test_table_entries() -> None:
    t = paging.identity_tables(4)
    tables = dict(t.tables)
    assert t.cr3 == layout.PML4_START == 0x9000
    assert int.from_bytes(tables[0x9000][:8], "little") == 0xA003
    pdpt = tables[0xA000]
    assert [int.from_bytes(pdpt[i * 8 : i * 8 + 8], "little") for i in range(5)] == [
        0xB003, 0xC003, 0xD003, 0xE003, 0,
    ]
    pd0 = tables[0xB000]
    assert int.from_bytes(pd0[:8], "little") == 0x83
    assert int.from_bytes(pd0[8:16], "little") == 0x200083
    pd3 = tables[0xE000]
    assert int.from_bytes(pd3[511 * 8 :], "little") == (0xFFE00000 | 0x83)


def test_covers_kernel_and_init_size_beyond_1g() -> None:
    mem = _memory_with_tables()
    for va in (0x1000000, 0x3378000 + 0x1000000, 0x4000_0000, 0xBFFF_FFFF, 0xFFFF_F000):
        assert paging.translate(0x9000, va, mem.read_u64) == va
    assert paging.translate(0x9000, 0x1_0000_0000, mem.read_u64) is None


def test_tables_do_not_overlap_other_boot_structures() -> None:
    ranges = sorted((a, a + len(d)) for a, d in paging.identity_tables().tables)
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end <= start
    assert ranges[0][0] > layout.BOOT_STACK_POINTER
    assert ranges[-1][1] <= layout.CMDLINE_START


def test_walker_refuses_tables_outside_ram() -> None:
    mem = _memory_with_tables()
    with pytest.raises(GuestMemoryError):
        paging.translate(0x7FFF_F000, 0x1000, mem.read_u64)


def test_walk_reports_write_rights_of_every_level() -> None:
    """SDM vol. 3A 4.6.1: a write is allowed only if R/W is set at every level."""
    mem = _memory_with_tables()
    assert paging.walk(0x9000, 0x20_0000, mem.read_u64) == (0x20_0000, True)
    pd0 = 0xB000
    mem.write(pd0 + 8, (0x20_0000 | 0x81).to_bytes(8, "little"))  # P, PS: R/W clear
    assert paging.walk(0x9000, 0x20_1234, mem.read_u64) == (0x20_1234, False)
    assert paging.walk(0x9000, 0x40_0000, mem.read_u64) == (0x40_0000, True)
