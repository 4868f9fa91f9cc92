"""The exit port: a guest writes its status and the VMM ends with it.

It sits at board.EXIT_PORT (0xf4, where QEMU's isa-debug-exit conventionally sits); unlike
QEMU (which exits with ``value << 1 | 1``), vmm-arch exits with the value itself, so a guest's
``exit 7`` is 7.
A 1-, 2- or 4-byte write is accepted; the low 8 bits are the status.
"""

from __future__ import annotations

from collections.abc import Callable


class ExitPort:
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value & 0xFF)
