"""What to do when KVM cannot emulate a guest instruction (KVM_EXIT_INTERNAL_ERROR, emulation).

On a KVM that emulates guest ring-0 code (the PVM module on nested hosts, see
../shared/reference/int3-and-emulation-failures.md), the emulator gives up on software
interrupts: ``int3`` (CC), ``int n`` (CD nn) and ``int1`` (F1). The guest's own handler can run
anyway if the VMM steps past the instruction and injects the event it would have raised; the
hypervisor then delivers it through the guest IDT. It also gives up on ``fwait`` (9B), which
the VMM can complete itself: with no unmasked x87 exception pending it does nothing.
Hardware KVM never exits here for these instructions, so this path costs it nothing.

This module only decodes; the vCPU applies the decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmmarch_cli.arch.x86_64.opcodes import OPCODE_INT1, OPCODE_INT3, OPCODE_INT_N

# Intel SDM vol. 2B, INT n/INTO/INT3/INT1: the vectors they raise.
VECTOR_MATH_FAULT = 16  # #MF
#: x87 status word bit 7, ES: an unmasked exception is pending (SDM vol. 1 8.1.3).
FSW_ERROR_SUMMARY = 1 << 7
VECTOR_DEBUG = 1
VECTOR_BREAKPOINT = 3


@dataclass(frozen=True)
class SoftwareEvent:
    """Advance RIP by ``length`` and deliver ``vector``; ``exception`` picks the event kind.

    int3 and int1 are exceptions (#BP, #DB: KVM injects them as such); ``int n`` is a software
    interrupt, which KVM only accepts through the interrupt field for vectors above 31.
    """

    mnemonic: str
    vector: int | None  # None: nothing to deliver, only step past the instruction
    length: int
    exception: bool


def fwait_event(fsw: int) -> SoftwareEvent:
    """FWAIT (SDM vol. 2A, WAIT/FWAIT): #MF if an unmasked x87 exception is pending, else
    nothing."""
    if fsw & FSW_ERROR_SUMMARY:
        # #MF is a fault: the saved RIP stays on the FWAIT, so nothing is skipped.
        return SoftwareEvent("fwait", VECTOR_MATH_FAULT, 0, exception=True)
    return SoftwareEvent("fwait", None, 1, exception=False)


def decode_software_event(insn: bytes) -> SoftwareEvent | None:
    if not insn:
        return None
    op = insn[0]
    if op == OPCODE_INT3:
        return SoftwareEvent("int3", VECTOR_BREAKPOINT, 1, exception=True)
    if op == OPCODE_INT1:
        return SoftwareEvent("int1", VECTOR_DEBUG, 1, exception=True)
    if op == OPCODE_INT_N and len(insn) >= 2:
        vector = insn[1]
        # `int $3` raises #BP like int3 does (SDM: "INT 3 ... the same as INT3" apart from
        # IOPL/VME checks that do not apply in 64-bit ring 0).
        return SoftwareEvent(f"int {vector:#x}", vector, 2, exception=vector < 32)
    return None
