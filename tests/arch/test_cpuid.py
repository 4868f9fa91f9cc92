"""CPUID normalisation and feature masks (SDM vol. 2A CPUID; Firecracker normalize.rs)."""

import pytest

from vmmarch_cli.arch.x86_64 import cpuid
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.vcpu import CpuidEntry

SUPPORTED = [
    CpuidEntry(0x0, 0, eax=0x1F, ebx=0x68747541),
    CpuidEntry(0x1, 0, eax=0xB00F21, ebx=0x00020800 | 0x05, ecx=0xF7FA3203 | (1 << 15),
               edx=0x178BFBFF),
    CpuidEntry(0x4, 0, eax=0x121 | (7 << 14) | (3 << 26), indexed=True),
    CpuidEntry(0x4, 3, eax=0x163 | (7 << 14), indexed=True),
    CpuidEntry(0x7, 0, ebx=0xF1BF07AB, ecx=0x5F46 | (1 << 22), indexed=True),
    CpuidEntry(0xA, 0, eax=0x07300805),
    CpuidEntry(0xB, 0, eax=1, ebx=2, ecx=0x100, edx=7, indexed=True),
    CpuidEntry(0xD, 0, eax=0xE7, ebx=0x240, ecx=0x980, indexed=True),
    CpuidEntry(0xD, 1, eax=0xF, indexed=True),
    CpuidEntry(0x1F, 0, indexed=True),
    CpuidEntry(0x8000_0001, 0, edx=(1 << 27) | (1 << 29)),
]


def _leaf(entries: list[CpuidEntry], fn: int, idx: int = 0) -> CpuidEntry:
    return next(e for e in entries if e.function == fn and e.index == idx)


def test_leaf1_topology_and_hypervisor_bit() -> None:
    out = cpuid.normalize(SUPPORTED, cpuid.Topology(apic_id=3, cpu_count=3), frozenset())
    l1 = _leaf(out, 1)
    assert l1.ebx >> 24 == 3  # initial APIC ID
    assert (l1.ebx >> 16) & 0xFF == 4  # next power of two of 3
    assert (l1.ebx >> 8) & 0xFF == 8  # 64-byte CLFLUSH
    assert l1.ebx & 0xFF == 0x05  # brand index kept
    assert l1.ecx >> 31 == 1
    assert not l1.ecx & (1 << 15)  # PDCM cleared
    assert l1.edx & (1 << 28)  # HTT with >1 CPU
    one = _leaf(cpuid.normalize(SUPPORTED, cpuid.Topology(0, 1), frozenset()), 1)
    assert not one.edx & (1 << 28)
    assert (one.ebx >> 16) & 0xFF == 1


def test_topology_leaves_rebuilt() -> None:
    out = cpuid.normalize(SUPPORTED, cpuid.Topology(apic_id=2, cpu_count=4), frozenset())
    b = [e for e in out if e.function == 0xB]
    assert [(e.index, e.eax, e.ebx, e.ecx, e.edx) for e in b] == [
        (0, 0, 1, 0x100, 2), (1, 2, 4, 0x201, 2), (2, 0, 0, 2, 2),
    ]
    assert all(e.indexed for e in b)
    assert [e.index for e in out if e.function == 0x1F] == [0, 1, 2]


def test_pmu_hidden_and_cache_sharing() -> None:
    out = cpuid.normalize(SUPPORTED, cpuid.Topology(0, 2), frozenset())
    assert _leaf(out, 0xA) == CpuidEntry(0xA, 0)
    l1cache, l3 = _leaf(out, 4, 0), _leaf(out, 4, 3)
    assert (l1cache.eax >> 14) & 0xFFF == 0 and l1cache.eax >> 26 == 1
    assert (l3.eax >> 14) & 0xFFF == 1


def test_mask_clears_bits_and_dependents() -> None:
    mask = cpuid.parse_mask("cx16,xsave,popcnt,rdtscp,rdpid")
    assert {"avx", "avx2", "xsaveopt", "avx512f", "gfni", "pku"} <= mask
    out = cpuid.normalize(SUPPORTED, cpuid.Topology(0, 1), mask)
    for name in ("cx16", "xsave", "popcnt", "avx", "rdtscp", "avx2", "rdpid", "xsaveopt"):
        assert not cpuid.has_feature(out, name), name
    assert cpuid.has_feature(out, "sse4_2")
    assert _leaf(out, 0xD, 0) == CpuidEntry(0xD, 0, indexed=True)  # XSAVE leaf emptied
    assert cpuid.has_feature(out, "lm")


def test_leaked_lists_only_visible_roots() -> None:
    mask = cpuid.parse_mask("xsave,popcnt,rdseed")
    # a hypervisor that ignored the table: the original leaves come back
    assert cpuid.leaked(mask, SUPPORTED) == ["popcnt", "rdseed", "xsave"]
    assert cpuid.leaked(mask, cpuid.normalize(SUPPORTED, cpuid.Topology(0, 1), mask)) == []


@pytest.mark.parametrize("text", ["nosuchflag", "cx16,bogus"])
def test_unknown_feature_is_bad_input(text: str) -> None:
    with pytest.raises(BadInputError, match="unknown CPU feature"):
        cpuid.parse_mask(text)


def test_required_feature_cannot_be_masked() -> None:
    with pytest.raises(BadInputError, match="needs it"):
        cpuid.parse_mask("lm")
