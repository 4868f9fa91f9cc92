"""The register file gdb sees: a target description (gdb manual, appendix G "Target
Descriptions") in the 64-bit layout at every CPU mode, as gdb's own i386 features name it
(gdb/features/i386/64bit-core.xml, 64bit-sse.xml, 64bit-segments.xml), plus a feature of our own
for the system registers. Values come from the neutral vCPU state; the x87 instruction and
operand pointers (fiseg ... fop) are not part of it and read as unavailable (gdb shows
``<unavailable>``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64 import fxsave, msr
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


def _st(i: int) -> Read:
    return lambda s: s.fpu.st[i]


def _xmm(i: int) -> Read:
    return lambda s: s.fpu.xmm[i]


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
    *(Register(f"st{i}", 80, "i387_ext", _st(i)) for i in range(fxsave.X87_REGISTERS)),
    Register("fctrl", 32, "int", lambda s: s.fpu.fcw),
    Register("fstat", 32, "int", lambda s: s.fpu.fsw),
    Register("ftag", 32, "int", lambda s: fxsave.full_tag(s.fpu.ftw)),
    *(Register(n, 32, "int", _unavailable)
      for n in ("fiseg", "fioff", "foseg", "fooff", "fop")),
)
SSE = (
    *(Register(f"xmm{i}", 128, "vec128", _xmm(i)) for i in range(fxsave.XMM_REGISTERS)),
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


#: The XMM registers' type, as gdb's SSE feature declares it: one 128-bit register seen as
#: vectors of floats and integers of each width, or as a whole (gdb manual G.4 "Predefined
#: Target Types" and G.3 vector/union types; ``p $xmm0.v4_int32``).
VEC128 = (
    '<vector id="v4f" type="ieee_single" count="4"/>',
    '<vector id="v2d" type="ieee_double" count="2"/>',
    '<vector id="v16i8" type="int8" count="16"/>',
    '<vector id="v8i16" type="int16" count="8"/>',
    '<vector id="v4i32" type="int32" count="4"/>',
    '<vector id="v2i64" type="int64" count="2"/>',
    '<union id="vec128">',
    *(f'<field name="{name}" type="{kind}"/>' for name, kind in (
        ("v4_float", "v4f"), ("v2_double", "v2d"), ("v16_int8", "v16i8"),
        ("v8_int16", "v8i16"), ("v4_int32", "v4i32"), ("v2_int64", "v2i64"),
        ("uint128", "uint128"))),
    "</union>",
)
TYPES = {"org.gnu.gdb.i386.sse": VEC128}


def target_xml() -> bytes:
    lines = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
             "<target>", "<architecture>i386:x86-64</architecture>"]
    for feature, regs in FEATURES:
        lines.append(f'<feature name="{feature}">')
        lines += TYPES.get(feature, ())
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
