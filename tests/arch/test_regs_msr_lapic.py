"""Register, MSR, FPU and LAPIC state of the 64-bit entry (boot.rst 64-bit protocol)."""

from vmmarch_cli.arch.x86_64 import lapic, msr, regs
from vmmarch_cli.vcpu import Lapic, Segment, Sregs


def test_entry_registers() -> None:
    r = regs.linux64_regs(0x1000000)
    assert (r.rip, r.rsp, r.rbp, r.rsi, r.rflags) == (0x1000000, 0x8FF0, 0x8FF0, 0x7000, 0x2)


def test_long_mode_sregs() -> None:
    reset = Sregs(apic_base=0xFEE00900, ldt=Segment(0, 0, 0xFFFF, 0x82))
    s = regs.linux64_sregs(reset, cr3=0x9000)
    assert (s.cr0, s.cr3, s.cr4, s.efer) == (0x80000011, 0x9000, 0x20, 0x500)
    assert s.cs == Segment(0x10, 0, 0xFFFFFFFF, 0xA09B)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        assert seg == Segment(0x18, 0, 0xFFFFFFFF, 0xC093)
    assert s.tr.selector == 0x20 and s.tr.limit == 0x67 and s.tr.attributes == 0x8B
    assert (s.gdt.base, s.gdt.limit) == (0x500, 47)
    assert (s.idt.base, s.idt.limit) == (0x540, 7)
    assert s.apic_base == 0xFEE00900 and s.ldt == reset.ldt  # kept from the reset state


def test_boot_msrs_match_firecracker_list() -> None:
    values = {e.index: e.value for e in msr.boot_msrs()}
    assert values == {
        0x174: 0, 0x175: 0, 0x176: 0, 0xC0000081: 0, 0xC0000083: 0, 0xC0000102: 0,
        0xC0000084: 0, 0xC0000082: 0, 0x10: 0, 0x1A0: 1, 0x2FF: 0x806,
    }


def test_fpu_values() -> None:
    f = regs.boot_fpu()
    assert (f.fcw, f.mxcsr) == (0x37F, 0x1F80)


def test_lint_delivery_modes_only_touch_bits_8_to_10() -> None:
    page = Lapic().with_registers({0x350: 0x0001_00FF, 0x360: 0x0001_0700})
    out = lapic.virtual_wire(page)
    assert out.register(0x350) == 0x0001_07FF  # ExtINT, mask and vector kept
    assert out.register(0x360) == 0x0001_0400  # NMI
