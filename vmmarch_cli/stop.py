"""How a run ends: the reasons a guest stops, and the exit status each gives (DESIGN.md)."""

from __future__ import annotations

from enum import StrEnum

from vmmarch_cli import errors


class StopReason(StrEnum):
    EXIT_PORT = "exit-port"  # the guest wrote its status to the exit port
    POWEROFF = "poweroff"  # the kernel said it powers down
    RESET = "reset"  # a reset through the i8042, or a triple fault
    HALT = "halt"  # every vCPU halted with interrupts off: nothing can wake it
    EXPECT = "expect"  # a console line matched --expect
    TIMEOUT = "timeout"
    PANIC = "panic"  # "Kernel panic" on the console
    FAULT = "fault"  # the vCPU stopped on something the backend cannot run
    INTERRUPTED = "interrupted"  # SIGINT, SIGTERM or SIGHUP


#: The exit status of each stop; EXIT_PORT carries the guest's own.
STATUS_FOR_REASON = {
    StopReason.POWEROFF: 0,
    StopReason.RESET: 0,
    StopReason.HALT: 0,
    StopReason.EXPECT: 0,
    StopReason.TIMEOUT: errors.EX_TIMEOUT,
    StopReason.PANIC: errors.EX_PANIC,
    StopReason.FAULT: errors.EX_SOFTWARE,
    StopReason.INTERRUPTED: errors.EX_INTERRUPTED,
}
