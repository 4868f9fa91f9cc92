"""The guest's descriptor tables, read the way the CPU reads them (through its paging).

unicorn keeps only the selector of CS, SS, DS and ES (its 64-bit mode never loads their
descriptors), so a wrong hidden state would go unnoticed on the emulator while KVM runs the
guest in the wrong mode. ``check_segments`` closes that gap: every segment the VMM sets must be
what a CPU would load from the GDT for its selector. ``gate_problem`` tells whether an exception
could be delivered through the guest's IDT. Layouts: Intel SDM vol. 3A 3.4.5 (segment
descriptors), 7.2.3 (64-bit TSS descriptor), 6.10-6.14.1 (IDT and gate descriptors).
"""

from __future__ import annotations

from vmmarch_cli.arch.x86_64 import paging, regs
from vmmarch_cli.arch.x86_64.gdt import Descriptor
from vmmarch_cli.errors import BackendError, GuestMemoryError
from vmmarch_cli.vcpu import (
    ATTR_MASK,
    ATTR_P,
    ATTR_S,
    ATTR_TYPE_ACCESSED,
    ATTR_TYPE_BUSY,
    GuestMemory,
    Segment,
    Sregs,
)

SELECTOR_TI = 1 << 2  # table indicator: the LDT (SDM 3.4.2)
#: Gate types (SDM table 3-2): 64-bit interrupt/trap gates, and the legacy ones.
GATE_TYPES_64 = frozenset({0xE, 0xF})
GATE_TYPES_32 = frozenset({0x5, 0x6, 0x7, 0xE, 0xF})
CHECKED = ("cs", "ss", "ds", "es", "fs", "gs", "tr", "ldt")


def long_mode(s: Sregs) -> bool:
    return bool(s.efer & regs.EFER_LMA)


def read_linear(memory: GuestMemory, s: Sregs, linear: int, length: int) -> bytes | None:
    """``length`` bytes at a linear address, through the guest's 4-level tables when paging is
    on; None where a page is absent or outside RAM (bounds-checked by ``memory``)."""
    out = bytearray()
    while length > 0:
        # One walk per 4 KiB page (the smallest page: larger ones are contiguous within it).
        chunk = min(length, paging.PAGE_SIZE - (linear & (paging.PAGE_SIZE - 1)))
        physical = to_physical(memory, s, linear)
        if physical is None or not memory.contains(physical, chunk):
            return None
        out += memory.read(physical, chunk)
        linear, length = linear + chunk, length - chunk
    return bytes(out)


def to_physical(memory: GuestMemory, s: Sregs, linear: int) -> int | None:
    found = translate(memory, s, linear)
    return None if found is None else found[0]


def translate(memory: GuestMemory, s: Sregs, linear: int) -> tuple[int, bool] | None:
    """The physical address of ``linear``, and whether a supervisor write there would not
    fault (with CR0.WP set, R/W at every level, SDM vol. 3A 4.6.1); None where unmapped or
    outside RAM. One walk answers both."""
    if not s.cr0 & regs.X86_CR0_PG:
        return linear & 0xFFFF_FFFF, True
    if not long_mode(s):
        return None  # 32-bit and PAE paging are not walked here; no boot path uses them
    try:
        found = paging.walk(s.cr3, linear & 0xFFFF_FFFF_FFFF_FFFF,
                            lambda a: int.from_bytes(memory.read(a, 8), "little"))
    except GuestMemoryError:
        return None
    if found is None:
        return None
    physical, writable = found
    return physical, writable or not s.cr0 & regs.X86_CR0_WP


