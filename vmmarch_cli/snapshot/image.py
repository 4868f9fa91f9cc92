"""Guest RAM in a snapshot file: a sparse image, restored copy-on-write.

The image is guest RAM region after region, at a page-aligned offset of the file. Zero pages
are not written: they stay holes, which take no disk space and read as zeros. A restore maps
the image MAP_PRIVATE over guest RAM (memory.py, ``map_private``), so that nothing is read
until the guest touches it, and any number of guests restored from one file share its page
cache until they write.

The image's CRC covers each run of pages that are not all zeros, with where it starts and its
length (so that it does not depend on which zeros a file system keeps as holes, or whether
``cp`` kept them). The snapshot's description lists the runs, so a restore sums them without
looking for zeros first; it only checks that nothing outside them holds data (where the file
system keeps the zeros as holes, nothing is read for that).
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


#: (first page, page count) of a run of pages of the image that are not all zeros.
Run = tuple[int, int]


def runs(source: MemorySource) -> list[Run]:
    """The runs of non-zero pages of ``source``, in image pages, adjacent runs as one."""
    found: list[Run] = []
    base_page = 0
    for address, length in source.regions:
        found += [(base_page + first, count) for first, count in nonzero_runs(address, length)]
        base_page += length // PAGE
    return _merged(found)


def write(fd: int, offset: int, source: MemorySource, image_runs: Sequence[Run]) -> int:
    """Write ``source``'s ``image_runs`` (``runs``) as a sparse image at ``offset``
    (page-aligned) of ``fd``; return its CRC, of what was written, from guest RAM. Raises
    OSError."""
    os.ftruncate(fd, offset + source.length)
    for first, count in image_runs:
        at = offset + first * PAGE
        for piece in _source_pages(source, first, count):  # a piece per region it spans
            written = 0
            while written < len(piece):
                written += os.pwrite(fd, piece[written:], at + written)
            at += len(piece)
    return _runs_crc(list(image_runs), lambda first, count: _source_pages(source, first, count))


def crc(fd: int, offset: int, length: int, image_runs: Sequence[Run]) -> int | None:
    """The CRC of the image at ``offset`` of ``fd`` over ``image_runs``, as the snapshot's
    description lists them; None when a page outside them is not all zeros (a damaged or
    rewritten image). Only the runs and what the file system keeps as data outside them
    (SEEK_DATA: nothing, where it keeps holes) are read. Raises OSError, and ValueError for
    runs that do not fit the image. zlib releases the GIL while it sums, so this can run beside
    other work (machine.py runs it beside the backend's setup)."""
    pages = length // PAGE
    at = 0
    for first, count in image_runs:
        if first < at or count <= 0 or first + count > pages:
            raise ValueError("its memory runs do not fit the image")
        at = first + count
    if not length:
        return 0
    # A private mapping is writable, so ctypes can take its address; nothing writes to it.
    with mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=offset) as view:
        anchor = ctypes.c_char.from_buffer(view)
        address = ctypes.addressof(anchor)
        del anchor  # no export may outlive the mapping's close
        for start, end in _outside(_data_extents(fd, offset, length), image_runs):
            if next(nonzero_runs(address + start, end - start), None) is not None:
                return None
        with memoryview(view) as image:
            return _runs_crc(list(image_runs), lambda first, count: [
                image[first * PAGE : (first + count) * PAGE]])


def _outside(extents: Iterable[tuple[int, int]], image_runs: Sequence[Run]
             ) -> Iterator[tuple[int, int]]:
    """The parts of the data ``extents`` ([start, end) in bytes) that no run covers."""
    covered = [(first * PAGE, (first + count) * PAGE) for first, count in image_runs]
    for start, end in extents:
        at = start
        for run_start, run_end in covered:
            if run_end <= at or run_start >= end:
                continue
            if run_start > at:
                yield at, run_start
            at = max(at, run_end)
        if at < end:
            yield at, end


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


def pieces(regions: Sequence[tuple[int, int]], first: int, count: int
           ) -> Iterator[tuple[int, int, int]]:
    """Where pages ``first`` .. ``first + count`` of the image are, given the (address, length)
    of each region it lays one after another (host addresses of guest RAM, or guest-physical
    ones): (address, pages into the run, page count), a piece per region the run spans.
    ValueError when the run goes past the last region."""
    base = 0
    for address, length in regions:
        pages = length // PAGE
        start, end = max(first, base), min(first + count, base + pages)
        if start < end:
            yield address + (start - base) * PAGE, start - first, end - start
        base += pages
    if first + count > base:
        raise ValueError(f"image pages up to {first + count} are past its {base} pages")


def _source_pages(source: MemorySource, first: int, count: int) -> Iterator[memoryview]:
    """Pages ``first`` .. ``first + count`` of the image as ``source``'s regions hold them:
    the CRC of what was written, from guest RAM, not read back from the file."""
    for address, _, pages in pieces(source.regions, first, count):
        yield memoryview((ctypes.c_char * (pages * PAGE)).from_address(address)).cast("B")


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
