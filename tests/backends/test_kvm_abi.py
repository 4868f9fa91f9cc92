"""The ctypes mirrors in backends.kvm.abi against the real linux/kvm.h, compiled here."""

from __future__ import annotations

import ctypes
import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from vmmarch_cli.backends.kvm import abi
from vmmarch_cli.vcpu import Regs

HEADER = Path("/usr/include/linux/kvm.h")

#: (C expression, Python value) pairs: every struct size, the kvm_run offsets the run loop reads,
#: and the ioctl numbers computed by ioctl-opt.
CHECKS: list[tuple[str, int]] = [
    ("sizeof(struct kvm_userspace_memory_region)", ctypes.sizeof(abi.kvm_userspace_memory_region)),
    ("sizeof(struct kvm_regs)", ctypes.sizeof(abi.kvm_regs)),
    ("sizeof(struct kvm_segment)", ctypes.sizeof(abi.kvm_segment)),
    ("sizeof(struct kvm_dtable)", ctypes.sizeof(abi.kvm_dtable)),
    ("sizeof(struct kvm_sregs)", ctypes.sizeof(abi.kvm_sregs)),
    ("sizeof(struct kvm_fpu)", ctypes.sizeof(abi.kvm_fpu)),
    ("sizeof(struct kvm_msr_entry)", ctypes.sizeof(abi.kvm_msr_entry)),
    ("sizeof(struct kvm_msrs)", ctypes.sizeof(abi.kvm_msrs)),
    ("sizeof(struct kvm_cpuid_entry2)", ctypes.sizeof(abi.kvm_cpuid_entry2)),
    ("sizeof(struct kvm_cpuid2)", ctypes.sizeof(abi.kvm_cpuid2)),
    ("sizeof(struct kvm_lapic_state)", ctypes.sizeof(abi.kvm_lapic_state)),
    ("sizeof(struct kvm_xsave)", ctypes.sizeof(abi.kvm_xsave)),
    ("sizeof(struct kvm_irq_level)", ctypes.sizeof(abi.kvm_irq_level)),
    ("sizeof(struct kvm_pit_config)", ctypes.sizeof(abi.kvm_pit_config)),
    ("sizeof(struct kvm_vcpu_events)", ctypes.sizeof(abi.kvm_vcpu_events)),
    ("sizeof(struct kvm_enable_cap)", ctypes.sizeof(abi.kvm_enable_cap)),
    ("sizeof(struct kvm_run)", ctypes.sizeof(abi.kvm_run)),
    ("offsetof(struct kvm_run, exit_reason)", abi.kvm_run.exit_reason.offset),
    ("offsetof(struct kvm_run, io)", abi.kvm_run.exit.offset),
    ("offsetof(struct kvm_run, kvm_valid_regs)", abi.kvm_run.kvm_valid_regs.offset),
    ("offsetof(struct kvm_run, s)", abi.kvm_run.s.offset),
    ("offsetof(struct kvm_run, emulation_failure.insn_size)",
     abi.kvm_run.exit.offset + abi._run_emulation_failure.insn_size.offset),
    ("offsetof(struct kvm_run, emulation_failure.insn_bytes)",
     abi.kvm_run.exit.offset + abi._run_emulation_failure.insn_bytes.offset),
    ("offsetof(struct kvm_run, mmio.is_write)",
     abi.kvm_run.exit.offset + abi._run_mmio.is_write.offset),
    ("offsetof(struct kvm_vcpu_events, exception_payload)",
     abi.kvm_vcpu_events.exception_payload.offset),
    ("offsetof(struct kvm_vcpu_events, smi)", abi.kvm_vcpu_events.smi.offset),
    ("sizeof(struct kvm_mp_state)", ctypes.sizeof(abi.kvm_mp_state)),
    ("sizeof(struct kvm_debugregs)", ctypes.sizeof(abi.kvm_debugregs)),
    ("sizeof(struct kvm_xcrs)", ctypes.sizeof(abi.kvm_xcrs)),
    ("sizeof(struct kvm_irqchip)", ctypes.sizeof(abi.kvm_irqchip)),
    ("sizeof(struct kvm_pit_channel_state)", ctypes.sizeof(abi.kvm_pit_channel_state)),
    ("sizeof(struct kvm_pit_state2)", ctypes.sizeof(abi.kvm_pit_state2)),
    ("sizeof(struct kvm_clock_data)", ctypes.sizeof(abi.kvm_clock_data)),
    ("sizeof(struct kvm_msr_list)", ctypes.sizeof(abi.kvm_msr_list)),
    ("KVM_GET_MSR_INDEX_LIST", abi.KVM_GET_MSR_INDEX_LIST),
    ("KVM_GET_IRQCHIP", abi.KVM_GET_IRQCHIP),
    ("KVM_SET_IRQCHIP", abi.KVM_SET_IRQCHIP),
    ("KVM_GET_CLOCK", abi.KVM_GET_CLOCK),
    ("KVM_SET_CLOCK", abi.KVM_SET_CLOCK),
    ("KVM_GET_PIT2", abi.KVM_GET_PIT2),
    ("KVM_SET_PIT2", abi.KVM_SET_PIT2),
    ("KVM_GET_MP_STATE", abi.KVM_GET_MP_STATE),
    ("KVM_SET_MP_STATE", abi.KVM_SET_MP_STATE),
    ("KVM_GET_DEBUGREGS", abi.KVM_GET_DEBUGREGS),
    ("KVM_SET_DEBUGREGS", abi.KVM_SET_DEBUGREGS),
    ("KVM_GET_XCRS", abi.KVM_GET_XCRS),
    ("KVM_SET_XCRS", abi.KVM_SET_XCRS),
    ("KVM_CAP_MP_STATE", abi.KVM_CAP_MP_STATE),
    ("KVM_CAP_ADJUST_CLOCK", abi.KVM_CAP_ADJUST_CLOCK),
    ("KVM_CAP_DEBUGREGS", abi.KVM_CAP_DEBUGREGS),
    ("KVM_CAP_XCRS", abi.KVM_CAP_XCRS),
    ("KVM_IRQCHIP_IOAPIC", abi.KVM_IRQCHIP_IOAPIC),
    ("KVM_MP_STATE_HALTED", abi.KVM_MP_STATE_HALTED),
    ("KVM_RUN", abi.KVM_RUN),
    ("KVM_GET_REGS", abi.KVM_GET_REGS),
    ("KVM_SET_REGS", abi.KVM_SET_REGS),
    ("KVM_GET_SREGS", abi.KVM_GET_SREGS),
    ("KVM_SET_SREGS", abi.KVM_SET_SREGS),
    ("KVM_GET_MSRS", abi.KVM_GET_MSRS),
    ("KVM_SET_MSRS", abi.KVM_SET_MSRS),
    ("KVM_GET_FPU", abi.KVM_GET_FPU),
    ("KVM_SET_FPU", abi.KVM_SET_FPU),
    ("KVM_GET_LAPIC", abi.KVM_GET_LAPIC),
    ("KVM_SET_LAPIC", abi.KVM_SET_LAPIC),
    ("KVM_SET_CPUID2", abi.KVM_SET_CPUID2),
    ("KVM_GET_CPUID2", abi.KVM_GET_CPUID2),
    ("KVM_GET_SUPPORTED_CPUID", abi.KVM_GET_SUPPORTED_CPUID),
    ("KVM_SET_USER_MEMORY_REGION", abi.KVM_SET_USER_MEMORY_REGION),
    ("KVM_CREATE_PIT2", abi.KVM_CREATE_PIT2),
    ("KVM_IRQ_LINE", abi.KVM_IRQ_LINE),
    ("KVM_GET_VCPU_EVENTS", abi.KVM_GET_VCPU_EVENTS),
    ("KVM_SET_VCPU_EVENTS", abi.KVM_SET_VCPU_EVENTS),
    ("KVM_GET_XSAVE", abi.KVM_GET_XSAVE),
    ("KVM_SET_XSAVE", abi.KVM_SET_XSAVE),
    ("KVM_ENABLE_CAP", abi.KVM_ENABLE_CAP),
    ("KVM_CREATE_VM", abi.KVM_CREATE_VM),
    ("KVM_CREATE_VCPU", abi.KVM_CREATE_VCPU),
    ("KVM_SET_TSS_ADDR", abi.KVM_SET_TSS_ADDR),
    ("KVM_CREATE_IRQCHIP", abi.KVM_CREATE_IRQCHIP),
    ("KVM_EXIT_INTERNAL_ERROR", abi.KVM_EXIT_INTERNAL_ERROR),
    ("KVM_INTERNAL_ERROR_EMULATION", abi.KVM_INTERNAL_ERROR_EMULATION),
    ("KVM_CAP_IMMEDIATE_EXIT", abi.KVM_CAP_IMMEDIATE_EXIT),
    ("KVM_CAP_XSAVE", abi.KVM_CAP_XSAVE),
    ("KVM_CAP_PIT2", abi.KVM_CAP_PIT2),
]


