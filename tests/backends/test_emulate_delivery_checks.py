"""delivery.decide refuses what QEMU's delivery would fault on: it must never fault inside
(a fault there would longjmp through the Python hook), so a frame on a read-only stack is a
problem found beforehand, not a fault in flight (backends/emulate/delivery.py)."""

from __future__ import annotations

import struct
from dataclasses import replace

from vmmarch_cli.arch.x86_64 import paging, regs
from vmmarch_cli.backends.emulate import delivery
from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.vcpu import DescriptorTable, Segment, Sregs

GDT, IDT, STACK = 0x1000, 0x2000, 0x40_0000
CODE64 = Segment(0x08, 0, 0xFFFF_FFFF, 0xA09B)


def _machine(stack_writable: bool) -> tuple[MmapGuestMemory, Sregs]:
    mem = MmapGuestMemory([(0, 16 << 20)])
    tables = paging.identity_tables(1)
    for address, data in tables.tables:
        mem.write(address, data)
    if not stack_writable:  # the 2 MiB page holding the stack: present, PS, R/W clear
        pd = dict(tables.tables)[0xB000]
        entry = int.from_bytes(pd[16:24], "little") & ~paging.PTE_WRITABLE
        mem.write(0xB000 + 16, entry.to_bytes(8, "little"))
    mem.write(GDT + 8, struct.pack("<Q", 0x00AF_9B00_0000_FFFF))  # 64-bit code, DPL 0
    # Vector 13: a present 64-bit interrupt gate to 0x1000 in selector 8 (SDM 6.14.1).
    mem.write(IDT + 13 * 16, struct.pack("<HHBBHII", 0x1000, 0x08, 0, 0x8E, 0, 0, 0))
    s = Sregs(cs=CODE64, gdt=DescriptorTable(GDT, 0x17), idt=DescriptorTable(IDT, 0xFFF),
              cr0=regs.BOOT_CR0 | regs.X86_CR0_WP, cr3=tables.cr3, cr4=regs.BOOT_CR4,
              efer=regs.BOOT_EFER)
    return mem, s


def test_a_writable_stack_is_delivered_on() -> None:
    mem, s = _machine(stack_writable=True)
    d = delivery.decide(mem, s, 0, STACK + 0x1000, 13, False, 0)
    assert (d.vector, d.problem) == (13, "")


def test_a_read_only_stack_is_a_problem_before_delivery() -> None:
    mem, s = _machine(stack_writable=False)
    d = delivery.decide(mem, s, 0, STACK + 0x1000, 13, False, 0)
    assert "not writable" in d.problem


def test_without_cr0_wp_supervisor_writes_ignore_read_only() -> None:
    mem, s = _machine(stack_writable=False)
    s = replace(s, cr0=regs.BOOT_CR0)
    assert delivery.decide(mem, s, 0, STACK + 0x1000, 13, False, 0).problem == ""
