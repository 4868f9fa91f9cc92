"""Writing files the user asked for (or the cache holds) so that a failure leaves nothing behind.

A disk that fills up half-way, a read-only directory or a vanished parent must end in one line
that says what to do, not in a traceback or a truncated file that looks complete.
"""

from __future__ import annotations

import errno
import os
import tempfile
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