def load_segment(memory: GuestMemory, s: Sregs, name: str, selector: int) -> Segment:
    """The segment a CPU holds after loading ``selector`` from the GDT at ``s.gdt``.

    Raises BackendError naming what is wrong (beyond the limit, unreadable, LDT selector).
    """
    if selector & SELECTOR_TI:
        raise BackendError(f"{name.upper()} selector {selector:#x} names the LDT; the emulate "
                           "backend checks GDT selectors only")
    index = selector >> 3
    system = name in ("tr", "ldt")
    size = 16 if system and long_mode(s) else 8  # 16-byte system descriptors (SDM 7.2.3)
    offset = index * 8
    if offset + size - 1 > s.gdt.limit:
        raise BackendError(f"{name.upper()} selector {selector:#x} is beyond the GDT limit "
                           f"{s.gdt.limit:#x}")
    raw = read_linear(memory, s, s.gdt.base + offset, size)
    if raw is None:
        raise BackendError(f"GDT entry {index} for {name.upper()} at linear "
                           f"{s.gdt.base + offset:#x} is not in mapped guest RAM")
    d = Descriptor.unpack(int.from_bytes(raw[:8], "little"))
    base = d.base | (int.from_bytes(raw[8:12], "little") << 32 if size == 16 else 0)
    return Segment(selector, base, d.limit_bytes, d.flags)


def _comparable(attributes: int) -> int:
    """Attributes without the bits a load sets by itself: accessed (code/data), busy (TSS)."""
    a = attributes & ATTR_MASK
    return a & ~ATTR_TYPE_ACCESSED if a & ATTR_S else a & ~ATTR_TYPE_BUSY


def check_segments(memory: GuestMemory, s: Sregs) -> None:
    """Raise BackendError unless every non-null segment matches its GDT descriptor.

    Nothing is checked outside protected mode, where segments do not come from the GDT.
    """
    if not s.cr0 & regs.X86_CR0_PE:
        return
    for name in CHECKED:
        given: Segment = getattr(s, name)
        if given.selector & ~0x3 == 0:
            if name == "cs":
                raise BackendError("CS is a null selector in protected mode")
            continue  # a null data segment (or no TR/LDT) loads nothing
        loaded = load_segment(memory, s, name, given.selector & ~0x3)
        same = (given.base == loaded.base and given.limit == loaded.limit
                and _comparable(given.attributes) == _comparable(loaded.attributes))
        if not same:
            raise BackendError(
                f"{name.upper()} hidden state (base {given.base:#x}, limit {given.limit:#x}, "
                f"attributes {given.attributes:#06x}) differs from GDT entry "
                f"{given.selector >> 3} (base {loaded.base:#x}, limit {loaded.limit:#x}, "
                f"attributes {loaded.attributes:#06x}): a CPU would load the GDT's"
            )


def gate_problem(memory: GuestMemory, s: Sregs, vector: int) -> str | None:
    """Why the CPU could not deliver ``vector`` through the IDT, or None if it has a gate."""
    if not s.cr0 & regs.X86_CR0_PE:
        if vector * 4 + 3 > s.idt.limit:  # real-mode IVT, 4-byte entries (SDM 20.1.4)
            return f"vector {vector} is beyond the IVT limit {s.idt.limit:#x}"
        return None
    size = 16 if long_mode(s) else 8
    if vector * size + size - 1 > s.idt.limit:
        return f"vector {vector} is beyond the IDT limit {s.idt.limit:#x}"
    raw = read_linear(memory, s, s.idt.base + vector * size, 8)
    if raw is None:
        return f"the IDT entry of vector {vector} is not in mapped guest RAM"
    # The type is checked before the present bit, as the CPU does (SDM vol. 2A, INT n
    # pseudo-code: #GP for a descriptor that is not a gate, then #NP for a gate not present).
    access = raw[5]
    kind = access & 0xF
    if kind not in (GATE_TYPES_64 if long_mode(s) else GATE_TYPES_32) or access & ATTR_S:
        return f"the IDT entry of vector {vector} is not a gate (type {kind:#x})"
    if not access & ATTR_P:
        return f"the IDT gate of vector {vector} is not present"
    return None


def not_present(problem: str) -> bool:
    return problem.endswith("not present")
