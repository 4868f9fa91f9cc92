"""The port-I/O bus: port ranges to devices; unclaimed ports are counted, reads float high."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class PortDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class Posting:
    """What a device lets a vCPU do at its registers without calling it, as long as nothing
    else touches it: ``reads``, register offset -> the byte every read returns (reads without a
    side effect); ``queued``, offsets whose byte writes have no effect but what
    ``write_queued`` does with them later, in order."""

    reads: Mapping[int, int] = field(default_factory=dict)
    queued: frozenset[int] = frozenset()


@runtime_checkable
class PostingDevice(PortDevice, Protocol):
    """A device that can say its ``Posting`` (vcpu.PostedPortIo)."""

    def posting(self) -> Posting: ...
    def write_queued(self, offset: int, data: bytes) -> None:
        """Byte writes to ``offset`` that were queued, in order."""
        ...


class IoBus:
    def __init__(self) -> None:
        self._starts: list[int] = []
        # (start, end, device, the device again if it posts): whether a device posts is
        # decided once, as isinstance() against a runtime-checkable protocol costs ~9 us and
        # posting_at runs on every port exit.
        self._ranges: list[tuple[int, int, PortDevice, PostingDevice | None]] = []
        #: (direction, port) -> accesses no device claimed; shown with -v.
        self.unhandled: Counter[tuple[str, int]] = Counter()

    def add(self, base: int, length: int, device: PortDevice) -> None:
        i = bisect.bisect(self._starts, base)
        if (i > 0 and self._ranges[i - 1][1] > base) or (
            i < len(self._ranges) and self._ranges[i][0] < base + length
        ):
            raise ValueError(f"ports {base:#x}+{length} overlap a device already on the bus")
        self._starts.insert(i, base)
        posting = device if isinstance(device, PostingDevice) else None
        self._ranges.insert(i, (base, base + length, device, posting))

    def devices(self) -> Iterator[tuple[int, PortDevice]]:
        """(base port, device) of every device, by port."""
        for start, _, device, _ in self._ranges:
            yield start, device

    def posting_devices(self) -> Iterator[tuple[int, PostingDevice]]:
        """(base port, device) of every device that can post its registers."""
        for start, _, _, posting in self._ranges:
            if posting is not None:
                yield start, posting

    def posting_at(self, port: int) -> tuple[int, PostingDevice] | None:
        """(base port, device) of the posting device that holds ``port``."""
        found = self._range(port)
        if found is None or found[3] is None:
            return None
        return found[0], found[3]

    def write_queued(self, port: int, data: bytes) -> None:
        found = self._range(port)
        if found is not None and found[3] is not None:
            found[3].write_queued(port - found[0], data)

    def _range(self, port: int) -> tuple[int, int, PortDevice, PostingDevice | None] | None:
        i = bisect.bisect(self._starts, port) - 1
        if i >= 0 and port < self._ranges[i][1]:
            return self._ranges[i]
        return None

    def _find(self, port: int) -> tuple[int, PortDevice] | None:
        found = self._range(port)
        return (port - found[0], found[2]) if found is not None else None

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
