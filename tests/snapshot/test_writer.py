"""The child that writes a cache entry's snapshot after its run has ended (snapshot/writer.py):
the run does not wait for it, a run that looks for the entry meanwhile does, one writer per
entry, and a killed writer's temporary file is removed by the next."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmmarch_cli.snapshot import writer

#: How long each test's writer works: long enough to tell waiting from not waiting.
WORK = 1.0


def slow_write(path: Path, text: str = "written") -> None:
    time.sleep(WORK)
    path.write_text(text)


def test_the_caller_goes_on_and_a_reader_waits_for_the_file(tmp_path: Path) -> None:
    entry = tmp_path / "run-x.snap"
    started = time.monotonic()
    writing = writer.Writing.start(entry, lambda: slow_write(entry))
    assert writing is not None
    assert writing.poll() is None  # still at work: not an error
    assert time.monotonic() - started < WORK / 2 and not entry.exists()
    writer.wait_for_writer(entry)
    assert time.monotonic() - started >= WORK and entry.read_text() == "written"


def test_one_writer_per_entry(tmp_path: Path) -> None:
    entry = tmp_path / "run-x.snap"
    first = writer.Writing.start(entry, lambda: slow_write(entry, "first"))
    assert first is not None
    assert writer.Writing.start(entry, lambda: slow_write(entry, "second")) is None
    writer.wait_for_writer(entry)
    # Written by the first, so the entry is not taken again.
    assert writer.Writing.start(entry, lambda: slow_write(entry, "third")) is None
    assert entry.read_text() == "first"


def test_no_writer_no_wait(tmp_path: Path) -> None:
    started = time.monotonic()
    writer.wait_for_writer(tmp_path / "never.snap")
    assert time.monotonic() - started < 0.1


def test_a_failed_write_is_reported_and_releases_the_entry(tmp_path: Path) -> None:
    entry = tmp_path / "run-x.snap"

    def fail() -> None:
        raise OSError("disk full")

    writing = writer.Writing.start(entry, fail)
    assert writing is not None
    os.waitid(os.P_PID, writing.pid, os.WEXITED | os.WNOWAIT)  # ended; poll reaps it
    assert writing.poll() == "disk full"
    assert not entry.exists()
    assert writer.last_failure(entry) is None  # reported by its run: not again by the next
    again = writer.Writing.start(entry, lambda: entry.write_text("second try"))
    assert again is not None
    writer.wait_for_writer(entry)
    assert entry.read_text() == "second try"


def test_a_killed_writers_temporary_file_is_removed(tmp_path: Path) -> None:
    entry = tmp_path / "run-x.snap"
    stale = tmp_path / ".run-x.snap.k2j4l1"  # fileformat.write's name for its temporary file
    stale.write_bytes(b"half a snapshot")
    other = tmp_path / ".run-y.snap.abcdef"  # another entry's: not ours to remove
    other.write_bytes(b"")
    assert writer.Writing.start(entry, lambda: entry.write_text("whole")) is not None
    writer.wait_for_writer(entry)
    assert not stale.exists() and other.exists() and entry.read_text() == "whole"


def test_a_caller_reading_the_runs_output_does_not_wait_for_the_writer(tmp_path: Path) -> None:
    """The child leaves the run's stdout and stderr (pipes here, as in a CI script's $(...)),
    so the reader sees their end when the run ends."""
    entry = tmp_path / "run-x.snap"
    program = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from vmmarch_cli.snapshot import writer
        entry = Path({str(entry)!r})
        def write():
            time.sleep({WORK})
            print("from the writer", file=sys.stderr)
            entry.write_text("done")
        assert writer.Writing.start(entry, write) is not None
        print("run ended")
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=30)
    took = time.monotonic() - started
    assert (done.returncode, done.stdout, done.stderr) == (0, "run ended\n", "")
    assert took < WORK, took
    writer.wait_for_writer(entry)
    assert entry.read_text() == "done"


def test_a_write_that_fails_after_the_run_stopped_listening_ends_the_child(tmp_path: Path
                                                                           ) -> None:
    """The run polls once and closes its end of the error pipe; a write that fails later
    cannot report (EPIPE), and the child must still end there, not return or raise into the
    run's code: the ``finally`` around ``start`` runs once, in the run."""
    entry = tmp_path / "run-x.snap"
    after = tmp_path / "after-start"
    program = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from vmmarch_cli.snapshot import writer
        def write():
            time.sleep({WORK})
            raise OSError("disk full")
        try:
            writing = writer.Writing.start(Path({str(entry)!r}), write)
        finally:
            with open({str(after)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
        assert writing is not None and writing.poll() is None
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    writer.wait_for_writer(entry)
    assert len(after.read_text().splitlines()) == 1 and not entry.exists()
    # Its run was gone: the next run that takes the entry says why, once.
    assert writer.last_failure(entry) == "disk full"
    assert writer.last_failure(entry) is None


def test_a_write_that_succeeds_clears_an_earlier_failure(tmp_path: Path) -> None:
    entry = tmp_path / "run-x.snap"
    writer.failure_path(entry).write_text("disk full\n")
    assert writer.Writing.start(entry, lambda: entry.write_text("whole")) is not None
    writer.wait_for_writer(entry)
    assert entry.read_text() == "whole" and writer.last_failure(entry) is None


def test_an_entry_whose_lock_cannot_be_made_raises_and_holds_nothing(tmp_path: Path) -> None:
    """No folder for the lock (as a cache that cannot be written): OSError, which the run
    reports as a warning before it goes on (machine.run); no child, nothing left open."""
    entry = tmp_path / "missing" / "run-x.snap"
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        writer.Writing.start(entry, lambda: entry.write_text("never"))
    assert set(os.listdir("/proc/self/fd")) == before
