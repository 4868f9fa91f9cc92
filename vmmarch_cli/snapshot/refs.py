"""Pages of a snapshot kept by reference to a file instead of in its memory image.

``vmm-arch run``'s guest holds its busybox binary in the page cache of its root file system,
page for page as the file has it: 1.9 MiB of the 61 MiB a booted guest has written. A snapshot
can leave such pages out of its image and name the file instead, with the page of the file each
one is and a CRC-32 of them; a restore checks that the file still holds them and maps its pages
over guest RAM copy-on-write, as it maps the image. Only a file vmm-arch keeps unchanged is
named (run's busybox, whose identity is part of the snapshot's cache key): a file cut short
while a guest runs on its pages takes them away (SIGBUS), as it would the image's.

In the description, ``memory_refs``: ``[{"file": path, "size": bytes, "crc": CRC-32 of the
pages, "runs": [[image page, page count, file page], ...]}, ...]``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmmarch_cli import files
from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.snapshot import image
from vmmarch_cli.snapshot.fileformat import SnapshotError
from vmmarch_cli.snapshot.image import PAGE, MemorySource, Run

MEMORY_REFS = "memory_refs"
#: Bytes of a page compared first, as a key: a page whose first bytes match no page of the
#: file is not compared further.
KEY = 64

_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int


@dataclass(frozen=True)
class FileRef:
    """Pages of the image that are pages of ``file``: (image page, count, file page) runs."""

    file: Path
    size: int
    crc: int
    runs: tuple[tuple[int, int, int], ...]

    def pages(self) -> Iterator[tuple[int, int]]:
        """(image page, file page) of every page kept by reference."""
        for first, count, file_page in self.runs:
            for i in range(count):
                yield first + i, file_page + i

    def as_json(self) -> dict[str, Any]:
        return {"file": str(self.file), "size": self.size, "crc": self.crc,
                "runs": [list(r) for r in self.runs]}


def find(source: MemorySource, image_runs: Sequence[Run], path: Path) -> FileRef | None:
    """The pages in ``image_runs`` of ``source`` that equal a page of the file at ``path``
    (its last page padded with zeros), or None when none does or the file cannot be read."""
    try:
        with files.open_regular(path) as f:
            data = f.read()
    except (OSError, files.NotRegularFile):
        return None
    padded = data.ljust(-(-len(data) // PAGE) * PAGE, b"\0")
    by_key: dict[bytes, list[int]] = {}
    for k in range(len(padded) // PAGE):
        key = padded[k * PAGE : k * PAGE + KEY]
        if any(key):
            by_key.setdefault(key, []).append(k)
    if not by_key:
        return None
    buffer = ctypes.create_string_buffer(padded, len(padded))
    base = ctypes.addressof(buffer)
    found: list[list[int]] = []
    crc = 0
    for page, address in _pages(source, image_runs):
        for k in by_key.get(ctypes.string_at(address, KEY), ()):
            if not _memcmp(address, base + k * PAGE, PAGE):
                if found and found[-1][0] + found[-1][1] == page and \
                        found[-1][2] + found[-1][1] == k:
                    found[-1][1] += 1
                else:
                    found.append([page, 1, k])
                crc = zlib.crc32(ctypes.string_at(address, PAGE), crc)
                break
    if not found:
        return None
    return FileRef(path.resolve(), len(data), crc, tuple((a, b, c) for a, b, c in found))


def without(image_runs: Sequence[Run], refs: Sequence[FileRef]) -> list[Run]:
    """``image_runs`` less the pages ``refs`` keep."""
    kept = {page for ref in refs for page, _ in ref.pages()}
    out: list[Run] = []
    for first, count in image_runs:
        for page in range(first, first + count):
            if page in kept:
                continue
            if out and out[-1][0] + out[-1][1] == page:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((page, 1))
    return out


def parse(description: Mapping[str, Any], name: str) -> list[FileRef]:
    """The description's references; SnapshotError (65) when they do not parse."""
    try:
        return [FileRef(Path(r["file"]), int(r["size"]), int(r["crc"]),
                        tuple((int(a), int(b), int(c)) for a, b, c in r["runs"]))
                for r in description.get(MEMORY_REFS, [])]
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{name}: its memory references do not parse: {e}") from None


def map_refs(refs: Sequence[FileRef], memory: MmapGuestMemory, name: str) -> None:
    """Map each reference's pages over guest RAM (after the image), once the file is found to
    hold them still. SnapshotError (65) when a file has changed."""
    for ref in refs:
        try:
            with files.open_regular(ref.file) as f:
                if os.fstat(f.fileno()).st_size != ref.size:
                    raise ValueError("its size changed")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                    crc = 0
                    for _, file_page in ref.pages():
                        # The last page of the file is short: the guest's page ends in zeros.
                        page = view[file_page * PAGE : (file_page + 1) * PAGE]
                        crc = zlib.crc32(page.ljust(PAGE, b"\0"), crc)
                if crc != ref.crc:
                    raise ValueError("the pages it kept changed")
                for first, count, file_page in ref.runs:
                    for address, skip, pages in image.pieces(memory.regions(), first, count):
                        memory.map_file(f.fileno(), (file_page + skip) * PAGE, address,
                                        pages * PAGE)
        except (OSError, files.NotRegularFile, ValueError) as e:
            raise SnapshotError(f"{name}: {ref.file}, whose pages it keeps, cannot be used: "
                                f"{e} (take the snapshot again)") from None


def _pages(source: MemorySource, image_runs: Sequence[Run]) -> Iterator[tuple[int, int]]:
    """(image page, host address) of every page in ``image_runs``."""
    for first, count in image_runs:
        for address, skip, pages in image.pieces(source.regions, first, count):
            for i in range(pages):
                yield first + skip + i, address + i * PAGE
