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


def segment_to_kvm(s: Segment) -> abi.kvm_segment:
    """Split the attribute word into kvm_segment's one-byte fields (SDM vol. 3A 3.4.5)."""
    a = s.attributes
    k = abi.kvm_segment()
    k.base = s.base
    k.limit = s.limit
    k.selector = s.selector
    k.type = a & 0xF
    k.s = (a >> 4) & 1
    k.dpl = (a >> 5) & 3
    k.present = (a >> 7) & 1
    k.avl = (a >> 12) & 1
    k.l = (a >> 13) & 1
    k.db = (a >> 14) & 1
    k.g = (a >> 15) & 1
    k.unusable = 0 if k.present else 1
    return k


def segment_from_kvm(k: abi.kvm_segment) -> Segment:
    present = k.present and not k.unusable
    attributes = (
        k.type | k.s << 4 | k.dpl << 5 | (1 if present else 0) << 7
        | k.avl << 12 | k.l << 13 | k.db << 14 | k.g << 15
    )
    return Segment(selector=k.selector, base=k.base, limit=k.limit, attributes=attributes)


SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def sregs_to_kvm(s: Sregs, into: abi.kvm_sregs) -> abi.kvm_sregs:
    """Fill ``into`` (read from KVM first, to keep the pending-interrupt bitmap)."""
    for name in SEGMENTS:
        setattr(into, name, segment_to_kvm(getattr(s, name)))
    for name, table in (("gdt", s.gdt), ("idt", s.idt)):
        d = abi.kvm_dtable()
        d.base = table.base
        d.limit = table.limit
        setattr(into, name, d)
    for name in CONTROL:
        setattr(into, name, getattr(s, name))
    return into


def sregs_from_kvm(k: abi.kvm_sregs) -> Sregs:
    seg = segment_from_kvm
    return Sregs(
        cs=seg(k.cs), ds=seg(k.ds), es=seg(k.es), fs=seg(k.fs), gs=seg(k.gs), ss=seg(k.ss),
        tr=seg(k.tr), ldt=seg(k.ldt),
        gdt=DescriptorTable(k.gdt.base, k.gdt.limit),
        idt=DescriptorTable(k.idt.base, k.idt.limit),
        cr0=k.cr0, cr2=k.cr2, cr3=k.cr3, cr4=k.cr4, cr8=k.cr8, efer=k.efer,
        apic_base=k.apic_base,
    )
