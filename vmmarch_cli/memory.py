"""Guest RAM: anonymous host mappings, one per guest-physical region, with bounds-checked access.

The mappings are ``MAP_NORESERVE``: a 16 GiB guest costs nothing until it touches a page.
Every backend maps these same host pages (KVM through ``userspace_addr``, an emulator through
its own pointer-mapping call), so the loader and the arch pipeline write guest memory once,
whatever the backend.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from vmmarch_cli.errors import GuestMemoryError

#: mmap(2)'s "do not reserve swap space" flag (include/uapi/asm-generic/mman.h, which x86 uses).
#: Python's mmap module names it only from 3.13 on.
MAP_NORESERVE = 0x4000
#: mmap(2)'s "exactly here, replacing what was there" flag (uapi/asm-generic/mman-common.h).
MAP_FIXED = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_mmap.restype = ctypes.c_void_p
MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass
class _Region:
    start: int
    length: int
    mapping: mmap.mmap
    host_address: int

    @property
    def end(self) -> int:
        return self.start + self.length


class MmapGuestMemory:
    """``GuestMemory`` backed by anonymous mmaps; see ``vmmarch_cli.vcpu.GuestMemory``."""

    def __init__(self, regions: Sequence[tuple[int, int]]) -> None:
        self._regions: list[_Region] = []
        previous_end = 0
        for start, length in sorted(regions):
            misaligned = start % mmap.PAGESIZE or length % mmap.PAGESIZE
            if length <= 0 or start < previous_end or misaligned:
                raise GuestMemoryError(
                    f"bad memory region [{start:#x}, +{length:#x}): regions must be page-aligned, "
                    "non-empty and must not overlap"
                )
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
            try:
                mapping = mmap.mmap(-1, length, flags=flags)
            except OSError as e:  # ENOMEM: beyond the address space or vm.overcommit rules
                self.close()
                raise GuestMemoryError(
                    f"cannot map {length >> 20} MiB of guest RAM at {start:#x}: {e.strerror} "
                    "(a smaller --mem fits)") from None
            anchor = ctypes.c_char.from_buffer(mapping)
            host_address = ctypes.addressof(anchor)
            del anchor  # drop the buffer export so close() can unmap later
            self._regions.append(_Region(start, length, mapping, host_address))
            previous_end = start + length

    # --- GuestMemory ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        return sum(r.length for r in self._regions)

    def regions(self) -> Sequence[tuple[int, int]]:
        return [(r.start, r.length) for r in self._regions]

    def host_regions(self) -> Sequence[tuple[int, int, int]]:
        """(guest start, length, host address) for a backend to map."""
        return [(r.start, r.length, r.host_address) for r in self._regions]

    def contains(self, address: int, length: int) -> bool:
        return self._find(address, length) is not None

    def read(self, address: int, length: int) -> bytes:
        region, offset = self._locate(address, length)
        return region.mapping[offset : offset + length]

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        region, offset = self._locate(address, len(data))
        region.mapping[offset : offset + len(data)] = data

    def view(self, address: int, length: int) -> memoryview:
        region, offset = self._locate(address, length)
        return memoryview(region.mapping)[offset : offset + length]

    def read_u8(self, address: int) -> int:
        return self.read(address, 1)[0]

    def read_u16(self, address: int) -> int:
        return int.from_bytes(self.read(address, 2), "little")

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def map_private(self, fd: int, offset: int) -> None:
        """Replace guest RAM with a copy-on-write mapping of ``fd``'s image at ``offset``
        (page-aligned): the regions one after another, as a snapshot keeps them. The backend
        keeps the same host addresses. Raises GuestMemoryError."""
        at = offset
        for region in self._regions:
            _map_fixed(region.host_address, region.length, fd, at,
                       f"the memory image at {region.start:#x}")
            at += region.length

    def map_file(self, fd: int, offset: int, address: int, length: int) -> None:
        """Map ``length`` bytes of ``fd`` from ``offset`` (page-aligned) copy-on-write over
        guest RAM at ``address`` (page-aligned, inside one region): a snapshot's pages kept by
        reference to a file (snapshot/refs.py). Raises GuestMemoryError."""
        region, at = self._locate(address, length)
        _map_fixed(region.host_address + at, length, fd, offset, f"a file at {address:#x}")

    def close(self) -> None:
        for region in self._regions:
            region.mapping.close()
        self._regions.clear()

    def __enter__(self) -> MmapGuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------

    def _find(self, address: int, length: int) -> tuple[_Region, int] | None:
        if address < 0 or length < 0:
            return None
        for region in self._regions:
            if region.start <= address and address + length <= region.end:
                return region, address - region.start
        return None

    def _locate(self, address: int, length: int) -> tuple[_Region, int]:
        found = self._find(address, length)
        if found is None:
            raise GuestMemoryError(
                f"guest range [{address:#x}, +{length:#x}) is outside guest RAM "
                f"({self._describe()})"
            )
        return found

    def _describe(self) -> str:
        return ", ".join(f"[{r.start:#x}, {r.end:#x})" for r in self._regions) or "no RAM"


def _map_fixed(host: int, length: int, fd: int, offset: int, what: str) -> None:
    """``fd`` from ``offset``, copy-on-write, at host address ``host`` in place of what was
    mapped there (the backend keeps using the address). Raises GuestMemoryError."""
    got = _mmap(host, length, mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, offset)
    if got != host:
        raise GuestMemoryError(f"cannot map {what}: {os.strerror(ctypes.get_errno())}")
