"""Segment descriptors: pack them for the GDT, unpack them into neutral ``Segment`` state.

Descriptor layout: Intel SDM vol. 3A 3.4.5 (code/data) and 7.2.3 (64-bit TSS, 16 bytes).
``flags`` is the 16-bit attribute word: access byte in bits 0-7, AVL/L/D/G in bits 12-15;
bits 8-11 of the word are where limit bits 16-19 sit in the descriptor and are ignored here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmmarch_cli.vcpu import (
    ATTR_DB,
    ATTR_G,
    ATTR_L,
    ATTR_MASK,
    ATTR_P,
    ATTR_S,
    ATTR_TYPE_ACCESSED,
    TYPE_CODE_XR,
    TYPE_DATA_RW,
    TYPE_TSS_BUSY,
    Segment,
)

# The boot segments' attribute words (vcpu.py: ATTR_*), all DPL 0.
_CODE = ATTR_P | ATTR_S | TYPE_CODE_XR | ATTR_TYPE_ACCESSED
CODE64_FLAGS = ATTR_G | ATTR_L | _CODE  # 0xA09B
DATA_FLAGS = ATTR_G | ATTR_DB | ATTR_P | ATTR_S | TYPE_DATA_RW | ATTR_TYPE_ACCESSED  # 0xC093
CODE32_FLAGS = ATTR_G | ATTR_DB | _CODE  # 0xC09B: 32-bit flat code (PVH entry)
TSS64_BUSY_FLAGS = ATTR_P | TYPE_TSS_BUSY  # 0x008B
TSS32_BUSY_FLAGS = TSS64_BUSY_FLAGS  # the same type is "busy 32-bit TSS" outside long mode

#: A TSS is 104 bytes; its limit is the last byte (SDM 7.2.1). The PVH ABI asks for 0x67.
TSS_LIMIT = 0x67


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Pack a code/data/system descriptor's low 8 bytes (SDM vol. 3A figure 3-8).

    ``limit`` is the raw 20-bit field (in 4 KiB units when G is set).
    """
    return (
        ((base & 0xFF00_0000) << (56 - 24))
        | ((flags & ATTR_MASK) << 40)
        | ((limit & 0xF_0000) << (48 - 16))
        | ((base & 0x00FF_FFFF) << 16)
        | (limit & 0xFFFF)
    )


def tss64_entry(flags: int, base: int, limit: int) -> tuple[int, int]:
    """A 16-byte 64-bit TSS descriptor as two u64 (SDM vol. 3A figure 7-4)."""
    return gdt_entry(flags, base, limit), (base >> 32) & 0xFFFF_FFFF


@dataclass(frozen=True)
class Descriptor:
    """An unpacked descriptor: what the CPU loads into a segment's hidden part."""

    base: int
    limit_field: int
    flags: int

    @classmethod
    def unpack(cls, raw: int) -> Descriptor:
        base = ((raw >> 16) & 0xFF_FFFF) | ((raw >> 32) & 0xFF00_0000)
        limit_field = (raw & 0xFFFF) | ((raw >> 32) & 0xF_0000)
        flags = (raw >> 40) & ATTR_MASK
        return cls(base, limit_field, flags)

    @property
    def granular(self) -> bool:
        return bool(self.flags & ATTR_G)

    @property
    def limit_bytes(self) -> int:
        """The limit in bytes: 4 KiB units with G=1 (SDM 3.4.5, "G flag")."""
        if self.granular:
            return (self.limit_field << 12) | 0xFFF
        return self.limit_field


def segment_from_gdt(raw: int, index: int) -> Segment:
    """The ``Segment`` a CPU holds after loading GDT entry ``index`` (RPL 0)."""
    d = Descriptor.unpack(raw)
    return Segment(selector=index * 8, base=d.base, limit=d.limit_bytes, attributes=d.flags)


def pack_table(entries: list[int]) -> bytes:
    return b"".join(e.to_bytes(8, "little") for e in entries)


# Selectors of the Linux 64-bit boot GDT. Documentation/arch/x86/boot.rst, "64-bit Boot
# Protocol": "__BOOT_CS(0x10) must have execute/read permission, and __BOOT_DS(0x18) must have
# read/write permission". Index 1 stays null, as in the kernel's own boot GDT.
BOOT_CS_INDEX = 2
BOOT_DS_INDEX = 3
BOOT_TSS_INDEX = 4


# The PVH entry GDT (docs/misc/pvh.pandoc, "CS: must be a 32-bit read/execute code segment with
# a base of '0' and a limit of '0xFFFFFFFF'", DS/ES/SS alike for data, TR a 32-bit TSS, active,
# base 0, limit 0x67). Selectors as Firecracker's: 0x08, 0x10, 0x18.
PVH_CS_INDEX = 1
PVH_DS_INDEX = 2
PVH_TSS_INDEX = 3


def pvh_gdt() -> list[int]:
    return [
        0,
        gdt_entry(CODE32_FLAGS, 0, 0xFFFFF),
        gdt_entry(DATA_FLAGS, 0, 0xFFFFF),
        gdt_entry(TSS32_BUSY_FLAGS, 0, TSS_LIMIT),
    ]


def linux64_gdt() -> list[int]:
    """The boot GDT as u64 words: null, null, __BOOT_CS, __BOOT_DS, a 16-byte busy TSS."""
    tss_low, tss_high = tss64_entry(TSS64_BUSY_FLAGS, 0, TSS_LIMIT)
    return [
        0,
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xFFFFF),
        gdt_entry(DATA_FLAGS, 0, 0xFFFFF),
        tss_low,
        tss_high,
    ]
