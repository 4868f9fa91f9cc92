"""What pyelftools read from a vmlinux's headers, kept for the next boot of the same file.

A boot's kernel-loading thread spent ~20 ms importing pyelftools (its construct library pulls in
pdb) to read headers it had read the boot before, while the rest of the VMM waited for the
kernel (docs/benchmarks.md, session 13). ``elf.parse``'s result (an ``ElfInfo``: entry, PVH
entry, loadable segments) is kept in the cache, named for the file's device and inode. It is
used only for the same file as stat(2) gives it for the open file (size, modification and
change times: a write of any kind moves the change time) whose ELF header, program headers and
notes (the PVH entry is in one) are still byte for byte those it was read from: both are taken
before the parse, so a write during it shows at the next boot. Anything else (no record, an
unreadable one, another identity, other bytes) is parsed again; a record that cannot be written
costs only that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from vmmarch_cli import files
from vmmarch_cli.loader.elf import ElfInfo, LoadSegment
from vmmarch_cli.loader.elf64 import PT_NOTE, Elf64Header, Elf64ProgramHeader

#: Bumped whenever ``ElfInfo`` or what ``elf.parse`` puts in it changes.
VERSION = 2
#: The bytes a record is checked against (headers and notes) are at most this many; a kernel's
#: are a few hundred. A file with more gets no record.
GUARDED_MAX = 64 << 10
#: A record is read only up to this size (one is ~1 KB); anything larger is not one.
RECORD_MAX = 256 << 10

#: What ``recall`` saw of the file before the parse, for ``keep``: the record's path, the file's
#: identity, and the hex of the bytes the record must match.
Seen = tuple[Path, str, str]


def _guarded(f: BinaryIO) -> bytes | None:
    """The ELF header, the program header table and the PT_NOTE segments' bytes, as the file
    holds them now; None past ``GUARDED_MAX``. The file is left at its start, for the parse."""
    try:
        return _read_guarded(f)
    finally:
        f.seek(0)


def _read_guarded(f: BinaryIO) -> bytes | None:
    f.seek(0)
    data = f.read(Elf64Header.sizeof())
    if len(data) == Elf64Header.sizeof():
        ehdr = Elf64Header.read(data)
        size = ehdr.e_phoff + ehdr.e_phnum * Elf64ProgramHeader.sizeof()
        if size > GUARDED_MAX:
            return None
        data += f.read(max(size - len(data), 0))  # on from the end of the ELF header
        for index in range(ehdr.e_phnum):
            at = ehdr.e_phoff + index * Elf64ProgramHeader.sizeof()
            if at + Elf64ProgramHeader.sizeof() > len(data):
                break
            phdr = Elf64ProgramHeader.read(data, at)
            if phdr.p_type == PT_NOTE:
                if len(data) + phdr.p_filesz > GUARDED_MAX:
                    return None
                f.seek(phdr.p_offset)
                data += f.read(phdr.p_filesz)
    return data


def _seen(f: BinaryIO) -> Seen | None:
    """What a record for the file open as ``f`` must match, or None where it can have none: a
    file in memory (io.UnsupportedOperation), too much to guard, no cache directory (no home:
    RuntimeError)."""
    try:
        st = os.fstat(f.fileno())
        guarded = _guarded(f)
        directory = files.cache_dir() / "elf-headers"
    except (OSError, RuntimeError):
        return None
    if guarded is None:
        return None
    identity = (f"v{VERSION} dev={st.st_dev} ino={st.st_ino} size={st.st_size} "
                f"mtime={st.st_mtime_ns} ctime={st.st_ctime_ns}")
    return directory / f"{st.st_dev:x}-{st.st_ino:x}.json", identity, guarded.hex()


def _ints(values: Any) -> bool:
    return isinstance(values, list) and all(type(v) is int for v in values)


def recall(f: BinaryIO) -> tuple[ElfInfo | None, Seen | None]:
    """The headers read from this very file before (or None), and what ``keep`` needs to save
    them after a parse."""
    seen = _seen(f)
    if seen is None:
        return None, None
    path, identity, guarded = seen
    try:
        with files.open_regular(path) as r:
            text = r.read(RECORD_MAX + 1)
        if len(text) > RECORD_MAX:
            return None, seen
        record = json.loads(text)
        if record["identity"] != identity or record["guarded"] != guarded:
            return None, seen
        segments, entry, pvh_entry = record["segments"], record["entry"], record["pvh_entry"]
        if not (type(entry) is int and (pvh_entry is None or type(pvh_entry) is int)
                and isinstance(segments, list) and all(_ints(s) for s in segments)):
            return None, seen
        return ElfInfo(entry=entry, segments=tuple(LoadSegment(*s) for s in segments),
                       pvh_entry=pvh_entry), seen
    except (OSError, files.NotRegularFile, ValueError, RecursionError, KeyError, TypeError):
        return None, seen


def keep(seen: Seen | None, info: ElfInfo) -> None:
    """Save ``info``, parsed from the file ``recall`` saw as ``seen``, for the next boot."""
    if seen is None:
        return
    path, identity, guarded = seen
    record = {"identity": identity, "guarded": guarded, "entry": info.entry,
              "pvh_entry": info.pvh_entry,
              "segments": [[s.paddr, s.vaddr, s.offset, s.filesz, s.memsz, s.flags]
                           for s in info.segments]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, json.dumps(record).encode())
    except OSError:
        pass  # a cache that cannot be written: the next boot parses again
