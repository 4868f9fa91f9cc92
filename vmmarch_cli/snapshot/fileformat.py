"""The snapshot file: a header record, a description, state sections and guest memory.

Layout (all offsets from the start of the file, little-endian):

    Header        fixed size (``Header``), with a CRC-32 of its own fields
    description   JSON: who made the snapshot (backend, engine, CPU fingerprint), the machine
                  configuration it needs, and where each state section lies
    sections      named byte strings: each vCPU's state, each device's state
    memory        guest RAM, region after region, at a page-aligned offset: a sparse file
                  whose zero pages are holes, so that the file takes only what the guest wrote
                  and a restore maps it copy-on-write (image.py)

``state_crc`` covers the description and the sections, ``memory_crc`` the memory image's runs
of pages that are not all zeros, in order (image.py). A reader refuses, in one line (exit 65):
a short or foreign file, another format version, a CRC mismatch, and a description that does
not parse. Whether the snapshot suits this machine (backend, engine, configuration) is for the
caller to compare.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any

from vmmarch_cli import files
from vmmarch_cli.arch.x86_64.record import Record
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.snapshot import image

MAGIC = b"VMMARCH\x1a"  # \x1a: a text reader stops at once (as PNG's signature does)
#: The description's list of the memory image's runs of non-zero pages, [[first, count], ...]
#: in pages (image.py), which its CRC covers.
MEMORY_RUNS = "memory_runs"
VERSION = 3  # 2: the memory CRC sums runs of pages, not pages; 3: the description lists them


class SnapshotError(BadInputError):
    """A snapshot file vmm-arch cannot use; the message names the file and why (exit 65)."""


class Header(Record):
    _fields_ = (
        ("magic", ctypes.c_char * 8),
        ("version", ctypes.c_uint32),
        ("header_crc", ctypes.c_uint32),  # CRC-32 of this header with this field zero
        ("description_offset", ctypes.c_uint64),
        ("description_length", ctypes.c_uint64),
        ("state_length", ctypes.c_uint64),  # description and sections
        ("state_crc", ctypes.c_uint32),
        ("memory_crc", ctypes.c_uint32),
        ("memory_offset", ctypes.c_uint64),  # page-aligned
        ("memory_length", ctypes.c_uint64),  # guest RAM bytes, holes included
    )


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot holds. ``description`` is plain JSON data; ``sections`` the state blobs
    by name; ``memory_offset`` and ``memory_length`` locate guest RAM in ``path``."""

    path: Path
    description: Mapping[str, Any]
    sections: Mapping[str, bytes]
    memory_offset: int
    memory_length: int
    memory_crc: int
    memory_runs: tuple[image.Run, ...] = ()


def temporary_prefix(path: Path) -> str:
    """How ``write``'s temporary files for ``path`` are named (beside it, hidden): the prefix of
    each, which a random tail completes."""
    return f".{path.name}."


def write(path: Path, description: Mapping[str, Any], sections: Mapping[str, bytes],
          memory: image.MemorySource, sync: bool = True,
          memory_runs: Sequence[image.Run] | None = None) -> None:
    """Write a snapshot to ``path`` atomically: into a temporary file beside it, synced, then
    renamed into place, so that a crash leaves either the old file or none, never a file that
    looks complete. Without ``sync`` a crash may leave a renamed file whose data never reached
    the disk, which its CRCs refuse (for a cache entry, taken again). ``memory_runs``: the runs
    of the image to write (default: every run of non-zero pages; refs.py leaves some out).
    Raises OSError."""
    table = []
    blobs = bytearray()
    for name, data in sections.items():
        table.append({"name": name, "length": len(data)})
        blobs += data
    memory_runs = image.runs(memory) if memory_runs is None else list(memory_runs)
    text = json.dumps({**description, "sections": table, MEMORY_RUNS: memory_runs},
                      sort_keys=True).encode()
    state = text + bytes(blobs)
    start = Header.sizeof()
    memory_offset = image.page_align(start + len(state))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path))
    try:
        os.fchmod(fd, 0o644)
        os.pwrite(fd, state, start)
        memory_crc = image.write(fd, memory_offset, memory, memory_runs)
        header = Header(magic=MAGIC, version=VERSION, description_offset=start,
                        description_length=len(text), state_length=len(state),
                        state_crc=zlib.crc32(state), memory_crc=memory_crc,
                        memory_offset=memory_offset, memory_length=memory.length)
        header.header_crc = zlib.crc32(header.pack())
        os.pwrite(fd, header.pack(), 0)
        if sync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path) -> Snapshot:
    """Read and check ``path``'s header, description and sections, and its memory image's CRC.
    Raises SnapshotError (one line) for anything but a snapshot this version wrote intact."""
    with open_file(path) as f:
        snapshot = read_from(f, path)
        check_memory(snapshot, f)
        return snapshot


