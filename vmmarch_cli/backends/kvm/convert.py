"""Neutral state <-> KVM structures, in one place. Each conversion is total and lossless for the
fields the neutral types carry."""

from __future__ import annotations

import functools

from vmmarch_cli.backends.kvm import abi
from vmmarch_cli.vcpu import (
    ATTR_AVL,
    ATTR_DB,
    ATTR_DPL_MASK,
    ATTR_DPL_SHIFT,
    ATTR_G,
    ATTR_L,
    ATTR_P,
    ATTR_S,
    ATTR_TYPE,
    GPR_NAMES,
    DescriptorTable,
    Regs,
    Segment,
    Sregs,
)

_REGS = (*GPR_NAMES, "rip", "rflags")


def regs_to_kvm(r: Regs) -> abi.kvm_regs:
    k = abi.kvm_regs()
    abi.KVM_REGS.pack_into(k, 0, *(getattr(r, name) for name in _REGS))
    return k


def regs_from_kvm(k: abi.kvm_regs) -> Regs:
    return Regs(*abi.KVM_REGS.unpack_from(k))


SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
#: Fields per kvm_segment in abi.KVM_SREGS_HEAD (base, limit, selector, flag bytes), and
#: where the descriptor tables start.
_SEG_FIELDS = 4
_TABLES = _SEG_FIELDS * len(SEGMENTS)


# A segment's flags take a few distinct values (flat code, flat data, TSS, null), and both
# directions are pure functions of them: translated once each, not field by field per call
# (the sregs step is on the measured vCPU-setup path, benchmark case "abstraction").
@functools.lru_cache(maxsize=256)
def _attributes(flags: bytes) -> int:
    """kvm_segment's type, present, dpl, db, s, l, g, avl, unusable, padding as the neutral
    attribute word (vcpu.py, ATTR_*); an unusable segment is not present."""
    type_, present, dpl, db, s, long_, g, avl, unusable, _padding = flags
    word = (type_ & ATTR_TYPE) | (dpl & ATTR_DPL_MASK) << ATTR_DPL_SHIFT
    for bit, on in ((ATTR_S, s), (ATTR_P, present and not unusable), (ATTR_AVL, avl),
                    (ATTR_L, long_), (ATTR_DB, db), (ATTR_G, g)):
        if on:
            word |= bit
    return word


@functools.lru_cache(maxsize=256)
def _flags(attributes: int) -> bytes:
    """The inverse of _attributes: a segment without P is marked unusable."""
    a = attributes
    present = bool(a & ATTR_P)
    return bytes((a & ATTR_TYPE, present, (a >> ATTR_DPL_SHIFT) & ATTR_DPL_MASK,
                  bool(a & ATTR_DB), bool(a & ATTR_S), bool(a & ATTR_L), bool(a & ATTR_G),
                  bool(a & ATTR_AVL), not present, 0))


def sregs_to_kvm(s: Sregs, into: abi.kvm_sregs) -> abi.kvm_sregs:
    """Fill ``into`` up to its pending-interrupt bitmap, which is left as it is."""
    fields: list[int | bytes] = []
    for seg in (s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt):
        fields += (seg.base, seg.limit, seg.selector, _flags(seg.attributes))
    abi.KVM_SREGS_HEAD.pack_into(into, 0, *fields, s.gdt.base, s.gdt.limit, s.idt.base,
                                 s.idt.limit, s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer,
                                 s.apic_base)
    return into


def sregs_from_kvm(k: abi.kvm_sregs) -> Sregs:
    v = abi.KVM_SREGS_HEAD.unpack_from(k)
    made: dict[tuple[int | bytes, ...], Segment] = {}  # DS, ES, FS, GS, SS are often alike
    segments = []
    for i in range(0, _TABLES, _SEG_FIELDS):
        fields = v[i : i + _SEG_FIELDS]
        segment = made.get(fields)
        if segment is None:
            segment = made[fields] = Segment(v[i + 2], v[i], v[i + 1], _attributes(v[i + 3]))
        segments.append(segment)
    cs, ds, es, fs, gs, ss, tr, ldt = segments
    t = _TABLES
    return Sregs(
        cs=cs, ds=ds, es=es, fs=fs, gs=gs, ss=ss, tr=tr, ldt=ldt,
        gdt=DescriptorTable(v[t], v[t + 1]), idt=DescriptorTable(v[t + 2], v[t + 3]),
        cr0=v[t + 4], cr2=v[t + 5], cr3=v[t + 6], cr4=v[t + 7], cr8=v[t + 8], efer=v[t + 9],
        apic_base=v[t + 10],
    )
