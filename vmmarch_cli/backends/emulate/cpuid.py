"""CPUID for the emulated CPU: what it supports, and answering the guest from the VMM's table.

unicorn answers CPUID from its own CPU model; the VMM's table (``Vcpu.set_cpuid``) would be
ignored. So the vCPU hooks the instruction and answers from the table with ``answer`` below,
which follows KVM's lookup (arch/x86/kvm/cpuid.c, ``kvm_cpuid`` and
``get_out_of_range_cpuid_entry``) so both backends give the guest the same answer for the same
table, including for leaves the table does not have.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from vmmarch_cli.arch.x86_64 import msr
from vmmarch_cli.arch.x86_64.cpuid import with_feature, without
from vmmarch_cli.vcpu import CpuidEntry

#: Leaves whose ECX selects a subleaf (SDM vol. 2A, CPUID, "INPUT EAX = ..." notes).
INDEXED_LEAVES = frozenset({
    0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x20,
    0x8000_001D, 0x8000_0020,
})
#: Subleaves probed per indexed leaf (leaf 0DH has components up to 63).
MAX_SUBLEAF = 64
#: Guards against a model that reports an absurd maximum leaf.
MAX_LEAVES_PER_RANGE = 0x40
EXTENDED_BASE = 0x8000_0000
HYPERVISOR_BASE = 0x4000_0000
CENTAUR_BASE = 0xC000_0000
#: "AuthenticAMD" / "HygonGenuine" in EBX: AMD CPUs return zeros out of range (APM vol. 3, CPUID).
AMD_LIKE_EBX = frozenset({0x6874_7541, 0x6F67_7948})

Answer = tuple[int, int, int, int]
QueryFn = Callable[[int, int], Answer]


def find(table: Sequence[CpuidEntry], function: int, index: int) -> CpuidEntry | None:
    for e in table:
        if e.function == function and (not e.indexed or e.index == index):
            return e
    return None


def answer(table: Sequence[CpuidEntry], function: int, index: int) -> Answer:
    """EAX..EDX for CPUID(function, index) from ``table``, as KVM computes it.

    A leaf above the maximum of its range returns the highest basic leaf on Intel (SDM vol. 2A,
    CPUID: "If a value entered for CPUID.EAX is higher than the maximum input value ... the data
    for the highest basic information leaf is returned"); anything else missing reads as zeros.
    """
    entry = find(table, function, index)
    if entry is None:
        entry = _out_of_range(table, function, index)
    if entry is None:
        return (0, 0, 0, 0)
    return (entry.eax, entry.ebx, entry.ecx, entry.edx)


#: CPUID bits that report control-register state, not the CPU model, as the CPU computes them
#: (KVM does the same in kvm_update_cpuid_runtime): CPUID.01H:ECX.OSXSAVE[27] is CR4.OSXSAVE[18]
#: and CPUID.(07H,0):ECX.OSPKE[4] is CR4.PKE[22] (SDM vol. 2A, CPUID, tables 3-10 and 3-8).
LEAF1_ECX_OSXSAVE = 1 << 27
CR4_OSXSAVE = 1 << 18
LEAF7_ECX_OSPKE = 1 << 4
CR4_PKE = 1 << 22


def with_os_bits(function: int, index: int, result: Answer, cr4: int) -> Answer:
    """``result`` with its OS-state bits taken from ``cr4``. A table answer alone says OSXSAVE
    while a kernel told ``clearcpuid=xsave`` left CR4.OSXSAVE clear, and libc's XGETBV, which
    trusts the bit, then raises #UD in user space."""
    eax, ebx, ecx, edx = result
    if function == 1:
        ecx = (ecx & ~LEAF1_ECX_OSXSAVE) | (LEAF1_ECX_OSXSAVE if cr4 & CR4_OSXSAVE else 0)
    elif function == 7 and index == 0:
        ecx = (ecx & ~LEAF7_ECX_OSPKE) | (LEAF7_ECX_OSPKE if cr4 & CR4_PKE else 0)
    return (eax, ebx, ecx, edx)


def _out_of_range(table: Sequence[CpuidEntry], function: int, index: int) -> CpuidEntry | None:
    basic = find(table, 0, 0)
    if basic is None or basic.ebx in AMD_LIKE_EBX:
        return None
    if HYPERVISOR_BASE <= function <= 0x4FFF_FFFF:
        range_leaf = find(table, function & 0xFFFF_FF00, 0)
    elif function >= CENTAUR_BASE:
        range_leaf = find(table, CENTAUR_BASE, 0)
    else:
        range_leaf = find(table, function & EXTENDED_BASE, 0)
    if range_leaf is not None and function <= range_leaf.eax:
        return None  # inside its range, just absent: zeros
    return find(table, basic.eax, index)


#: Features the model has that make a guest slower on a translating CPU, left out of what the
#: backend offers. ERMS (and FSRM) tell Linux and glibc to copy and clear memory with
#: ``rep movsb``/``rep stosb``, which QEMU's TCG, and so unicorn, executes one byte per
#: iteration of a translated loop; without them Linux uses the quadword forms (``rep stosq``,
#: its unrolled memcpy): a boot of Debian's kernel to its init marker took 0.998 s with ERMS,
#: 0.929 s without (medians of 5, the same engine).
SLOW_ON_TCG = ("erms", "fsrm")


#: What RDMSR of IA32_ARCH_CAPABILITIES gives the guest (patch 0014): not affected by any
#: speculative-execution attack, which is true of a CPU that executes nothing speculatively.
#: Told nothing, Linux assumes the worst of the Haswell model unicorn reports and turns on
#: page-table isolation (a CR3 switch on every kernel entry and exit), ITS return thunks (every
#: ``ret`` a jump to a thunk) and MDS buffer clearing; QEMU's TCG, which reports an AMD CPU,
#: gets none of them. Measured: a boot of Debian's kernel to its init marker 3.2% faster (dev
#: builds, 7 interleaved pairs). The enhanced-IBRS bit stays clear: with it Linux trades its
#: retpolines for branch-history clearing on every system call, and the boot was slower than
#: this (1.5% faster than none).
ARCH_CAPABILITIES = msr.ARCH_CAP_NOT_AFFECTED


@functools.cache
def model_cpuid() -> tuple[CpuidEntry, ...]:
    """Every leaf unicorn's CPU model reports, read by running CPUID in a scratch engine, less
    ``SLOW_ON_TCG``, and IA32_ARCH_CAPABILITIES where the engine gives it (``ARCH_CAPABILITIES``).

    This is what the emulator can run (TCG implements what its model advertises), the
    counterpart of KVM_GET_SUPPORTED_CPUID. It is the same on every call, so it is cached.
    """
    from vmmarch_cli.backends.emulate.engine import scratch_cpuid
    from vmmarch_cli.backends.emulate.library import SystemCpu

    query = scratch_cpuid()
    entries: list[CpuidEntry] = []
    for base in (0, EXTENDED_BASE):
        top = min(query(base, 0)[0], base + MAX_LEAVES_PER_RANGE)
        for function in range(base, top + 1):
            entries.extend(_leaf(query, function))
    entries = without(entries, SLOW_ON_TCG)
    if SystemCpu.reports_arch_capabilities():
        entries = with_feature(entries, "arch_capabilities")
    return tuple(entries)


def _leaf(query: QueryFn, function: int) -> list[CpuidEntry]:
    if function not in INDEXED_LEAVES:
        return [CpuidEntry(function, 0, *query(function, 0))]
    out: list[CpuidEntry] = []
    for index in range(MAX_SUBLEAF):
        regs = query(function, index)
        if index > 0 and _past_last_subleaf(function, regs):
            if function == 0xD:
                continue  # 0DH has holes between state components (SDM vol. 1 13.2)
            break
        out.append(CpuidEntry(function, index, *regs, indexed=True))
    return out


def _past_last_subleaf(function: int, regs: Answer) -> bool:
    eax, _, ecx, _ = regs
    if function == 0x4:
        return eax & 0x1F == 0  # cache type 0: no more caches
    if function in (0xB, 0x1F):
        return (ecx >> 8) & 0xFF == 0  # level type 0: invalid level
    return not any(regs)


#: The emulated local APIC timer and the crystal clock CPUID 15H reports (SDM vol. 2A, CPUID
#: leaf 15H: ECX = crystal Hz, TSC = crystal * EBX / EAX). Linux takes the TSC frequency from
#: this leaf on Intel CPUs and sets its APIC timer period from the crystal (native_calibrate_tsc),
#: so it neither calibrates against a PIT (which a hardware-reduced ACPI machine lacks) nor
#: busy-waits for it. Linux computes tsc_khz = crystal_khz * EBX / EAX in 32-bit unsigned
#: arithmetic, so crystal_khz * EBX must stay below 2^32: a 1 MHz crystal with EAX = 1000 lets
#: EBX be the rate in kHz (exact to 1 kHz, 0.4 ppm at 2.6 GHz) up to 4.29 GHz; above that the
#: ratio is stated in 10 kHz (EAX = 100). (With the 1 GHz crystal used before, EBX had to be
#: the rate in MHz: 385 ppm off, 33 ms a day.) The APIC timer then counts at 1 MHz.
CRYSTAL_HZ = 1_000_000
LEAF_TSC = 0x15
TSC_RATIO_DENOMINATOR = 1000
TSC_RATIO_DENOMINATOR_FAST = 100
#: crystal_khz * EBX must be below this (native_calibrate_tsc's unsigned int product).
LINUX_PRODUCT_LIMIT = 1 << 32
#: Leaf 16H (SDM vol. 2A, CPUID: EAX base MHz, EBX maximum MHz, ECX bus MHz). Linux reads the
#: CPU frequency from it before anything else (cpu_khz_from_cpuid); without it, it tries the
#: PIT: ~100,000 reads of port 0x42 that no device answers (measured), each a trip to Python.
LEAF_FREQUENCY = 0x16
BUS_MHZ = 100


def with_timing_leaf(entries: Sequence[CpuidEntry], tsc_hz: int) -> list[CpuidEntry]:
    """``entries`` plus leaves 15H and 16H for a TSC of ``tsc_hz`` (to 1 kHz; leaf 16H to
    1 MHz), leaf 0 raised to reach them."""
    from dataclasses import replace

    denominator = TSC_RATIO_DENOMINATOR
    numerator = max(round(tsc_hz * denominator / CRYSTAL_HZ), 1)
    if CRYSTAL_HZ // 1000 * numerator >= LINUX_PRODUCT_LIMIT:
        denominator = TSC_RATIO_DENOMINATOR_FAST
        numerator = max(round(tsc_hz * denominator / CRYSTAL_HZ), 1)
    mhz = max(round(tsc_hz / 1_000_000), 1)
    out = [e for e in entries if e.function not in (LEAF_TSC, LEAF_FREQUENCY)]
    out = [replace(e, eax=max(e.eax, LEAF_FREQUENCY)) if e.function == 0 else e for e in out]
    out.append(CpuidEntry(LEAF_TSC, 0, denominator, numerator, CRYSTAL_HZ, 0))
    out.append(CpuidEntry(LEAF_FREQUENCY, 0, mhz, mhz, BUS_MHZ, 0))
    return sorted(out, key=lambda e: (e.function, e.index))
