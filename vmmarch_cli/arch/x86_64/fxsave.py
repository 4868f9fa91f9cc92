"""The FXSAVE image of the x87 and SSE state (Intel SDM vol. 1 10.5.1, table 10-2): the legacy
region at the start of an XSAVE area too (13.4.1), which is how KVM hands it over. The x87
registers are in stack order (ST0 is the top), 80 bits each in a 16-byte slot; the tag word is
the abridged one, a bit a register (1: valid, 0: empty)."""

from __future__ import annotations

import ctypes

from vmmarch_cli.arch.x86_64.record import Record
from vmmarch_cli.vcpu import Fpu

X87_REGISTERS = 8
XMM_REGISTERS = 16
SLOT = 16  # bytes of each register slot
ST_BITS = 80
#: The full x87 tag of a register the abridged tag calls empty (SDM vol. 1 8.1.7): 0b11.
TAG_EMPTY = 3


class Fxsave(Record):
    _fields_ = (
        ("fcw", ctypes.c_uint16),
        ("fsw", ctypes.c_uint16),
        ("ftw", ctypes.c_uint8),  # abridged
        ("reserved1", ctypes.c_uint8),
        ("fop", ctypes.c_uint16),
        ("fip", ctypes.c_uint64),
        ("fdp", ctypes.c_uint64),
        ("mxcsr", ctypes.c_uint32),
        ("mxcsr_mask", ctypes.c_uint32),
        ("st", (ctypes.c_uint8 * SLOT) * X87_REGISTERS),
        ("xmm", (ctypes.c_uint8 * SLOT) * XMM_REGISTERS),
        ("reserved2", ctypes.c_uint8 * 96),
    )


assert Fxsave.sizeof() == 512


def to_fpu(image: Fxsave) -> Fpu:
    mask = (1 << ST_BITS) - 1
    return Fpu(fcw=image.fcw, mxcsr=image.mxcsr, fsw=image.fsw, ftw=image.ftw,
               st=tuple(int.from_bytes(bytes(r), "little") & mask for r in image.st),
               xmm=tuple(int.from_bytes(bytes(r), "little") for r in image.xmm))


def fill(image: Fxsave, fpu: Fpu) -> None:
    """Write ``fpu`` into ``image`` (the other fields stay as they are)."""
    image.fcw, image.fsw, image.ftw, image.mxcsr = fpu.fcw, fpu.fsw, fpu.ftw, fpu.mxcsr
    for slot, value in zip(image.st, fpu.st, strict=True):
        ctypes.memmove(slot, value.to_bytes(SLOT, "little"), SLOT)
    for slot, value in zip(image.xmm, fpu.xmm, strict=True):
        ctypes.memmove(slot, value.to_bytes(SLOT, "little"), SLOT)


def full_tag(abridged: int) -> int:
    """The 16-bit tag word from the abridged one: empty registers 0b11, the others 0b00 (valid;
    the abridged form does not say zero or special)."""
    return sum(TAG_EMPTY << (2 * i) for i in range(X87_REGISTERS) if not abridged >> i & 1)


def abridged_tag(full: int) -> int:
    return sum(1 << i for i in range(X87_REGISTERS) if (full >> (2 * i)) & 3 != TAG_EMPTY)
