"""The guest console as the host sees it: streamed out as it arrives, watched line by line.

Nothing accumulates without bound: a guest that floods the console costs a fixed-size tail of
recent lines, whatever it prints.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

from vmmarch_cli.stop import StopReason

#: Lines Linux prints on its way down (kernel/panic.c, kernel/reboot.c "reboot: " pr_fmt).
PANIC_LINE = re.compile(rb"Kernel panic - not syncing")
POWER_DOWN_LINE = re.compile(rb"reboot: Power down")
#: Boot milestones timed for the summary and the benchmarks (first line that matches each).
MILESTONES = {
    "linux_banner": re.compile(rb"Linux version "),
    "memory_line": re.compile(rb"Memory: "),
    "fpu_line": re.compile(rb"x86/fpu: "),
    "run_init": re.compile(rb"Run /init"),
}
TAIL_LINES = 40
MAX_LINE = 4096  # a line longer than this is cut (still streamed in full)


class Console:
    def __init__(
        self,
        sink: BinaryIO | None,
        on_event: Callable[[StopReason, str], None],
        expect: tuple[str, ...] = (),
        log: BinaryIO | None = None,
    ) -> None:
        self._sink = sink
        self._log = log
        self._on_event = on_event
        self._line = bytearray()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.bytes_seen = 0
        self.first_byte_at: float | None = None
        #: What the host could not do with the output (each said once, in the result).
        self.warnings: list[str] = []
        self.milestones: dict[str, float] = {}
        self._expect = [re.compile(p.encode()) for p in expect]
        self._expect_index = 0

    def write(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        self.bytes_seen += len(data)
        if self._sink is not None:
            try:
                self._sink.write(data)
                self._sink.flush()
            except OSError as exc:  # the reader went away (EPIPE): the guest goes on
                self._sink = None
                self.warnings.append(f"console output stopped: {exc.strerror}")
        if self._log is not None:
            try:
                self._log.write(data)
            except OSError as exc:  # disk full: keep the guest running, say what was lost
                self._log_failed(exc)
        for byte in data:
            if byte == 0x0A:
                self._end_line()
            elif len(self._line) < MAX_LINE:
                self._line.append(byte)

    def flush(self) -> None:
        """At the end of a run: the last partial line, and the log's buffered bytes."""
        if self._line:
            self._end_line()
        if self._log is not None:
            try:
                self._log.flush()
            except OSError as exc:
                self._log_failed(exc)

    def _log_failed(self, exc: OSError) -> None:
        self._log = None
        self.warnings.append(f"console log incomplete: {exc.strerror} "
                             f"({self.bytes_seen} bytes of console output)")

    def _end_line(self) -> None:
        line = bytes(self._line).rstrip(b"\r")
        self._line.clear()
        self.tail.append(line.decode(errors="replace"))
        if len(self.milestones) < len(MILESTONES):
            for name, pattern in MILESTONES.items():
                if name not in self.milestones and pattern.search(line):
                    self.milestones[name] = time.monotonic()
        if PANIC_LINE.search(line):
            self._on_event(StopReason.PANIC, line.decode(errors="replace"))
        elif POWER_DOWN_LINE.search(line):
            self._on_event(StopReason.POWEROFF, "")
        if self._expect_index < len(self._expect) and self._expect[self._expect_index].search(
            line
        ):
            self._expect_index += 1
            if self._expect_index == len(self._expect):
                self._on_event(StopReason.EXPECT, line.decode(errors="replace"))
