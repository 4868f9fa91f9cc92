"""Debian's stock kernel saved on the emulate backend once it has freed its init memory, and
resumed in new processes: init runs, prints its facts and the marker, and exits through the port;
the kernel's clock did not count the time the guest was saved. The snapshot of the 256 MiB guest
takes what it wrote, not its size, on disk (issue 18: <= 60 MiB). And ``vmm-arch run``, which
takes its own snapshot once and restores it for every command after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmmarch_cli.snapshot.writer import failure_path, wait_for_writer

from conftest import ROOT, run_cli
from stockboots import init_facts

pytestmark = [pytest.mark.stock]

MARKER = "VMM-INIT-REACHED"
#: The kernel's line just before it runs init: late enough that the kernel is done, early
#: enough that init has not started.
SNAPSHOT_AT = "Freeing unused kernel image"
GAP_SECONDS = 3.0
ENGINE = {"VMMARCH_ENGINE": "engine", "LIBUNICORN_PATH": ""}


@pytest.fixture(scope="module")
def saved(stock: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stocksnap") / "debian.snap"
    done = run_cli("boot", str(stock["vmlinux"]), "--initrd", str(stock["initramfs"]),
                   "--backend", "emulate", "--expect", SNAPSHOT_AT, "--snapshot", str(path),
                   "--timeout", "300", timeout=400, env=ENGINE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert MARKER not in done.stdout
    return path


def test_the_saved_kernel_runs_init_to_the_marker(saved: Path) -> None:
    time.sleep(max(0.0, GAP_SECONDS - (time.time() - saved.stat().st_mtime)))
    done = run_cli("resume", str(saved), "--timeout", "300", timeout=400, env=ENGINE)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Run /init as init process" in done.stdout and MARKER in done.stdout
    facts = init_facts(done.stdout)
    # The kernel had run well under a second when it was saved; seconds later it must still
    # think so (its clock is the TSC, which goes on from where it was).
    assert float(facts["uptime"]) < GAP_SECONDS, facts


def test_twice_from_one_snapshot(saved: Path) -> None:
    for _ in range(2):
        done = run_cli("resume", str(saved), "--timeout", "300", timeout=400, env=ENGINE)
        assert done.returncode == 0 and MARKER in done.stdout, done.stderr[-2000:]


def test_the_snapshot_takes_what_the_guest_wrote(saved: Path) -> None:
    st = os.stat(saved)
    assert st.st_size > 256 << 20  # guest RAM is all there, as holes where it is zero
    assert st.st_blocks * 512 <= 60 << 20, st.st_blocks * 512 >> 20


# --- vmm-arch run from its snapshot ------------------------------------------------------------

JOB = ("echo to-stdout; echo to-stderr >&2; cat /root/data.txt; date +%s; "
       "cat /proc/uptime; sleep 1; cat /proc/uptime; exit 7")


def run_job(stock: dict[str, Path], data: Path, *extra: str) -> tuple[int, dict, str]:
    done = run_cli("run", "--backend", "emulate", "--timeout", "300", "--json", *extra,
                   "--add", f"{data}:/root/data.txt", str(stock["vmlinux"]), "--", "sh", "-c",
                   JOB, timeout=400, env=ENGINE)
    return done.returncode, json.loads(done.stdout), done.stderr


def check_job(status: int, doc: dict, data: str) -> None:
    assert status == 7, doc
    lines = doc["stdout"].splitlines()
    assert lines[:2] == ["to-stdout", data], doc["stdout"]
    assert doc["stderr"] == "to-stderr\n"
    # The guest's clock was set from the host's when the job came (a restored guest's clock
    # would otherwise be the snapshot's).
    assert abs(int(lines[2]) - time.time()) < 60, lines
    before, after = (float(line.split()[0]) for line in lines[3:5])
    assert after >= before + 0.9, lines  # its clock runs: a second slept is a second


def test_run_takes_its_snapshot_once_then_restores_it(stock: dict[str, Path],
                                                      tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("added-file\n")
    status, doc, _ = run_job(stock, data)
    snapshot = Path(doc["snapshot"]["path"])
    snapshot.unlink()  # from an earlier run of the tests: take it again
    status, doc, _ = run_job(stock, data)
    check_job(status, doc, "added-file")
    assert doc["snapshot"] == {"path": str(snapshot), "taken": True}
    # The next run, started at once, waits for the file's writer (it outlived its run:
    # snapshot/writer.py) rather than booting again.
    data.write_text("changed-file\n")  # the job, not the snapshot, carries the files
    status, doc, _ = run_job(stock, data)
    check_job(status, doc, "changed-file")
    assert doc["snapshot"] == {"path": str(snapshot), "taken": False}
    # Sparse: what the guest wrote (59 MiB here: issue 18 asks 60; busybox's pages are kept
    # by reference to the file; docs/snapshots.md), not its 256 MiB.
    assert snapshot.stat().st_blocks * 512 <= 60 << 20


def test_run_takes_a_damaged_snapshot_again(stock: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("x\n")
    _, doc, _ = run_job(stock, data)
    snapshot = Path(doc["snapshot"]["path"])
    wait_for_writer(snapshot)
    with open(snapshot, "r+b") as f:
        f.truncate(4096)
    status, doc, _ = run_job(stock, data)
    check_job(status, doc, "x")
    assert doc["snapshot"]["taken"] is True


def test_run_says_once_that_an_earlier_snapshot_was_not_saved(stock: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """A writer that failed after its run had ended left why beside the entry (writer.py);
    the run that takes the entry again says it in one line, once."""
    data = tmp_path / "data.txt"
    data.write_text("y\n")
    _, doc, _ = run_job(stock, data)
    snapshot = Path(doc["snapshot"]["path"])
    wait_for_writer(snapshot)
    snapshot.unlink()
    failure_path(snapshot).write_text("no room on the device\n")
    status, doc, stderr = run_job(stock, data)
    check_job(status, doc, "y")
    assert doc["snapshot"]["taken"] is True
    assert stderr.count("vmm-arch: warning: the snapshot an earlier run took was not saved: "
                        "no room on the device\n") == 1, stderr
    _, _, stderr = run_job(stock, data)
    assert "not saved" not in stderr


def test_runs_killed_while_they_restore_leave_the_cache_usable(stock: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """Runs killed (SIGKILL) or interrupted (SIGINT) at moments from their start to their
    guest's run, the restore among them: the cached snapshot stays as it was, and the next
    run restores it."""
    data = tmp_path / "data.txt"
    data.write_text("after\n")
    _, doc, _ = run_job(stock, data)  # the snapshot is cached from here on
    snapshot = Path(doc["snapshot"]["path"])
    wait_for_writer(snapshot)
    before = snapshot.stat()
    argv = [sys.executable, "-m", "vmmarch_cli", "run", "--backend", "emulate",
            str(stock["vmlinux"]), "--", "true"]
    for delay, sig in ((0.05, signal.SIGKILL), (0.1, signal.SIGKILL), (0.12, signal.SIGINT),
                       (0.15, signal.SIGKILL), (0.2, signal.SIGINT), (0.25, signal.SIGKILL)):
        proc = subprocess.Popen(argv, env={**os.environ, **ENGINE}, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) in (0, 130, -signal.SIGKILL)
    after = snapshot.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == \
        (before.st_ino, before.st_mtime_ns, before.st_size)
    assert not [p for p in snapshot.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    status, doc, _ = run_job(stock, data)
    check_job(status, doc, "after")
    assert doc["snapshot"]["taken"] is False


@pytest.mark.parametrize("extra", [(), ("--no-snapshot",)], ids=["snapshot", "fresh"])
def test_run_hands_over_environment_and_directory(stock: dict[str, Path],
                                                  extra: tuple[str, ...]) -> None:
    """--env and --cwd reach the command, restored or booted afresh; a directory the guest
    lacks ends the run with cd's status and message, a bad name before the boot (65)."""
    vmlinux = str(stock["vmlinux"])
    done = run_cli("run", "--backend", "emulate", *extra, "--env", "GREETING=hello world",
                   "--env", "EMPTY=", "--cwd", "/proc", vmlinux, "--", "sh", "-c",
                   'echo "$GREETING|${EMPTY-unset}|$(pwd)"', timeout=400, env=ENGINE)
    assert (done.returncode, done.stdout) == (0, "hello world||/proc\n"), done.stderr
    missing = run_cli("run", "--backend", "emulate", *extra, "--cwd", "/nowhere", vmlinux,
                      "--", "true", timeout=400, env=ENGINE)
    assert missing.returncode not in (0, 65) and "/nowhere" in missing.stderr, missing.stderr
    bad = run_cli("run", "--backend", "emulate", *extra, "--env", "1X=y", vmlinux, "--",
                  "true", env=ENGINE)
    assert bad.returncode == 65 and "'1X' is not a shell variable name" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_run_without_a_snapshot(stock: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("fresh\n")
    status, doc, _ = run_job(stock, data, "--no-snapshot")
    check_job(status, doc, "fresh")
    assert "snapshot" not in doc


def test_run_of_a_missing_kernel_is_one_line(stock: dict[str, Path], tmp_path: Path) -> None:
    """The snapshot's cache key reads the kernel's file first; a kernel that is not there is
    still the loader's one-line error (65), as with --no-snapshot."""
    for extra in ((), ("--no-snapshot",)):
        done = run_cli("run", "--backend", "emulate", *extra, str(tmp_path / "vmlinux"), "--",
                       "true", env=ENGINE)
        assert done.returncode == 65, done.stderr
        assert done.stderr.strip() == f"vmm-arch: error: {tmp_path / 'vmlinux'}: no such file"
