"""The port-I/O bus: port ranges to devices; unclaimed ports are counted, reads float high."""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Protocol


class PortDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class IoBus:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, PortDevice]] = []
        #: (direction, port) -> accesses no device claimed; shown with -v.
        self.unhandled: Counter[tuple[str, int]] = Counter()

    def add(self, base: int, length: int, device: PortDevice) -> None:
        i = bisect.bisect(self._starts, base)
        if (i > 0 and self._ranges[i - 1][1] > base) or (
            i < len(self._ranges) and self._ranges[i][0] < base + length
        ):
            raise ValueError(f"ports {base:#x}+{length} overlap a device already on the bus")
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, base + length, device))

    def _find(self, port: int) -> tuple[int, PortDevice] | None:
        i = bisect.bisect(self._starts, port) - 1
        if i >= 0:
            start, end, device = self._ranges[i]
            if port < end:
                return port - start, device
        return None

    def read(self, port: int, size: int) -> int:
        found = self._find(port)
        if found is None:
            self.unhandled["in", port] += 1
            return (1 << (8 * size)) - 1  # nothing drives the bus: all ones, as on a PC
        return found[1].read(found[0], size)

    def write(self, port: int, size: int, value: int) -> None:
        found = self._find(port)
        if found is None:
            self.unhandled["out", port] += 1
            return
        found[1].write(found[0], size, value)