def test_structures_and_numbers_match_the_kernel_headers(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("needs a C compiler and linux/kvm.h (Debian: gcc, linux-libc-dev)")
    body = "\n".join(f'    printf("%llu\\n", (unsigned long long)({expr}));' for expr, _ in CHECKS)
    src = tmp_path / "abi.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
                   f"int main(void) {{\n{body}\n    return 0;\n}}\n")
    exe = tmp_path / "abi"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    got = [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True,
                                          text=True).stdout.split()]
    mismatches = [(expr, c, py) for (expr, py), c in zip(CHECKS, got, strict=True) if c != py]
    assert not mismatches


def test_struct_formats_match_the_ctypes_layouts() -> None:
    """The packed formats used for bulk conversion describe the same bytes as the ctypes
    classes (which the test above checks against the kernel)."""
    import struct

    assert struct.calcsize("<" + abi.KVM_SEGMENT_FORMAT) == ctypes.sizeof(abi.kvm_segment)
    assert struct.calcsize("<" + abi.KVM_DTABLE_FORMAT) == ctypes.sizeof(abi.kvm_dtable)
    assert abi.KVM_SREGS_HEAD.size == abi.kvm_sregs.interrupt_bitmap.offset
    assert abi.KVM_CPUID_ENTRY2.size == ctypes.sizeof(abi.kvm_cpuid_entry2)
    # Field by field: distinct values through ctypes, read back through the format.
    k = abi.kvm_sregs()
    names = [n for n, _ in abi.kvm_segment._fields_]
    for i, seg in enumerate(("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")):
        s = getattr(k, seg)
        for j, name in enumerate(names):
            setattr(s, name, (i * 16 + j) & 0xFF if j > 2 else 0x1000 * (i + 1) + j)
    k.gdt.base, k.gdt.limit, k.idt.base, k.idt.limit = 0x500, 0x1F, 0x540, 7
    for j, name in enumerate(("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")):
        setattr(k, name, 0x1111 * (j + 1))
    values = abi.KVM_SREGS_HEAD.unpack_from(k)
    expected = []
    for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        fields = [getattr(getattr(k, seg), n) for n in names]
        expected += [*fields[:3], bytes(fields[3:])]  # base, limit, selector, the flag bytes
    expected += [0x500, 0x1F, 0x540, 7] + [0x1111 * (j + 1) for j in range(7)]
    assert list(values) == expected
    r = abi.kvm_regs()
    for j, (name, _) in enumerate(abi.kvm_regs._fields_):
        setattr(r, name, 0x100 + j)
    assert abi.KVM_REGS.size == ctypes.sizeof(abi.kvm_regs)
    assert abi.KVM_REGS.unpack_from(r) == tuple(0x100 + j for j in range(18))
    # convert.regs_from_kvm passes them positionally: Regs declares its fields in that order
    assert [f.name for f in dataclasses.fields(Regs)] == [n for n, _ in abi.kvm_regs._fields_]
    _, msrs = abi.msrs_buffer(2)
    assert abi.KVM_MSR_ENTRY.size == ctypes.sizeof(abi.kvm_msr_entry)
    abi.KVM_MSR_ENTRY.pack_into(msrs, abi.KVM_MSR_ENTRY.size, 0xC000_0080, 0x1234_5678_9ABC)
    assert (msrs[1].index, msrs[1].reserved, msrs[1].data) == (0xC000_0080, 0, 0x1234_5678_9ABC)
    _, entries = abi.cpuid_buffer(2)
    abi.KVM_CPUID_ENTRY2.pack_into(entries, abi.KVM_CPUID_ENTRY2.size, 7, 1, 1, 2, 3, 4, 5)
    e = entries[1]
    assert (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) == (7, 1, 1, 2, 3, 4, 5)


