"""The emulated vCPU's port I/O: completed inside the hooks (attach_io), posted to the engine
(vcpu.PostedPortIo, patch 0010), or as KVM-style IoIn/IoOut exits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmmarch_cli.backends.emulate.library import PostedPorts
from vmmarch_cli.backends.emulate.vcpu_core import VcpuCore
from vmmarch_cli.vcpu import (
    IoIn,
    IoOut,
)


class PortIo(VcpuCore):
    def can_post(self) -> bool:
        return PostedPorts.available()

    def post_port(self, port: int, read: int | None, queue: bool) -> bool:
        if not PostedPorts.available():
            return False
        with self._lock:
            self._posts[port] = (read, queue)
            if self._posted is not None:
                self._posted.post(port, read, queue)
        return True

    def collect_posted(self) -> list[tuple[int, bytes]]:
        with self._lock:
            return self._posted.collect() if self._posted is not None else []

    def posted_reads(self) -> int:
        with self._lock:
            return self._posted.reads() if self._posted is not None else self._posted_reads

    def attach_io(self, read: Callable[[int, int], int],
                  write: Callable[[int, int, int], None]) -> None:
        """Complete port I/O inside the instruction hooks with these device handlers instead of
        returning IoIn/IoOut exits (an optional capability the machine uses where a backend
        offers it). Without exits nothing needs a stop in mid-block: the guest runs without
        unicorn's per-instruction hook, and interrupts stop a running burst (``_kick``)."""
        self._io_read, self._io_write = read, write

    def _on_out(self, uc: Any, port: int, size: int, value: int, _: object) -> None:
        if self._io_write is not None:
            self._io_write(port, size, value & ((1 << 8 * size) - 1))
            return
        self._exit = IoOut(port, size, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
        uc.emu_stop()  # after this instruction, as the engine runs with per-instruction checks

    def _on_in(self, uc: Any, port: int, size: int, _: object) -> int:
        if self._io_read is not None:
            return self._io_read(port, size) & ((1 << 8 * size) - 1)
        reply = self._in_reply
        if reply is not None and reply[0] == port:
            self._in_reply = None
            return reply[1]  # the replay: the value complete_io_in gave
        assert self._engine is not None
        self._in_undo = self._engine.io_registers()
        self._exit = IoIn(port, size)
        uc.emu_stop()
        return (1 << 8 * size) - 1  # discarded: the instruction is undone and replayed

    def complete_io_in(self, data: bytes) -> None:
        if not isinstance(self._exit, IoIn):
            return
        size = self._exit.size
        self._in_reply = (self._exit.port,
                          int.from_bytes(data[:size].ljust(size, b"\xff"), "little"))

    def complete_mmio_read(self, data: bytes) -> None:
        pass  # no MMIO exits: an access outside RAM is an InternalError
