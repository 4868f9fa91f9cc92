"""The crash report's code view: the bytes around the faulting RIP, read through the guest's own
page tables with bounds-checked accessors, disassembled with capstone."""

from __future__ import annotations

from dataclasses import dataclass

from vmmarch_cli.arch.x86_64 import paging
from vmmarch_cli.vcpu import GuestMemory, Sregs

#: Bytes read before RIP (for the instructions that led there) and from RIP on.
BEFORE = 32
AFTER = 16


@dataclass(frozen=True)
class CodeWindow:
    address: int  # guest-virtual address of data[0]
    data: bytes
    rip: int


def read_code(memory: GuestMemory, sregs: Sregs, rip: int) -> CodeWindow | None:
    """Bytes around ``rip``; byte by byte so a window that crosses into unmapped memory is cut,
    never read past a region."""
    out = bytearray()
    start = rip - BEFORE
    for va in range(rip - BEFORE, rip + AFTER):
        pa = paging.guest_physical(sregs, va & 0xFFFF_FFFF_FFFF_FFFF, memory)
        if pa is None or not memory.contains(pa, 1):
            if va < rip:
                out.clear()
                start = va + 1
                continue
            break
        out += memory.read(pa, 1)
    if not out or start > rip:
        return None
    return CodeWindow(start, bytes(out), rip)


def disassemble(window: CodeWindow, mode64: bool = True, before: int = 4) -> list[str]:
    """Up to ``before`` instructions leading to RIP and the one at RIP (marked ``=>``).

    x86 cannot be decoded backwards exactly: take the earliest start whose decoding lands on
    RIP. Returns the raw bytes as hex if capstone is missing.
    """
    try:
        import capstone
    except ImportError:
        return [f"{window.data.hex(' ')} (install capstone to disassemble)"]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if mode64 else capstone.CS_MODE_32)
    offset = window.rip - window.address
    for skip in range(offset + 1):
        insns = list(md.disasm(window.data[skip:], window.address + skip))
        addresses = [i.address for i in insns]
        if window.rip in addresses:
            at = addresses.index(window.rip)
            lines = []
            for i in insns[max(0, at - before) : at + 1]:
                mark = "=>" if i.address == window.rip else "  "
                lines.append(f"{mark} {i.address:#018x}  {i.bytes.hex(' '):<30} "
                             f"{i.mnemonic} {i.op_str}".rstrip())
            return lines
    return [f"=> {window.rip:#018x}  {window.data[offset:].hex(' ')} (undecodable)"]
