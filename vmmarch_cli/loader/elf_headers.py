"""What pyelftools read from a vmlinux's headers, kept for the next boot of the same file.

A boot's kernel-loading thread spent ~20 ms importing pyelftools (its construct library pulls in
pdb) to read headers it had read the boot before, while the rest of the VMM waited for the
kernel (docs/benchmarks.md, session 13). ``elf.parse``'s result (an ``ElfInfo``: entry, PVH
entry, loadable segments) is kept in the cache, named for the file's device and inode. It is
used only for the same file as stat(2) gives it for the open file (size, modification and
change times: a write of any kind moves the change time) whose ELF and program headers are
still byte for byte those it was read from. Anything else (no record, an unreadable one, another
identity, other headers) is parsed again; a record that cannot be written costs only that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from vmmarch_cli import files
from vmmarch_cli.loader.elf import ElfInfo, LoadSegment
from vmmarch_cli.loader.elf64 import Elf64Header, Elf64ProgramHeader

#: Bumped whenever ``ElfInfo`` or what ``elf.parse`` puts in it changes.
VERSION = 1
#: Headers are compared up to this many bytes (a kernel's are a few hundred): a file whose
#: header claims more is read no further, and matches no record.
HEADERS_MAX = 64 << 10


def _record_path(f: BinaryIO) -> tuple[Path, str]:
    """Where the record for the file open as ``f`` is, and the identity it must state.
    Raises OSError (io.UnsupportedOperation for a file in memory)."""
    st = os.fstat(f.fileno())
    identity = (f"v{VERSION} dev={st.st_dev} ino={st.st_ino} size={st.st_size} "
                f"mtime={st.st_mtime_ns} ctime={st.st_ctime_ns}")
    return files.cache_dir() / "elf-headers" / f"{st.st_dev:x}-{st.st_ino:x}.json", identity


def _headers(f: BinaryIO) -> bytes:
    """The ELF header and the program header table, as the file holds them now."""
    f.seek(0)
    head = f.read(Elf64Header.sizeof())
    end = Elf64Header.sizeof()
    if len(head) == end:
        ehdr = Elf64Header.read(head)
        end = ehdr.e_phoff + ehdr.e_phnum * Elf64ProgramHeader.sizeof()
    f.seek(0)
    data = f.read(min(end, HEADERS_MAX))
    f.seek(0)
    return data


def _ints(values: Any) -> bool:
    return isinstance(values, list) and all(type(v) is int for v in values)


def recall(f: BinaryIO) -> ElfInfo | None:
    """The headers read from this very file before, or None."""
    try:
        path, identity = _record_path(f)
        record = json.loads(path.read_text())
        if record["identity"] != identity or record["headers"] != _headers(f).hex():
            return None
        segments = record["segments"]
        pvh_entry = record["pvh_entry"]
        if not (type(record["entry"]) is int and (pvh_entry is None or type(pvh_entry) is int)
                and isinstance(segments, list) and all(_ints(s) for s in segments)):
            return None
        return ElfInfo(entry=record["entry"],
                       segments=tuple(LoadSegment(*s) for s in segments),
                       pvh_entry=pvh_entry)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep(f: BinaryIO, info: ElfInfo) -> None:
    """Save ``info``, just read from the file open as ``f``, for the next ``recall``."""
    try:
        path, identity = _record_path(f)
        record = {"identity": identity, "headers": _headers(f).hex(), "entry": info.entry,
                  "pvh_entry": info.pvh_entry,
                  "segments": [[s.paddr, s.vaddr, s.offset, s.filesz, s.memsz, s.flags]
                               for s in info.segments]}
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, json.dumps(record).encode())
    except OSError:  # io.UnsupportedOperation too: a vmlinux in memory has no identity
        pass  # a cache that cannot be written: the next boot parses again