def describe(path: Path) -> Snapshot:
    """``read`` without the memory image's CRC (``check_memory``): what the snapshot says of
    itself, checked."""
    with open_file(path) as f:
        return read_from(f, path)


def is_snapshot(path: Path) -> bool:
    """Whether ``path`` is a regular file that starts as a snapshot does (its magic)."""
    try:
        with files.open_regular(path) as f:
            return f.read(len(MAGIC)) == MAGIC
    except (OSError, files.NotRegularFile):
        return False


def open_file(path: Path) -> BufferedReader:
    """``path`` opened for reading if it is a regular file; SnapshotError (one line) if not. A
    restore reads everything through this one opening: a snapshot renamed into place meanwhile
    (two first runs at once) cannot give it one file's state and another's memory."""
    try:
        return files.open_regular(path)
    except OSError as e:
        raise SnapshotError(f"cannot read snapshot {path}: {e.strerror}") from None
    except files.NotRegularFile as e:
        raise SnapshotError(f"snapshot {path} {e}") from None


def read_from(f: BufferedReader, path: Path) -> Snapshot:
    """The header, description and sections of the snapshot open as ``f`` (named ``path``)."""
    name = str(path)
    try:
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        raw = f.read(Header.sizeof())
        header = _header(raw, name)
        if header.memory_offset + header.memory_length > size or \
                header.description_offset + header.state_length > header.memory_offset:
            raise SnapshotError(f"{name}: truncated snapshot ({size} bytes)")
        f.seek(header.description_offset)
        state = f.read(header.state_length)
    except OSError as e:
        raise SnapshotError(f"cannot read snapshot {name}: {e.strerror}") from None
    if len(state) != header.state_length or zlib.crc32(state) != header.state_crc:
        raise SnapshotError(f"{name}: corrupted snapshot (its state fails the CRC)")
    return _parse(path, header, state)


def check_memory(snapshot: Snapshot, f: BufferedReader) -> None:
    """The memory image's CRC, which ``read_from`` leaves out. Raises SnapshotError."""
    try:
        got = image.crc(f.fileno(), snapshot.memory_offset, snapshot.memory_length,
                        snapshot.memory_runs)
    except (OSError, ValueError) as e:
        raise SnapshotError(f"cannot read snapshot {snapshot.path}: {e}") from None
    if got != snapshot.memory_crc:
        raise SnapshotError(f"{snapshot.path}: corrupted snapshot (its memory fails the CRC)")


def _header(raw: bytes, name: str) -> Header:
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{name}: not a vmm-arch snapshot")
    if len(raw) < Header.sizeof():
        raise SnapshotError(f"{name}: truncated snapshot ({len(raw)} bytes)")
    header = Header.read(raw)
    if header.version != VERSION:
        raise SnapshotError(f"{name}: snapshot format version {header.version}; this vmm-arch "
                            f"reads version {VERSION} (take the snapshot again)")
    check = Header.read(raw)
    check.header_crc = 0
    if zlib.crc32(check.pack()) != header.header_crc:
        raise SnapshotError(f"{name}: corrupted snapshot (its header fails the CRC)")
    return header


def _parse(path: Path, header: Header, state: bytes) -> Snapshot:
    name = str(path)
    text = state[: header.description_length]
    try:
        description = json.loads(text)
        memory_runs = tuple((int(first), int(count))
                            for first, count in description.pop(MEMORY_RUNS))
        sections: dict[str, bytes] = {}
        at = header.description_length
        for entry in description.pop("sections"):
            length = int(entry["length"])
            if length < 0 or at + length > len(state):
                raise ValueError("a section runs past the state")
            sections[str(entry["name"])] = state[at : at + length]
            at += length
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # Only a writer's bug gets here: the CRC matched what was written.
        raise SnapshotError(f"{name}: unreadable snapshot description ({e})") from None
    return Snapshot(path, description, sections, header.memory_offset, header.memory_length,
                    header.memory_crc, memory_runs)
