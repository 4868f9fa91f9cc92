"""One unicorn instance: memory shared with the VMM, neutral state in and out, in the right order.

Everything here is unicorn-specific; the vCPU (vcpu.py) speaks the neutral interface. Facts this
module relies on were measured on unicorn 2.1.4 (../shared/reference/backends-on-this-machine.md):

* the instance mode fixes the register API (UC_MODE_32 has no RIP, R8-R15 or CR8), not the CPU
  mode, which follows CR0, EFER and the segment caches as on a CPU. A vCPU entered in 32-bit
  protected mode (PVH) therefore gets a UC_MODE_64 instance too, so that the kernel can switch
  to long mode; its segment caches are written directly (native.py), since the API loads no
  descriptor in that mode. Real mode too (an AP starts there at its SIPI vector and goes on
  to long mode): every instance is UC_MODE_64;
* CS/SS/DS/ES take a selector only in 64-bit mode (no descriptor load), while FS/GS, and every
  segment in 32-bit mode, are loaded from the GDT in guest memory: so memory, CR3, CR4, EFER,
  CR0, GDTR and IDTR are written before any selector;
* ``until`` of emu_start is translated as a guest address and clobbers CR2 when it is unmapped:
  exits are switched to the explicit (empty) exit list instead, so ``until`` is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vmmarch_cli.arch.x86_64 import fxsave, msr, regs
from vmmarch_cli.backends.emulate.binding import Uc, UcError, uc_const, x86
from vmmarch_cli.backends.emulate.native import DESC_FLAGS_MASK, DESC_FLAGS_SHIFT
from vmmarch_cli.errors import BackendError
from vmmarch_cli.vcpu import ATTR_L, GPR_NAMES, Fpu, HostMemory, Regs, Sregs

#: The highest guest-physical address (unicorn's x86 uses 64-bit physical addresses).
PHYS_ADDR_LAST = (1 << 64) - 1

_GPRS = {name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES}
_SEGMENT_REGS = {"cs": x86.UC_X86_REG_CS, "ss": x86.UC_X86_REG_SS, "ds": x86.UC_X86_REG_DS,
                 "es": x86.UC_X86_REG_ES, "fs": x86.UC_X86_REG_FS, "gs": x86.UC_X86_REG_GS}

#: MSRs unicorn stores and returns (measured round trips); it silently drops the rest.
ENGINE_MSRS = frozenset({
    msr.MSR_IA32_SYSENTER_CS, msr.MSR_IA32_SYSENTER_ESP, msr.MSR_IA32_SYSENTER_EIP,
    msr.MSR_IA32_MISC_ENABLE, msr.MSR_MTRR_DEF_TYPE, msr.MSR_EFER, msr.MSR_STAR,
    msr.MSR_LSTAR, msr.MSR_CSTAR, msr.MSR_SYSCALL_MASK, msr.MSR_KERNEL_GS_BASE,
})


def refuse_compatibility_mode(s: Sregs) -> None:
    """EFER.LMA with CS.L=0 is not supported (SDM vol. 3A 2.2, 5.2.1); every other mode runs in
    the one kind of instance this module makes (see the module docstring)."""
    if s.efer & regs.EFER_LMA and not s.cs.attributes & ATTR_L:
        raise BackendError("compatibility mode (EFER.LMA with CS.L=0) is not supported by "
                           "the emulate backend")


_FP = tuple(getattr(x86, f"UC_X86_REG_FP{i}") for i in range(fxsave.X87_REGISTERS))
_XMM = tuple(getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(fxsave.XMM_REGISTERS))
MANTISSA = (1 << 64) - 1


def _fp80(value: tuple[int, int]) -> int:
    """An x87 register as the binding reads it (mantissa, sign and exponent) as 80 bits."""
    mantissa, exponent = value
    return (int(exponent) & 0xFFFF) << 64 | int(mantissa)


def _stack_order(fsw: int) -> list[int]:
    """The physical register of ST0..ST7: ST(i) is R((TOP + i) mod 8), TOP in FSW bits 11-13
    (SDM vol. 1 8.1.2)."""
    top = (fsw >> 11) & 7
    return [(top + i) % fxsave.X87_REGISTERS for i in range(fxsave.X87_REGISTERS)]


class Engine:
    """A unicorn instance over the VM's memory. Hooks are added by the vCPU before it runs."""

    def __init__(self, memory: HostMemory) -> None:
        self.uc: Any = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
        self._regions = list(memory.host_regions())
        for start, length, host in self._regions:
            # The same host pages KVM maps: loader and pipeline writes are seen as they are.
            self.uc.mem_map_ptr(start, length, uc_const.UC_PROT_ALL, host)
        self.uc.ctl_exits_enabled(True)  # ``until`` ignored: see the module docstring

    def close(self) -> None:
        """Free the instance now (its 1 GiB code buffer, its memory map). The binding frees it
        when the Uc is collected, but its hooks make a reference cycle, which only the cyclic
        collector breaks: a process that makes VM after VM (100 snapshot restores) kept every
        instance until a full collection. Its own finalizer does the freeing, once."""
        finalizer = getattr(self.uc, "_Uc__finalizer", None)
        if finalizer is not None:
            finalizer()

    def pc(self) -> int:
        return int(self.uc.reg_read(x86.UC_X86_REG_RIP))

    def add_hook(self, kind: int, callback: Callable[..., Any], insn: int = 0,
                 begin: int = 1, end: int = 0) -> None:
        """``callback`` for ``kind``; ``begin``..``end`` (inclusive) bounds it, and the default
        begin > end means everywhere (unicorn's HOOK_BOUND_CHECK)."""
        self.uc.hook_add(kind, callback, None, begin, end, insn)

    def outside_ram(self) -> list[tuple[int, int]]:
        """The guest-physical ranges (first, last) no RAM region covers."""
        gaps, at = [], 0
        for start, length, _ in sorted(self._regions):
            if start > at:
                gaps.append((at, start - 1))
            at = max(at, start + length)
        gaps.append((at, PHYS_ADDR_LAST))
        return gaps

    def run(self, count: int) -> None:
        """Emulate from the current PC until a hook stops it, another thread kicks it (raised as
        UcError with native.KICK_ERROR), HLT, an error (raised as UcError), or after ``count``
        instructions (0: no limit). A count makes unicorn run its (C) counting hook before every
        instruction, after which a stop from a hook takes effect at once: port I/O exits need
        that (an IN must not be followed by instructions that use its value before the VMM
        supplied it). Without it guest code runs several times faster (measured: mpihelp loops
        8x)."""
        self.uc.emu_start(self.pc(), 0, 0, count)

    # --- registers ------------------------------------------------------------------------

    def read_regs(self) -> Regs:
        values = {name: int(self.uc.reg_read(reg)) for name, reg in _GPRS.items()}
        values["rip"] = self.pc()
        values["rflags"] = int(self.uc.reg_read(x86.UC_X86_REG_EFLAGS))
        return Regs(**values)

    def write_regs(self, r: Regs) -> None:
        for name, reg in _GPRS.items():
            self.uc.reg_write(reg, getattr(r, name))
        self.uc.reg_write(x86.UC_X86_REG_RIP, r.rip)
        self.uc.reg_write(x86.UC_X86_REG_EFLAGS, r.rflags)

    def write_sregs(self, s: Sregs) -> None:
        """In the order unicorn needs: tables and control registers, then selectors."""
        uc = self.uc
        if not s.efer & regs.EFER_LMA:
            # EFER.LMA cannot be written (QEMU masks it, as the CPU does): it is cleared the
            # architectural way, by turning paging off while it is set (SDM vol. 3A 9.8.5.4).
            uc.reg_write(x86.UC_X86_REG_CR0, regs.X86_CR0_PE | regs.X86_CR0_PG)
        uc.reg_write(x86.UC_X86_REG_CR3, s.cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, s.cr4)
        uc.msr_write(msr.MSR_EFER, s.efer)
        uc.reg_write(x86.UC_X86_REG_CR0, s.cr0)
        uc.reg_write(x86.UC_X86_REG_CR8, s.cr8)
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, s.gdt.base, s.gdt.limit, 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, s.idt.base, s.idt.limit, 0))
        for name, reg in _SEGMENT_REGS.items():
            try:
                uc.reg_write(reg, getattr(s, name).selector)
            except UcError as e:
                raise BackendError(f"unicorn refused {name.upper()} = "
                                   f"{getattr(s, name).selector:#x}: {e}") from None
        # A base set through the MSRs survives the descriptor load.
        uc.reg_write(x86.UC_X86_REG_FS_BASE, s.fs.base)
        uc.reg_write(x86.UC_X86_REG_GS_BASE, s.gs.base)
        # TR and LDTR flags go in QEMU's SegmentCache layout, as native.load_segments writes
        # the others.
        for seg, reg in ((s.tr, x86.UC_X86_REG_TR), (s.ldt, x86.UC_X86_REG_LDTR)):
            uc.reg_write(reg, (seg.selector, seg.base, seg.limit,
                               (seg.attributes << DESC_FLAGS_SHIFT) & DESC_FLAGS_MASK))

    def read_fpu(self) -> Fpu:
        """unicorn holds the x87 registers physically (FP0-FP7, as mantissa and exponent; its
        ST0-ST7 reads lose 16 bits in the binding) and the full tag word (FPTAG)."""
        read = self.uc.reg_read
        fsw = int(read(x86.UC_X86_REG_FPSW))
        physical = [_fp80(read(r)) for r in _FP]
        return Fpu(fcw=int(read(x86.UC_X86_REG_FPCW)), mxcsr=int(read(x86.UC_X86_REG_MXCSR)),
                   fsw=fsw, ftw=fxsave.abridged_tag(int(read(x86.UC_X86_REG_FPTAG))),
                   st=tuple(physical[r] for r in _stack_order(fsw)),
                   xmm=tuple(int(read(r)) for r in _XMM))

    def write_fpu(self, fpu: Fpu) -> None:
        write = self.uc.reg_write
        write(x86.UC_X86_REG_FPCW, fpu.fcw)
        write(x86.UC_X86_REG_MXCSR, fpu.mxcsr)
        write(x86.UC_X86_REG_FPSW, fpu.fsw)  # TOP too
        write(x86.UC_X86_REG_FPTAG, fxsave.full_tag(fpu.ftw))
        for r, value in zip(_stack_order(fpu.fsw), fpu.st, strict=True):
            write(_FP[r], (value & MANTISSA, value >> 64))
        for register, value in zip(_XMM, fpu.xmm, strict=True):
            write(register, value)

    def read_msr(self, index: int) -> int:
        return int(self.uc.msr_read(index))

    def write_msr(self, index: int, value: int) -> None:
        self.uc.msr_write(index, value)

    # --- the accumulator and string registers an IN touches -------------------------------

    def io_registers(self) -> tuple[int, ...]:
        """PC, RAX, RCX, RDI: everything IN / REP INS changes apart from memory."""
        return (self.pc(), *(int(self.uc.reg_read(_GPRS[n])) for n in ("rax", "rcx", "rdi")))

    def restore_io_registers(self, saved: Sequence[int]) -> None:
        self.uc.reg_write(x86.UC_X86_REG_RIP, saved[0])
        for name, value in zip(("rax", "rcx", "rdi"), saved[1:], strict=True):
            self.uc.reg_write(_GPRS[name], value)


def scratch_cpuid() -> Callable[[int, int], tuple[int, int, int, int]]:
    """CPUID(leaf, subleaf) as unicorn's CPU model answers it, from a throwaway instance."""
    uc: Any = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
    code = 0x1000
    uc.mem_map(code, 0x1000)
    uc.mem_write(code, b"\x0f\xa2\xf4")  # cpuid; hlt

    def query(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        uc.reg_write(x86.UC_X86_REG_RAX, leaf)
        uc.reg_write(x86.UC_X86_REG_RCX, subleaf)
        uc.emu_start(code, 0)
        return tuple(int(uc.reg_read(r)) & 0xFFFF_FFFF for r in (  # type: ignore[return-value]
            x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX))

    return query
