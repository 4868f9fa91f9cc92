"""MP table (Intel MP spec 1.4): checksums, entry order and counts for 1..max CPUs."""

import struct

import pytest

from vmmarch_cli.arch.x86_64 import layout, mptable


@pytest.mark.parametrize("cpus", [1, 2, 4, 37, mptable.MAX_CPUS])
def test_checksums_and_entries(cpus: int) -> None:
    t = mptable.build(cpus)
    mpf, rest = t.data[:16], t.data[16:]
    assert mpf[:4] == b"_MP_"
    assert sum(mpf) % 256 == 0
    assert struct.unpack_from("<I", mpf, 4)[0] == t.address + 16
    assert mpf[8] == 1 and mpf[9] == 4
    assert rest[:4] == b"PCMP"
    length, count = struct.unpack_from("<H", rest, 4)[0], struct.unpack_from("<H", rest, 34)[0]
    assert length == len(rest)
    assert sum(rest) % 256 == 0
    assert struct.unpack_from("<I", rest, 36)[0] == layout.APIC_DEFAULT_ADDRESS
    assert len(t.data) == mptable.size(cpus)
    # walk entries: CPUs first (BSP flag on CPU 0 only), then bus, IOAPIC, 24 intsrc, 2 lintsrc
    pos, types, cpu_ids, bsp = 44, [], [], []
    for _ in range(count):
        kind = rest[pos]
        types.append(kind)
        if kind == mptable.MP_PROCESSOR:
            cpu_ids.append(rest[pos + 1])
            bsp.append(bool(rest[pos + 3] & mptable.CPU_BOOTPROCESSOR))
            pos += 20
        else:
            pos += 8
    assert pos == length
    assert types == [0] * cpus + [1, 2] + [3] * 24 + [4, 4]
    assert cpu_ids == list(range(cpus))
    assert bsp == [True] + [False] * (cpus - 1)


def test_too_many_cpus() -> None:
    with pytest.raises(ValueError):
        mptable.build(mptable.MAX_CPUS + 1)


def test_a_table_claiming_more_entries_than_it_holds_is_refused() -> None:
    """A guest may write over the table before dump-regs reads it back: a count past the end
    is a ValueError (reported), never an IndexError."""
    table = bytearray(mptable.build(2, 0).data)
    header = mptable.MpFloatingPointer.sizeof()
    count = header + mptable.MpConfigHeader.entry_count.offset
    table[count:count + 2] = (500).to_bytes(2, "little")
    with pytest.raises(ValueError, match="ends before its entry"):
        mptable.read(lambda a, n: bytes(table[a:a + n]), 0)
