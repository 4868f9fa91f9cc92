"""A cache entry's snapshot written by a child process that outlives the run that took it.

The first ``vmm-arch run`` saves the booted guest and goes on with its job in the same VM. The
file (~90 ms for a 61 MiB image: scan, write, sum) is written by a forked child, which holds
guest RAM as it was at the fork (a private mapping: the guest runs on meanwhile). The run does
not wait for it: it ends when its job does, and the child finishes the entry on its own.

Each entry has a lock file beside it, held (``flock``, exclusive) from before the fork until
the child has renamed the file into place or given up. So:

* a run that finds no entry waits for a writer that holds the lock (``wait_for_writer``), which
  is far shorter than the boot it would do instead;
* of runs that took the same entry at once, one writes it (``Writing.start``);
* temporary files left by a writer that was killed are removed by the next one, which holds
  the lock and so knows no other writer is at work.

The lock is released by the kernel when the child ends, however it ends. Lock files stay: one
that is removed while a process waits on it would let two writers in.

A write that fails after its run has ended cannot be reported by that run: the child leaves
what went wrong beside the entry (``failure_path``), and the next run that takes the entry
says it (``last_failure``), so that a cache that never fills does not go unnoticed.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
from collections.abc import Callable
from pathlib import Path

from vmmarch_cli.snapshot.fileformat import temporary_prefix


def lock_path(path: Path) -> Path:
    """The lock file of the entry at ``path``; not a dot file: those are fileformat.write's
    temporary files, which the next writer may remove."""
    return path.with_suffix(".lock")


def failure_path(path: Path) -> Path:
    """Where the writer of the entry at ``path`` leaves what went wrong (not a dot file)."""
    return path.with_suffix(".failed")


def last_failure(path: Path) -> str | None:
    """What went wrong when the entry at ``path`` was last written, once (the note is
    removed); None when nothing did."""
    note = failure_path(path)
    try:
        text = note.read_text(errors="replace").strip()
        note.unlink()
    except OSError:
        return None
    return text or "the writer gave no reason"


def wait_for_writer(path: Path) -> None:
    """Return once no process is writing the entry at ``path`` (at once where the lock cannot
    be read or taken: the caller then boots, as without an entry)."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no writer ever took this entry
    try:
        with contextlib.suppress(OSError):  # a file system without flock
            fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _claim(path: Path) -> int | None:
    """The entry's lock, held; None when another process is writing it. Raises OSError when
    it cannot be taken at all (the cache cannot be written, no flock there)."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def _remove_stale_temporaries(path: Path) -> None:
    """fileformat.write's temporary files for ``path`` that a killed writer left."""
    for stale in path.parent.glob(glob.escape(temporary_prefix(path)) + "*"):
        stale.unlink(missing_ok=True)


def _detach_from_caller(keep: set[int]) -> None:
    """Leave the caller's terminal session and streams: a Ctrl-C or hang-up meant for the run
    does not cut the file short, and a caller reading the run's output to its end does not wait
    for this child. Every descriptor but ``keep`` becomes /dev/null rather than being closed,
    so that an object inherited from the parent that closes its descriptor later cannot close a
    number this child has since reused."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    # (The listing includes its own descriptor, closed by then: it becomes /dev/null too.)
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd not in keep and fd != null:
            os.dup2(null, fd, inheritable=fd <= 2)
    os.close(null)


#: Children a ``poll`` left at work; a long-lived caller (the library, the tests) reaps them at
#: its next ``Writing.start``, so that they do not stay zombies. The CLI just exits.
_unreaped: list[int] = []


def _reap() -> None:
    for pid in list(_unreaped):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                continue
        except ChildProcessError:
            pass  # reaped elsewhere (a caller's own waitpid(-1), SIGCHLD ignored)
        _unreaped.remove(pid)


class Writing:
    """The child that writes one entry; ``poll`` reports on it without waiting."""

    @classmethod
    def start(cls, path: Path, write: Callable[[], object]) -> Writing | None:
        """Fork a child that runs ``write`` (which makes ``path``); None when another process
        is already writing that entry or has just written it. Raises OSError when the entry's
        lock cannot be taken or the child cannot be made (nothing is left held)."""
        _reap()
        lock = _claim(path)
        if lock is None:
            return None
        if path.is_file():  # written by another run between our look and our claim
            os.close(lock)
            return None
        try:
            reader, writer = os.pipe()
        except BaseException:
            os.close(lock)
            raise
        try:
            pid = os.fork()
        except BaseException:  # ENOMEM (a large guest under strict overcommit), EAGAIN
            for fd in (reader, writer, lock):
                os.close(fd)
            raise
        if pid == 0:  # the child: only the forking thread lives on in it
            status = 1
            try:
                os.close(reader)
                _detach_from_caller(keep={writer, lock})
                _remove_stale_temporaries(path)
                write()
                status = 0
                with contextlib.suppress(OSError):  # an earlier writer's note, now stale
                    failure_path(path).unlink(missing_ok=True)
            except BaseException as e:  # whatever it is goes back to the parent, if it listens
                report = str(e) or type(e).__name__
                with contextlib.suppress(OSError):  # it may have stopped (poll): EPIPE
                    os.write(writer, report.encode(errors="replace")[:4096])
                with contextlib.suppress(OSError):  # for the next run (last_failure)
                    failure_path(path).write_text(report[:4096] + "\n")
            finally:
                os._exit(status)  # never returns into the caller's code; releases the lock
        os.close(writer)
        os.close(lock)  # the child's copy holds it
        return cls(path, pid, reader)

    def __init__(self, path: Path, pid: int, errors: int) -> None:
        self.pid = pid  #: the child's
        self._path, self._errors = path, errors

    def poll(self) -> str | None:
        """What went wrong, if the child has ended with an error; None if it succeeded or is
        still at work (it finishes on its own; a later run waits for it)."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: whatever it said is in last_failure
            os.close(self._errors)
            return None
        if pid == 0:
            _unreaped.append(self.pid)
            os.close(self._errors)  # its report, if any, goes nowhere
            return None
        chunks = []
        while chunk := os.read(self._errors, 4096):
            chunks.append(chunk)
        os.close(self._errors)
        if status == 0:
            return None
        with contextlib.suppress(OSError):  # reported here: not again by the next run
            failure_path(self._path).unlink(missing_ok=True)
        return b"".join(chunks).decode(errors="replace") or f"wait status {status}"
