"""Guest memory: every access at and past each region's edge is refused cleanly."""

from pathlib import Path

import pytest

from vmmarch_cli.errors import GuestMemoryError
from vmmarch_cli.memory import MmapGuestMemory

MiB = 1 << 20


@pytest.fixture
def mem() -> MmapGuestMemory:
    m = MmapGuestMemory([(0, 2 * MiB), (4 * MiB, MiB)])
    yield m
    m.close()


def test_round_trip_inside_each_region(mem: MmapGuestMemory) -> None:
    mem.write(2 * MiB - 4, b"abcd")
    mem.write(4 * MiB, b"efgh")
    assert mem.read(2 * MiB - 4, 4) == b"abcd"
    assert mem.read_u32(4 * MiB) == int.from_bytes(b"efgh", "little")
    assert mem.size == 3 * MiB
    assert mem.regions() == [(0, 2 * MiB), (4 * MiB, MiB)]


@pytest.mark.parametrize(
    ("address", "length"),
    [
        (2 * MiB - 3, 4),  # straddles the end of region 0
        (2 * MiB, 1),  # in the hole
        (4 * MiB - 1, 2),  # straddles the start of region 1
        (5 * MiB, 1),  # just past the end
        (5 * MiB - 1, 2),
        (0, 1 << 62),  # huge length
        (-1, 1),
        (1 << 64, 1),
        (0, -1),
    ],
)
def test_out_of_bounds_is_refused(mem: MmapGuestMemory, address: int, length: int) -> None:
    assert not mem.contains(address, length)
    with pytest.raises(GuestMemoryError):
        mem.read(address, length)
    with pytest.raises(GuestMemoryError):
        mem.view(address, length)
    if 0 <= length < 64:
        with pytest.raises(GuestMemoryError):
            mem.write(address, bytes(length))


def test_regions_must_not_overlap() -> None:
    with pytest.raises(GuestMemoryError):
        MmapGuestMemory([(0, 2 * MiB), (MiB, MiB)])


def test_large_guest_costs_nothing_until_touched() -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = MmapGuestMemory([(0, 3 << 30), (4 << 30, 13 << 30)])  # 16 GiB
    m.write((4 << 30) + (12 << 30), b"x")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m.close()
    assert after - before < 64 * 1024  # KiB: far below the 16 GiB mapped


def test_guest_ram_reserves_no_swap() -> None:
    """MAP_NORESERVE is really applied (Python 3.11's mmap module lacks the name): the kernel
    marks such a mapping "nr" in /proc/self/smaps, and strict overcommit accounting skips it."""
    m = MmapGuestMemory([(0, 64 * MiB)])
    try:
        start = m.host_regions()[0][2]
        smaps = Path("/proc/self/smaps").read_text().split("\n")
        header = next(i for i, line in enumerate(smaps)
                      if line.split("-", 1)[0] == f"{start:x}")
        flags = next(line for line in smaps[header:] if line.startswith("VmFlags:"))
        assert " nr" in flags, flags
    finally:
        m.close()
