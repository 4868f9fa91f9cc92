"""One external harness for every process the benchmarks time, whichever VMM it is.

``measure`` spawns a command with its stdout and stderr on pipes, timestamps every chunk as it
arrives, and records the first line on either stream that matches each named regex. Times are
seconds since just before the process was spawned (``time.monotonic``). The process is killed
when a ``kill_on`` pattern matches (QEMU pauses forever after a KVM internal error) or at the
timeout; its peak RSS and CPU time come from ``os.wait4``.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Bytes of each stream kept for error reports (the tail).
TAIL_BYTES = 4096
#: A line longer than this is matched on its first MAX_LINE bytes only.
MAX_LINE = 8192


@dataclass
class ProcessRun:
    """What one spawned process did, as the harness saw it."""

    argv: list[str]
    milestones: dict[str, float] = field(default_factory=dict)
    first_byte: dict[str, float] = field(default_factory=dict)  # "stdout"/"stderr" -> s
    wall: float = 0.0
    returncode: int | None = None
    killed_by: str = ""  # "", the kill_on pattern name, or "timeout"
    maxrss_kib: int = 0
    cpu_seconds: float = 0.0
    tail: dict[str, bytes] = field(default_factory=dict)
    stdout: bytes = b""  # all of it, with measure(keep_stdout=True)

    def describe_tail(self, lines: int = 5) -> str:
        text = b"".join(self.tail.values()).decode(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])


class _Stream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.partial = bytearray()
        self.tail = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Complete lines in ``data`` (plus what was pending)."""
        self.tail += data
        del self.tail[:-TAIL_BYTES]
        self.partial += data
        *lines, rest = bytes(self.partial).split(b"\n")
        self.partial = bytearray(rest[:MAX_LINE])
        return lines

    def drain(self) -> list[bytes]:
        rest = bytes(self.partial)
        self.partial.clear()
        return [rest] if rest else []


def measure(
    argv: Sequence[str],
    milestones: Mapping[str, str],
    *,
    kill_on: Mapping[str, str] | None = None,
    stop_when_all: bool = False,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    stdin_data: bytes | None = None,
    keep_stdout: bool = False,
    log: Path | None = None,
) -> ProcessRun:
    """Run ``argv`` and time the first line matching each of ``milestones`` (name -> regex).

    ``kill_on`` (name -> regex): SIGKILL the process at the first matching line (the name lands
    in ``killed_by``; a pattern may also be a milestone). ``stop_when_all``: kill it once every
    milestone is seen. The process gets ``stdin_data`` (then EOF), or /dev/null.
    ``keep_stdout``: keep all of stdout in ``ProcessRun.stdout`` (for a JSON result).
    ``log``: also write everything both streams say to this file, as it arrives.
    """
    patterns = {name: re.compile(p.encode()) for name, p in milestones.items()}
    killers = {name: re.compile(p.encode()) for name, p in (kill_on or {}).items()}
    run = ProcessRun(argv=list(argv))
    start = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        start_new_session=True,  # so a kill takes any helper children with it
    )
    if stdin_data is not None and proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin_data)
            proc.stdin.flush()
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): _Stream("stdout"), proc.stderr.fileno(): _Stream("stderr")}
    sel = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)

    def kill(reason: str) -> None:
        if not run.killed_by:
            run.killed_by = reason
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def on_lines(lines: list[bytes], at: float) -> None:
        for line in lines:
            for name, pattern in patterns.items():
                if name not in run.milestones and pattern.search(line):
                    run.milestones[name] = at
            for name, pattern in killers.items():
                if pattern.search(line):
                    kill(name)
        if stop_when_all and len(run.milestones) == len(patterns):
            kill("all-milestones")

    kept: list[bytes] = []
    log_file = log.open("wb") if log is not None else None
    deadline = start + timeout
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kill("timeout")
                remaining = 5.0  # the pipes close once the process is gone
                deadline = time.monotonic() + remaining
            for key, _ in sel.select(min(remaining, 1.0)):
                fd = int(key.fd)
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                at = time.monotonic() - start
                stream = streams[fd]
                if not data:
                    sel.unregister(fd)
                    on_lines(stream.drain(), at)
                    continue
                run.first_byte.setdefault(stream.name, at)
                if keep_stdout and stream.name == "stdout":
                    kept.append(data)
                if log_file is not None:
                    log_file.write(data)
                    log_file.flush()
                on_lines(stream.feed(data), at)
    except BaseException:  # Ctrl-C or SIGTERM: never leave the VMM running on its own
        kill("interrupted")
        raise
    finally:
        if log_file is not None:
            log_file.close()
    sel.close()
    _, status, usage = os.wait4(proc.pid, 0)
    run.wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    run.returncode = proc.returncode
    run.maxrss_kib = int(usage.ru_maxrss)
    run.cpu_seconds = usage.ru_utime + usage.ru_stime
    run.tail = {s.name: bytes(s.tail) for s in streams.values()}
    run.stdout = b"".join(kept)
    for f in (proc.stdout, proc.stderr, proc.stdin):
        if f is not None:
            f.close()
    return run
