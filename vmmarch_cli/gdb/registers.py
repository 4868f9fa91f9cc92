"""The register file gdb sees: a target description (gdb manual, appendix G "Target
Descriptions") in the 64-bit layout at every CPU mode, as gdb's own i386 features name it
(gdb/features/i386/64bit-core.xml, 64bit-sse.xml, 64bit-segments.xml), plus a feature of our own
for the system registers. Values come from the neutral vCPU state; the x87 stack and the XMM
registers are not part of that state yet and read as unavailable (gdb shows ``<unavailable>``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64 import msr
from vmmarch_cli.vcpu import GPR_NAMES, Fpu, Regs, Sregs


@dataclass(frozen=True)
class CpuState:
    """One vCPU's state as read for gdb."""

    regs: Regs
    sregs: Sregs
    fpu: Fpu
    kernel_gs_base: int


Read = Callable[[CpuState], int | None]  # None: unavailable


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str
    read: Read
    writable: bool = False  # through set_regs (general registers, rip, eflags)


def _gpr(name: str) -> Read:
    return lambda s: int(getattr(s.regs, name))


def _seg(name: str) -> Read:
    return lambda s: int(getattr(s.sregs, name).selector)


def _sys(name: str) -> Read:
    return lambda s: int(getattr(s.sregs, name))


def _unavailable(_: CpuState) -> None:
    return None


# gdb's 64bit-core.xml order: rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8-r15 (not GPR_NAMES').
_CORE_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
              *(f"r{i}" for i in range(8, 16)))
assert set(_CORE_GPRS) == set(GPR_NAMES)
_POINTERS = {"rbp": "data_ptr", "rsp": "data_ptr"}

CORE = (
    *(Register(n, 64, _POINTERS.get(n, "int64"), _gpr(n), True) for n in _CORE_GPRS),
    Register("rip", 64, "code_ptr", _gpr("rip"), True),
    Register("eflags", 32, "int32", _gpr("rflags"), True),
    *(Register(n, 32, "int32", _seg(n)) for n in ("cs", "ss", "ds", "es", "fs", "gs")),
    *(Register(f"st{i}", 80, "i387_ext", _unavailable) for i in range(8)),
    Register("fctrl", 32, "int", lambda s: s.fpu.fcw),
    *(Register(n, 32, "int", _unavailable)
      for n in ("fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")),
)
SSE = (
    *(Register(f"xmm{i}", 128, "uint128", _unavailable) for i in range(16)),
    Register("mxcsr", 32, "int", lambda s: s.fpu.mxcsr),
)
SEGMENTS = (
    Register("fs_base", 64, "int64", lambda s: s.sregs.fs.base),
    Register("gs_base", 64, "int64", lambda s: s.sregs.gs.base),
)
SYSTEM = (
    Register("k_gs_base", 64, "int64", lambda s: s.kernel_gs_base),
    *(Register(n, 64, "int64", _sys(n)) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")),
)
FEATURES = (("org.gnu.gdb.i386.core", CORE), ("org.gnu.gdb.i386.sse", SSE),
            ("org.gnu.gdb.i386.segments", SEGMENTS), ("org.vmmarch.x86.system", SYSTEM))
REGISTERS = tuple(r for _, regs in FEATURES for r in regs)
#: MSRs the description reads besides the neutral registers.
MSRS = (msr.MSR_KERNEL_GS_BASE,)


def target_xml() -> bytes:
    lines = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
             "<target>", "<architecture>i386:x86-64</architecture>"]
    for feature, regs in FEATURES:
        lines.append(f'<feature name="{feature}">')
        lines += [f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}"/>' for r in regs]
        lines.append("</feature>")
    lines.append("</target>")
    return "\n".join(lines).encode()


def encode(register: Register, state: CpuState) -> bytes:
    """The register's value as gdb reads it: little-endian hex, or 'x's when unavailable."""
    value = register.read(state)
    size = register.bits // 8
    if value is None:
        return b"x" * (2 * size)
    return (value & ((1 << register.bits) - 1)).to_bytes(size, "little").hex().encode()


def encode_all(state: CpuState) -> bytes:
    return b"".join(encode(r, state) for r in REGISTERS)


def decode(text: bytes) -> int:
    """A register value as gdb writes it: little-endian hex."""
    return int.from_bytes(bytes.fromhex(text.decode()), "little")
