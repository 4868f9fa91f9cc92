"""Guest RAM in a snapshot file: a sparse image, restored copy-on-write.

The image is guest RAM region after region, at a page-aligned offset of the file. Zero pages
are not written: they stay holes, which take no disk space and read as zeros. A restore maps
the image MAP_PRIVATE over guest RAM (memory.py, ``map_private``), so that nothing is read
until the guest touches it, and any number of guests restored from one file share its page
cache until they write.

The image's CRC covers each run of pages that are not all zeros, with where it starts and its
length (so that it does not depend on which zeros a file system keeps as holes, or whether
``cp`` kept them).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

PAGE = mmap.PAGESIZE
#: The zero check looks at this much at once before it looks at pages (most of a guest's RAM
#: is untouched: a 256 MiB guest booted to init has written ~60 MiB).
CHUNK = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int
_ZEROS = ctypes.create_string_buffer(CHUNK)


@dataclass(frozen=True)
class MemorySource:
    """Guest RAM to save: (host address, length) of each region, in guest-physical order."""

    regions: Sequence[tuple[int, int]]

    @property
    def length(self) -> int:
        return sum(length for _, length in self.regions)


def page_align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def nonzero_runs(address: int, length: int) -> Iterator[tuple[int, int]]:
    """(first page, page count) of each run of pages in [address, +length) that are not all
    zeros; ``length`` is a multiple of the page size."""
    zeros = ctypes.addressof(_ZEROS)
    first = -1
    for chunk in range(0, length, CHUNK):
        size = min(CHUNK, length - chunk)
        if not _memcmp(address + chunk, zeros, size):
            if first >= 0:
                yield first, chunk // PAGE - first
                first = -1
            continue
        for offset in range(chunk, chunk + size, PAGE):
            if _memcmp(address + offset, zeros, PAGE):
                if first < 0:
                    first = offset // PAGE
            elif first >= 0:
                yield first, offset // PAGE - first
                first = -1
    if first >= 0:
        yield first, length // PAGE - first


def write(fd: int, offset: int, source: MemorySource) -> int:
    """Write ``source`` as a sparse image at ``offset`` (page-aligned) of ``fd``; return its
    CRC. Raises OSError."""
    os.ftruncate(fd, offset + source.length)
    runs: list[tuple[int, int]] = []
    base_page = 0
    for address, length in source.regions:
        for first, count in nonzero_runs(address, length):
            data = (ctypes.c_char * (count * PAGE)).from_address(address + first * PAGE)
            view = memoryview(data).cast("B")
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:],
                                     offset + (base_page + first) * PAGE + written)
            runs.append((base_page + first, count))
        base_page += length // PAGE
    return _runs_crc(_merged(runs), lambda first, count: _source_pages(source, first, count))


def crc(fd: int, offset: int, length: int) -> int:
    """The CRC of the image at ``offset`` of ``fd``, reading only what is not a hole (where
    the file system can tell: SEEK_DATA). Raises OSError. zlib releases the GIL while it sums,
    so this can run beside other work (machine.py runs it beside the backend's setup)."""
    if not length:
        return 0
    # A private mapping is writable, so ctypes can take its address; nothing writes to it.
    with mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=offset) as view:
        anchor = ctypes.c_char.from_buffer(view)
        address = ctypes.addressof(anchor)
        del anchor  # no export may outlive the mapping's close
        runs = []
        for start, end in _data_extents(fd, offset, length):
            for first, count in nonzero_runs(address + start, end - start):
                runs.append((start // PAGE + first, count))
        with memoryview(view) as pages:
            return _runs_crc(_merged(runs), lambda first, count: [
                pages[first * PAGE : (first + count) * PAGE]])


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent runs as one: the CRC must not depend on where regions or a file system's
    extents split them."""
    out: list[tuple[int, int]] = []
    for first, count in runs:
        if out and out[-1][0] + out[-1][1] == first:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((first, count))
    return out


def _runs_crc(runs: list[tuple[int, int]],
              pages: Callable[[int, int], Iterable[memoryview]]) -> int:
    """CRC-32 over each run of non-zero pages: its first page and count, then its bytes, which
    ``pages(first, count)`` gives (in pieces where the run spans guest RAM regions)."""
    result = 0
    for first, count in runs:
        result = zlib.crc32(first.to_bytes(8, "little") + count.to_bytes(8, "little"), result)
        for piece in pages(first, count):
            result = zlib.crc32(piece, result)
    return result


def _source_pages(source: MemorySource, first: int, count: int) -> Iterator[memoryview]:
    """Pages ``first`` .. ``first + count`` of the image as ``source``'s regions hold them:
    the CRC of what was written, from guest RAM, not read back from the file."""
    base = 0
    for address, length in source.regions:
        pages = length // PAGE
        start, end = max(first, base), min(first + count, base + pages)
        if start < end:
            data = (ctypes.c_char * ((end - start) * PAGE)).from_address(
                address + (start - base) * PAGE)
            yield memoryview(data).cast("B")
        base += pages


def _data_extents(fd: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """[start, end) of the image's data, page-aligned and relative to ``offset``: everything
    when the file system cannot say where its holes are."""
    end = offset + length
    at = offset
    while at < end:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left; EINVAL: no SEEK_DATA here
            if at == offset and not _has_seek_data(fd):
                yield 0, length
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        start = (data - offset) // PAGE * PAGE
        yield start, min(page_align(hole - offset), length)
        at = hole


def _has_seek_data(fd: int) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError:
        return False
    return True
