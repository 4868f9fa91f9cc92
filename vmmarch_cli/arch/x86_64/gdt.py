"""Segment descriptors: pack them for the GDT, unpack them into neutral ``Segment`` state.

Descriptor layout: Intel SDM vol. 3A 3.4.5 (code/data) and 7.2.3 (64-bit TSS, 16 bytes).
``flags`` is the 16-bit attribute word: access byte in bits 0-7, AVL/L/D/G in bits 12-15;
bits 8-11 of the word are where limit bits 16-19 sit in the descriptor and are ignored here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmmarch_cli.vcpu import Segment

# Attribute words (SDM 3.4.5.1 type field, 3.4.5 flags).
CODE64_FLAGS = 0xA09B  # G=1 L=1 P=1 DPL=0 S=1 type=0xb (execute/read, accessed)
DATA_FLAGS = 0xC093  # G=1 D/B=1 P=1 DPL=0 S=1 type=0x3 (read/write, accessed)
CODE32_FLAGS = 0xC09B  # G=1 D=1, 32-bit flat code (PVH entry)
TSS64_BUSY_FLAGS = 0x008B  # P=1 S=0 type=0xb (busy 64-bit TSS, SDM table 3-2)
TSS32_BUSY_FLAGS = 0x008B  # same type value means "busy 32-bit TSS" outside long mode

#: A TSS is 104 bytes; its limit is the last byte (SDM 7.2.1). The PVH ABI asks for 0x67.
TSS_LIMIT = 0x67


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Pack a code/data/system descriptor's low 8 bytes (SDM vol. 3A figure 3-8).

    ``limit`` is the raw 20-bit field (in 4 KiB units when G is set).
    """
    return (
        ((base & 0xFF00_0000) << (56 - 24))
        | ((flags & 0xF0FF) << 40)
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
        flags = (raw >> 40) & 0xF0FF
        return cls(base, limit_field, flags)

    @property
    def granular(self) -> bool:
        return bool(self.flags & 0x8000)

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
