"""Register state at the kernel's entry: GPRs, segments, control registers, EFER, FPU.

The 64-bit entry follows Documentation/arch/x86/boot.rst, "64-bit Boot Protocol": long mode with
paging on, an identity map covering the kernel, boot_params and cmdline; RSI = boot_params;
CS = __BOOT_CS, DS/ES/SS = __BOOT_DS; interrupts off.
"""

from __future__ import annotations

import functools

from vmmarch_cli.arch.x86_64 import gdt, layout
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.vcpu import DescriptorTable, Fpu, Regs, Segment, Sregs

# Control-register bits (Intel SDM vol. 3A 2.5) and EFER bits (2.2.1).
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_WP = 1 << 16  # supervisor writes honour read-only pages
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
X86_CR4_LA57 = 1 << 12  # 5-level paging
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
#: RFLAGS with only the reserved bit 1 set: IF clear (SDM vol. 1 3.4.3).
RFLAGS_RESERVED = 0x2

# Debug registers (Intel SDM vol. 3B 18.2): DR0-DR3 hold breakpoint addresses; DR7 enables
# them (L0-L3, bits 0, 2, 4, 6) with R/W and LEN fields (bits 16-31) of 0: break on
# instruction execution. Bit 10 reads as 1; GE (bit 9) is set as debuggers set it.
DEBUG_ADDRESS_REGISTERS = 4
DR7_RESERVED_ONE = 1 << 10
DR7_GE = 1 << 9
#: DR6 B0-B3: which of DR0-DR3 matched (none: the stop was a single step).
DR6_BREAKPOINT_HITS = 0xF


def dr7_execute_breakpoints(count: int) -> int:
    """DR7 with execution breakpoints in DR0..DR(count-1), enabled locally."""
    if not 0 <= count <= DEBUG_ADDRESS_REGISTERS:
        raise ValueError(f"{count} breakpoints: a CPU has {DEBUG_ADDRESS_REGISTERS}")
    value = DR7_RESERVED_ONE | DR7_GE
    for slot in range(count):
        value |= 1 << (2 * slot)  # L<slot>
    return value


#: CR0 written whole, not OR-ed into a backend's reset value, so every backend starts equal:
#: protected mode, paging, and ET (hard-wired to 1 on every CPU since the 486).
BOOT_CR0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
BOOT_CR4 = X86_CR4_PAE
BOOT_EFER = EFER_LME | EFER_LMA



def linux64_regs(entry: int, zero_page: int = layout.ZERO_PAGE_START) -> Regs:
    return Regs(
        rip=entry,
        rsp=layout.BOOT_STACK_POINTER,
        rbp=layout.BOOT_STACK_POINTER,
        rsi=zero_page,
        rflags=RFLAGS_RESERVED,
    )


@functools.cache
def _boot_segments(protocol: BootProtocol) -> tuple[Segment, Segment, Segment, DescriptorTable]:
    """Code, data and TSS segments as loaded from the protocol's boot GDT, and its GDTR.
    A pure function of constant tables, computed once (vCPU setup is a measured hot path)."""
    if protocol == BootProtocol.PVH:
        table = gdt.pvh_gdt()
        selectors = (gdt.PVH_CS_INDEX, gdt.PVH_DS_INDEX, gdt.PVH_TSS_INDEX)
    else:
        table = gdt.linux64_gdt()
        selectors = (gdt.BOOT_CS_INDEX, gdt.BOOT_DS_INDEX, gdt.BOOT_TSS_INDEX)
    code, data, tss = (gdt.segment_from_gdt(table[i], i) for i in selectors)
    return code, data, tss, DescriptorTable(layout.BOOT_GDT_START, len(table) * 8 - 1)


#: The boot IDT: no gates, so an early exception is a triple fault the VMM reports.
BOOT_IDTR = DescriptorTable(layout.BOOT_IDT_START, 8 - 1)


def _flat_sregs(current: Sregs, protocol: BootProtocol, cr0: int, cr3: int, cr4: int,
                efer: int) -> Sregs:
    """Segments loaded from the boot GDT (data in DS/ES/FS/GS/SS), the boot GDTR/IDTR and the
    control registers.

    ``current`` supplies what the boot protocol leaves to the CPU's reset state (APIC base, LDT).
    """
    code, data, tss, gdtr = _boot_segments(protocol)
    return Sregs(cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=tss, ldt=current.ldt,
                 gdt=gdtr, idt=BOOT_IDTR, cr0=cr0, cr2=0, cr3=cr3, cr4=cr4, cr8=0, efer=efer,
                 apic_base=current.apic_base)


def linux64_sregs(current: Sregs, cr3: int) -> Sregs:
    """Long mode with the segments of ``gdt.linux64_gdt()``."""
    return _flat_sregs(current, BootProtocol.LINUX64, BOOT_CR0, cr3, BOOT_CR4, BOOT_EFER)


#: PVH entry: protected mode with paging off (docs/misc/pvh.pandoc: "CR0: bit 0 (PE) must be
#: set. All the other writeable bits are cleared", ET being hard-wired), CR4 and EFER zero.
PVH_CR0 = X86_CR0_PE | X86_CR0_ET


def pvh_regs(entry: int, start_info: int = layout.PVH_INFO_START) -> Regs:
    """EBX = start_info; RFLAGS with IF and VM clear."""
    return Regs(rip=entry, rbx=start_info, rflags=RFLAGS_RESERVED)


def pvh_sregs(current: Sregs) -> Sregs:
    """32-bit protected mode, paging off, with the segments of ``gdt.pvh_gdt()``."""
    return _flat_sregs(current, BootProtocol.PVH, PVH_CR0, 0, 0, 0)


def boot_fpu() -> Fpu:
    return Fpu()  # FNINIT's control word, MXCSR's reset value