def test_segment_flags_round_trip_through_the_named_fields() -> None:
    """convert.py translates kvm_segment's flag bytes with two memoized functions; set the
    named ctypes fields, read the neutral attribute word, and back (no /dev/kvm needed)."""
    from vmmarch_cli.backends.kvm import convert
    from vmmarch_cli.vcpu import Segment

    k = abi.kvm_sregs()
    cs = k.cs
    cs.base, cs.limit, cs.selector = 0x1000, 0xF_FFFF, 0x33
    cs.type, cs.present, cs.dpl, cs.db, cs.s, cs.l, cs.g, cs.avl = 0xB, 1, 3, 0, 1, 1, 1, 1
    k.ss.present, k.ss.unusable, k.ss.type, k.ss.s = 1, 1, 3, 1  # unusable wins over present
    s = convert.sregs_from_kvm(k)
    # SDM vol. 3A 3.4.5: type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15
    assert s.cs == Segment(0x33, 0x1000, 0xF_FFFF, 0xB | 1 << 4 | 3 << 5 | 1 << 7 | 1 << 12
                           | 1 << 13 | 1 << 15)
    assert not s.ss.present
    back = convert.sregs_to_kvm(s, abi.kvm_sregs())
    assert (back.cs.type, back.cs.present, back.cs.dpl, back.cs.db, back.cs.s, back.cs.l,
            back.cs.g, back.cs.avl, back.cs.unusable) == (0xB, 1, 3, 0, 1, 1, 1, 1, 0)
    assert (back.cs.base, back.cs.limit, back.cs.selector) == (0x1000, 0xF_FFFF, 0x33)
    assert (back.ss.present, back.ss.unusable, back.ss.type, back.ss.s) == (0, 1, 3, 1)
