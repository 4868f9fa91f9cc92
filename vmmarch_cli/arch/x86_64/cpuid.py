"""CPUID for each vCPU: start from what the hypervisor supports, then normalise and mask.

Bit positions: Intel SDM vol. 2A, CPUID instruction, tables 3-8 to 3-10 and the leaf 07H/0BH/0DH
descriptions; AMD APM vol. 3 appendix E for the 8000_0001H bits. Feature names are the ones
Linux prints in /proc/cpuinfo, so ``--cpu-mask`` reads like ``clearcpuid=``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from vmmarch_cli.errors import BadInputError
from vmmarch_cli.vcpu import CpuidEntry

Register = Literal["eax", "ebx", "ecx", "edx"]


@dataclass(frozen=True)
class FeatureBit:
    function: int
    index: int
    register: Register
    bit: int


def _bits(
    function: int, index: int, register: Register, names: dict[str, int]
) -> dict[str, FeatureBit]:
    return {name: FeatureBit(function, index, register, bit) for name, bit in names.items()}


#: Feature name -> where CPUID reports it.
FEATURES: dict[str, FeatureBit] = {
    **_bits(0x1, 0, "ecx", {
        "sse3": 0, "pclmulqdq": 1, "ssse3": 9, "fma": 12, "cx16": 13, "pdcm": 15, "pcid": 17,
        "sse4_1": 19, "sse4_2": 20, "x2apic": 21, "movbe": 22, "popcnt": 23,
        "tsc_deadline_timer": 24, "aes": 25, "xsave": 26, "osxsave": 27, "avx": 28, "f16c": 29,
        "rdrand": 30, "hypervisor": 31,
    }),
    **_bits(0x1, 0, "edx", {
        "fpu": 0, "tsc": 4, "msr": 5, "pae": 6, "cx8": 8, "apic": 9, "mtrr": 12, "pge": 13,
        "cmov": 15, "pat": 16, "clflush": 19, "mmx": 23, "fxsr": 24, "sse": 25, "sse2": 26,
        "ht": 28,
    }),
    **_bits(0x7, 0, "ebx", {
        "fsgsbase": 0, "bmi1": 3, "hle": 4, "avx2": 5, "smep": 7, "bmi2": 8, "erms": 9,
        "invpcid": 10, "rtm": 11, "avx512f": 16, "avx512dq": 17, "rdseed": 18, "adx": 19,
        "smap": 20, "avx512ifma": 21, "clflushopt": 23, "clwb": 24, "avx512cd": 28,
        "sha_ni": 29, "avx512bw": 30, "avx512vl": 31,
    }),
    **_bits(0x7, 0, "ecx", {
        "avx512vbmi": 1, "umip": 2, "pku": 3, "ospke": 4, "waitpkg": 5, "avx512_vbmi2": 6,
        "gfni": 8, "vaes": 9, "vpclmulqdq": 10, "avx512_vnni": 11, "avx512_bitalg": 12,
        "avx512_vpopcntdq": 14, "la57": 16, "rdpid": 22, "movdiri": 27, "movdir64b": 28,
    }),
    **_bits(0x7, 0, "edx", {
        "fsrm": 4, "md_clear": 10, "serialize": 14, "tsxldtrk": 16, "amx_bf16": 22,
        "avx512_fp16": 23, "amx_tile": 24, "amx_int8": 25, "arch_capabilities": 29,
    }),
    **_bits(0x7, 1, "eax", {"avx_vnni": 4, "avx512_bf16": 5}),
    **_bits(0xD, 1, "eax", {"xsaveopt": 0, "xsavec": 1, "xgetbv1": 2, "xsaves": 3}),
    **_bits(0x8000_0001, 0, "ecx", {"lahf_lm": 0, "abm": 5, "sse4a": 6, "topoext": 22}),
    **_bits(0x8000_0001, 0, "edx", {
        "syscall": 11, "nx": 20, "pdpe1gb": 26, "rdtscp": 27, "lm": 29,
    }),
}

#: Masking a feature masks what cannot work without it: exactly the pairs of Linux's
#: arch/x86/kernel/cpu/cpuid-deps.c (v6.1) among the features named here, so that a kernel told
#: to clear the parent (``clearcpuid=``) clears the same children we do.
DEPENDENTS: dict[str, tuple[str, ...]] = {
    "xsave": ("xsaveopt", "xsavec", "xsaves", "xgetbv1", "avx", "pku"),
    "avx": ("fma", "avx2", "avx512f"),
    "avx512f": (
        "avx512dq", "avx512ifma", "avx512cd", "avx512bw", "avx512vl", "avx512vbmi",
        "avx512_vbmi2", "avx512_vpopcntdq", "avx512_fp16",
    ),
    "avx512vl": ("gfni", "vaes", "vpclmulqdq", "avx512_vnni", "avx512_bitalg", "avx512_bf16"),
    "pku": ("ospke",),
}

#: Features that must stay: the 64-bit boot path and the pipeline itself rely on them.
REQUIRED = frozenset({"fpu", "tsc", "msr", "pae", "apic", "cx8", "cmov", "fxsr", "sse", "sse2",
                      "lm", "nx", "syscall", "hypervisor"})


def parse_mask(text: str) -> frozenset[str]:
    """``"cx16,xsave"`` -> the features named and everything depending on them."""
    names = [n.strip().lower().replace("-", "_") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise BadInputError(
            f"unknown CPU feature {', '.join(unknown)} in --cpu-mask; "
            f"known: {', '.join(sorted(FEATURES))}"
        )
    required = [n for n in names if n in REQUIRED]
    if required:
        raise BadInputError(
            f"--cpu-mask cannot hide {', '.join(required)}: a 64-bit kernel needs it to boot"
        )
    return close_mask(names)


def close_mask(names: Iterable[str]) -> frozenset[str]:
    """The names plus everything that depends on them, transitively."""
    out: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(DEPENDENTS.get(name, ()))
    return frozenset(out)


@dataclass(frozen=True)
class Topology:
    """Where one vCPU sits: its APIC ID and how many vCPUs the VM has (one thread per core)."""

    apic_id: int
    cpu_count: int


# Leaf numbers (SDM vol. 2A, CPUID).
LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_EXTENDED_FEATURES = 0x7
LEAF_PMU = 0xA
LEAF_TOPOLOGY = 0xB
LEAF_XSAVE = 0xD
LEAF_V2_TOPOLOGY = 0x1F
LEAF_EXT_ADDRESS_SIZES = 0x8000_0008

#: Leaf 0BH level types in ECX[15:8] (SDM vol. 2A, "Extended Topology Enumeration Leaf").
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2


def normalize(
    supported: Sequence[CpuidEntry], topology: Topology, mask: frozenset[str]
) -> list[CpuidEntry]:
    """The CPUID table for one vCPU.

    Leaf 1 gets this vCPU's APIC ID, the logical count, the CLFLUSH size and the hypervisor bit;
    leaves 0BH/1FH describe one thread per core and ``cpu_count`` cores; leaf 0AH is cleared
    (no PMU offered); masked features read as 0, and leaf 0DH is emptied when XSAVE is masked.
    """
    entries: list[CpuidEntry] = []
    for e in supported:
        if e.function in (LEAF_TOPOLOGY, LEAF_V2_TOPOLOGY):
            continue  # rebuilt below
        e = _edit_leaf(e, topology)
        if e.function == LEAF_XSAVE and "xsave" in mask:
            e = replace(e, eax=0, ebx=0, ecx=0, edx=0)
        entries.append(e)
    present = {e.function for e in supported}
    entries.extend(_topology_leaves(LEAF_TOPOLOGY, topology))
    if LEAF_V2_TOPOLOGY in present:
        entries.extend(_topology_leaves(LEAF_V2_TOPOLOGY, topology))
    clear = _clear_bits(mask)
    entries = [_apply_mask(e, clear) for e in entries]
    return sorted(entries, key=lambda e: (e.function, e.index))


def _edit_leaf(e: CpuidEntry, t: Topology) -> CpuidEntry:
    if e.function == LEAF_FEATURES:
        # EBX: [31:24] initial APIC ID, [23:16] addressable logical IDs, [15:8] CLFLUSH line
        # size in 8-byte units (8 = 64 bytes), [7:0] brand index.
        ebx = (t.apic_id << 24) | (_next_pow2(t.cpu_count) << 16) | (8 << 8) | (e.ebx & 0xFF)
        ecx = e.ecx | (1 << FEATURES["hypervisor"].bit)
        ecx &= ~(1 << FEATURES["pdcm"].bit)  # no perf-capabilities MSR offered
        edx = e.edx & ~(1 << FEATURES["ht"].bit)
        if t.cpu_count > 1:
            edx |= 1 << FEATURES["ht"].bit  # "more than one logical processor in the package"
        return replace(e, ebx=ebx, ecx=ecx, edx=edx)
    if e.function == LEAF_CACHE_PARAMS and e.eax & 0x1F:
        # EAX[25:14]: logical processors sharing this cache - 1; [31:26]: cores per package - 1.
        level = (e.eax >> 5) & 0x7
        sharing = t.cpu_count - 1 if level >= 3 else 0
        eax = (e.eax & 0x3FFF) | (min(sharing, 0xFFF) << 14) | (min(t.cpu_count - 1, 0x3F) << 26)
        return replace(e, eax=eax)
    if e.function == LEAF_PMU:
        return replace(e, eax=0, ebx=0, ecx=0, edx=0)
    if e.function == LEAF_EXT_ADDRESS_SIZES:
        # ECX[7:0]: number of physical cores - 1 (AMD APM vol. 3, CPUID Fn8000_0008).
        return replace(e, ecx=(e.ecx & ~0xFF) | (t.cpu_count - 1))
    return e


def _topology_leaves(function: int, t: Topology) -> list[CpuidEntry]:
    """Leaf 0BH/1FH: an SMT level of one thread, a core level of ``cpu_count`` cores."""
    core_shift = max(t.cpu_count - 1, 0).bit_length()
    return [
        CpuidEntry(function, 0, eax=0, ebx=1, ecx=(LEVEL_TYPE_SMT << 8) | 0, edx=t.apic_id,
                   indexed=True),
        CpuidEntry(function, 1, eax=core_shift, ebx=t.cpu_count, ecx=(LEVEL_TYPE_CORE << 8) | 1,
                   edx=t.apic_id, indexed=True),
        CpuidEntry(function, 2, eax=0, ebx=0, ecx=2, edx=t.apic_id, indexed=True),
    ]


def without(entries: Sequence[CpuidEntry], names: Iterable[str]) -> list[CpuidEntry]:
    """``entries`` with the named features (and what depends on them) reading as absent."""
    clear = _clear_bits(close_mask(names))
    return [_apply_mask(e, clear) for e in entries]


def with_feature(entries: Sequence[CpuidEntry], name: str) -> list[CpuidEntry]:
    """``entries`` with the named feature reported (its leaf must be there already)."""
    f = FEATURES[name]
    return [replace(e, **{f.register: getattr(e, f.register) | 1 << f.bit})
            if (e.function, e.index) == (f.function, f.index) else e for e in entries]


def _clear_bits(mask: frozenset[str]) -> dict[tuple[int, int], dict[Register, int]]:
    """(leaf, subleaf) -> register -> the bits the mask clears there."""
    out: dict[tuple[int, int], dict[Register, int]] = {}
    for name in mask:
        f = FEATURES[name]
        regs = out.setdefault((f.function, f.index), {})
        regs[f.register] = regs.get(f.register, 0) | (1 << f.bit)
    return out


def _apply_mask(e: CpuidEntry, clear: dict[tuple[int, int], dict[Register, int]]) -> CpuidEntry:
    bits = clear.get((e.function, e.index))
    if not bits:
        return e
    return replace(e, **{reg: getattr(e, reg) & ~b for reg, b in bits.items()})


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def leaked(mask: frozenset[str], readback: Sequence[CpuidEntry]) -> list[str]:
    """Masked features the guest still sees after ``set_cpuid`` (a hypervisor that overrides
    some leaves), without those a listed one already implies. Order follows ``mask`` sorting.
    """
    visible = {name for name in mask if has_feature(readback, name)}
    implied = {dep for name in visible for dep in close_mask([name]) if dep != name}
    return sorted(visible - implied)


def has_feature(entries: Sequence[CpuidEntry], name: str) -> bool:
    f = FEATURES[name]
    for e in entries:
        if e.function == f.function and e.index == f.index:
            return bool(getattr(e, f.register) >> f.bit & 1)
    return False
