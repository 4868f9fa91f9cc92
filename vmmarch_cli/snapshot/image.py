"""Guest RAM in a snapshot file: a sparse image, restored copy-on-write.

The image is guest RAM region after region, at a page-aligned offset of the file. Zero pages
are not written: they stay holes, which take no disk space and read as zeros. A restore maps
the image MAP_PRIVATE over guest RAM (memory.py, ``map_private``), so that nothing is read
until the guest touches it, and any number of guests restored from one file share its page
cache until they write.

The image's CRC covers each page that is not all zeros, with its page number (so that it does
not depend on which zeros a file system keeps as holes, or whether ``cp`` kept them).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import zlib
from collections.abc import Iterator, Sequence
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
    crc = 0
    base_page = 0
    for address, length in source.regions:
        for first, count in nonzero_runs(address, length):
            data = (ctypes.c_char * (count * PAGE)).from_address(address + first * PAGE)
            view = memoryview(data).cast("B")
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:],
                                     offset + (base_page + first) * PAGE + written)
            for i in range(count):
                crc = _page_crc(crc, base_page + first + i, view[i * PAGE : (i + 1) * PAGE])
        base_page += length // PAGE
    return crc


def crc(fd: int, offset: int, length: int) -> int:
    """The CRC of the image at ``offset`` of ``fd``, reading only what is not a hole (where
    the file system can tell: SEEK_DATA). Raises OSError."""
    if not length:
        return 0
    result = 0
    # A private mapping is writable, so ctypes can take its address; nothing writes to it.
    with mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=offset) as view:
        anchor = ctypes.c_char.from_buffer(view)
        address = ctypes.addressof(anchor)
        del anchor  # no export may outlive the mapping's close
        pages = memoryview(view)
        try:
            for start, end in _data_extents(fd, offset, length):
                for first, count in nonzero_runs(address + start, end - start):
                    page = start // PAGE + first
                    for i in range(page, page + count):
                        result = _page_crc(result, i, pages[i * PAGE : (i + 1) * PAGE])
        finally:
            pages.release()
    return result


def _page_crc(crc: int, page: int, data: bytes | memoryview) -> int:
    return zlib.crc32(data, zlib.crc32(page.to_bytes(8, "little"), crc))


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
