"""Enough of the i8042 keyboard controller for Linux to probe it and to reset through it.

Commands and status bits: Linux drivers/input/serio/i8042.h; the "pulse reset line" command
0xFE is how ``reboot=k`` resets a PC.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

I8042_STR_OBF = 0x01  # output buffer full: data for the CPU at port 0x60
I8042_STR_SYSFLAG = 0x04
I8042_STR_CMDDAT = 0x08  # last write was a command
I8042_CMD_CTL_RCTR = 0x20
I8042_CMD_CTL_WCTR = 0x60
I8042_CMD_CTL_TEST = 0xAA
I8042_CMD_KBD_TEST = 0xAB
I8042_CMD_RESET_CPU = 0xFE
I8042_CTR_KBDINT = 0x01
I8042_CTR_XLATE = 0x40


@dataclass(frozen=True)
class I8042State:
    ctr: int
    out: tuple[int, ...]
    pending_command: int
    status: int


class I8042:
    """Occupies ports 0x60-0x64 (offsets 0 and 4)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._ctr = I8042_CTR_KBDINT | I8042_CTR_XLATE
        self._out: deque[int] = deque()
        self._pending_command = 0
        self._status = I8042_STR_SYSFLAG

    def save(self) -> I8042State:
        return I8042State(self._ctr, tuple(self._out), self._pending_command, self._status)

    def restore(self, state: I8042State) -> None:
        self._ctr, self._out = state.ctr, deque(state.out)
        self._pending_command, self._status = state.pending_command, state.status

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self._out.popleft() if self._out else 0
        if offset == 4:
            return self._status | (I8042_STR_OBF if self._out else 0)
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 4:
            self._status |= I8042_STR_CMDDAT
            if value == I8042_CMD_RESET_CPU:
                self._on_reset()
            elif value == I8042_CMD_CTL_RCTR:
                self._out.append(self._ctr)
            elif value == I8042_CMD_CTL_WCTR:
                self._pending_command = value
            elif value == I8042_CMD_CTL_TEST:
                self._out.append(0x55)  # controller self-test passed
            elif value == I8042_CMD_KBD_TEST:
                self._out.append(0x00)  # keyboard interface test passed
        elif offset == 0:
            self._status &= ~I8042_STR_CMDDAT
            if self._pending_command == I8042_CMD_CTL_WCTR:
                self._ctr = value
            self._pending_command = 0
