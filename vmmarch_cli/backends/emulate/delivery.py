"""Whether an exception can be delivered through the guest's IDT without faulting again, and
if not, what the CPU would deliver instead. Pure: guest memory and state in, a decision out.

QEMU's delivery code (native.py) does the delivery itself; it must never fault inside (it would
longjmp through Python), so every read and write it will make is checked here first, in long
mode (SDM vol. 3A 6.14): the IDT gate, the gate's code segment in the GDT, TSS.RSP0 or
TSS.IST[n] when the stack switches, and the six quadwords of the frame on the new stack.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmmarch_cli.backends.emulate import descriptors, faults
from vmmarch_cli.vcpu import ATTR_DPL_MASK, ATTR_DPL_SHIFT, ATTR_L, ATTR_P, GuestMemory, Sregs

#: Error-code bits for a fault caused by an IDT entry (SDM 6.13): EXT, IDT; index = vector.
ERROR_EXT = 1
ERROR_IDT = 2
#: 64-bit TSS: RSP0 at 4, IST1..IST7 at 0x24.. (SDM 7.7, figure 7-11).
TSS_RSP0 = 0x4
TSS_IST1 = 0x24
#: The frame: SS, RSP, RFLAGS, CS, RIP and an error code, 8 bytes each (SDM 6.14.2), on a stack
#: aligned down to 16 bytes, mapped and writable (a fault while QEMU pushes it would longjmp
#: through the Python hook).
FRAME_BYTES = 6 * 8


@dataclass(frozen=True)
class Decision:
    """Deliver ``vector`` (with ``error_code``: None keeps the CPU's own), after moving RIP back
    by ``rewind`` bytes (an INT n that faults is restarted, SDM 6.12.1.1); or ``problem``."""

    vector: int
    error_code: int | None = None
    rewind: int = 0
    problem: str = ""


@dataclass(frozen=True)
class Gate:
    offset: int
    selector: int
    ist: int
    dpl: int


def read_gate(memory: GuestMemory, s: Sregs, vector: int) -> Gate | None:
    raw = descriptors.read_linear(memory, s, s.idt.base + vector * 16, 16)
    if raw is None:
        return None
    low, selector, ist, access, mid, high = struct.unpack_from("<HHBBHI", raw)
    return Gate(low | mid << 16 | high << 32, selector, ist & 0x7, (access >> 5) & 0x3)


def _stack_problem(memory: GuestMemory, s: Sregs, gate: Gate, cpl: int, rsp: int) -> str:
    try:
        target = descriptors.load_segment(memory, s, "cs", gate.selector & ~0x3)
    except Exception as e:  # BackendError: beyond the GDT, unmapped
        return f"its code segment {gate.selector:#x}: {e}"
    if not target.attributes & ATTR_P or not target.attributes & ATTR_L:
        return f"its code segment {gate.selector:#x} is not a present 64-bit code segment"
    new_cpl = (target.attributes >> ATTR_DPL_SHIFT) & ATTR_DPL_MASK
    if gate.ist or new_cpl < cpl:
        slot = TSS_IST1 + 8 * (gate.ist - 1) if gate.ist else TSS_RSP0
        raw = descriptors.read_linear(memory, s, s.tr.base + slot, 8)
        if raw is None or s.tr.limit < slot + 7:
            return f"TSS slot {slot:#x} is not readable"
        rsp = int.from_bytes(raw, "little")
    top = rsp & ~0xF
    for address in (top - FRAME_BYTES, top - 1):
        found = descriptors.translate(memory, s, address)
        if found is None:
            return f"the stack at {top:#x} is not mapped"
        if not found[1]:
            return f"the stack at {top:#x} is not writable"
    return ""


def decide(memory: GuestMemory, s: Sregs, cpl: int, rsp: int, vector: int, software: bool,
           instruction_length: int) -> Decision:
    """What the CPU does with ``vector`` raised at CPL ``cpl`` with stack pointer ``rsp``."""
    problem = descriptors.gate_problem(memory, s, vector)
    if problem is not None:
        outcome = faults.escalate(vector, lambda v: descriptors.gate_problem(memory, s, v),
                                  descriptors.not_present)
        if outcome.delivered is None:
            trail = " -> ".join(faults.vector_name(v) for v in outcome.trail)
            return Decision(vector, problem=f"triple fault ({trail}: {problem})")
        error = 0 if outcome.delivered == faults.DOUBLE_FAULT else (
            vector << 3 | ERROR_IDT | (0 if software else ERROR_EXT))
        return _checked(memory, s, cpl, rsp,
                        Decision(outcome.delivered, error,
                                 instruction_length if software else 0))
    gate = read_gate(memory, s, vector)
    assert gate is not None  # gate_problem read it
    if software and gate.dpl < cpl:
        return _checked(memory, s, cpl, rsp, Decision(faults.GENERAL_PROTECTION,
                                                      vector << 3 | ERROR_IDT,
                                                      instruction_length))
    return _checked(memory, s, cpl, rsp, Decision(vector), gate)


def _checked(memory: GuestMemory, s: Sregs, cpl: int, rsp: int, d: Decision,
             gate: Gate | None = None) -> Decision:
    """``d`` if its delivery cannot fault; ``gate``: d.vector's gate, already checked."""
    if gate is None:
        gate = read_gate(memory, s, d.vector)
        if gate is None or descriptors.gate_problem(memory, s, d.vector) is not None:
            return Decision(d.vector,
                            problem=f"no usable gate for {faults.vector_name(d.vector)}")
    problem = _stack_problem(memory, s, gate, cpl, rsp)
    if problem:
        return Decision(d.vector, problem=f"delivering {faults.vector_name(d.vector)} would "
                                          f"fault: {problem}")
    return d
