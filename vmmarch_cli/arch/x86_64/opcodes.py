"""Instruction opcodes the VMM itself recognises or writes (Intel SDM vol. 2B: INT n/INTO/INT3/
INT1, and WAIT/FWAIT)."""

OPCODE_INT3 = 0xCC  # also what a debugger plants as a software breakpoint
OPCODE_INT_N = 0xCD
OPCODE_INT1 = 0xF1
OPCODE_FWAIT = 0x9B
