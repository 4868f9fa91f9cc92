"""Neutral state <-> KVM structures, in one place. Each conversion is total and lossless for the
fields the neutral types carry."""

from __future__ import annotations

from backends.kvm import abi
from vmmarch_cli.vcpu import GPR_NAMES, DescriptorTable, Regs, Segment, Sregs


def regs_to_kvm(r: Regs) -> abi.kvm_regs:
    k = abi.kvm_regs()
    for name in (*GPR_NAMES, "rip", "rflags"):
        setattr(k, name, getattr(r, name))
    return k


def regs_from_kvm(k: abi.kvm_regs) -> Regs:
    return Regs(**{name: getattr(k, name) for name in (*GPR_NAMES, "rip", "rflags")})


SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
#: Fields per kvm_segment in abi.KVM_SREGS_HEAD, and where the descriptor tables start.
_SEG_FIELDS = 13
_TABLES = _SEG_FIELDS * len(SEGMENTS)


def _segment_fields(s: Segment) -> tuple[int, ...]:
    """kvm_segment's fields in order, as segment_to_kvm sets them."""
    a = s.attributes
    present = (a >> 7) & 1
    return (s.base, s.limit, s.selector, a & 0xF, present, (a >> 5) & 3, (a >> 14) & 1,
            (a >> 4) & 1, (a >> 13) & 1, (a >> 15) & 1, (a >> 12) & 1, 0 if present else 1, 0)


def _segment(f: tuple[int, ...]) -> Segment:
    """segment_from_kvm on the unpacked fields (base, limit, selector, type, present, dpl, db,
    s, l, g, avl, unusable, padding)."""
    present = 1 if f[4] and not f[11] else 0
    attributes = (f[3] | f[7] << 4 | f[5] << 5 | present << 7
                  | f[10] << 12 | f[8] << 13 | f[6] << 14 | f[9] << 15)
    return Segment(selector=f[2], base=f[0], limit=f[1], attributes=attributes)


def sregs_to_kvm(s: Sregs, into: abi.kvm_sregs) -> abi.kvm_sregs:
    """Fill ``into`` up to its pending-interrupt bitmap, which is left as it is."""
    fields: list[int] = []
    for seg in (s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt):
        fields += _segment_fields(seg)
    abi.KVM_SREGS_HEAD.pack_into(into, 0, *fields, s.gdt.base, s.gdt.limit, s.idt.base,
                                 s.idt.limit, s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer,
                                 s.apic_base)
    return into


def sregs_from_kvm(k: abi.kvm_sregs) -> Sregs:
    v = abi.KVM_SREGS_HEAD.unpack_from(k)
    cs, ds, es, fs, gs, ss, tr, ldt = (_segment(v[i : i + _SEG_FIELDS])
                                       for i in range(0, _TABLES, _SEG_FIELDS))
    t = _TABLES
    return Sregs(
        cs=cs, ds=ds, es=es, fs=fs, gs=gs, ss=ss, tr=tr, ldt=ldt,
        gdt=DescriptorTable(v[t], v[t + 1]), idt=DescriptorTable(v[t + 2], v[t + 3]),
        cr0=v[t + 4], cr2=v[t + 5], cr3=v[t + 6], cr4=v[t + 7], cr8=v[t + 8], efer=v[t + 9],
        apic_base=v[t + 10],
    )
