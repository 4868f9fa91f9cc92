"""Files the user names: read only when they are regular files, and written (or cached) so that a
failure leaves nothing behind.

A disk that fills up half-way, a read-only directory or a vanished parent must end in one line
that says what to do, not in a traceback or a truncated file that looks complete.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from io import BufferedReader
from pathlib import Path

from vmmarch_cli.errors import BadInputError


def cache_dir() -> Path:
    """$VMMARCH_CACHE, else $XDG_CACHE_HOME/vmm-arch, else ~/.cache/vmm-arch.

    Empty variables count as unset, as the XDG Base Directory spec asks.
    """
    explicit = os.environ.get("VMMARCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vmm-arch"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    Raises OSError; on any failure the temporary file is removed and ``path`` is untouched.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            # mkstemp creates 0600; what we write is meant to be readable like any download.
            os.fchmod(out.fileno(), 0o644)
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def advice(exc: OSError) -> str:
    """What a user can do about a failed write."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space or choose a path on a bigger file system"
    return "choose a writable path"


def output_error(path: Path, exc: OSError) -> BadInputError:
    """A file the user named could not be written (exit 65: the path is their input)."""
    return BadInputError(f"cannot write {path}: {exc.strerror}; {advice(exc)}")


def open_regular(path: Path) -> BufferedReader:
    """Open ``path`` for reading if it is a regular file (after symlinks). Raises OSError, or
    ``NotRegularFile`` naming what it is: a FIFO would block the open (or the read) until a
    writer came, and a device such as /dev/zero reports size 0 yet never ends. The open itself
    does not block (O_NONBLOCK), and the check is made on what was opened (fstat)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a file")
            raise NotRegularFile(f"is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class NotRegularFile(Exception):
    """``open_regular`` found a directory, FIFO, device or socket; the text says which."""
