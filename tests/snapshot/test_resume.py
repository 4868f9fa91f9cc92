"""``vmm-arch boot --snapshot`` and ``vmm-arch resume`` on the emulate backend, with the guest
that must not notice (examples/guests/resume.S): its TSC and its APIC timer go on from where they
were, whatever time passed, and its memory is as it left it. Bad snapshots and options end in
one line with the statuses DESIGN.md gives them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmmarch_cli.snapshot import fileformat, image
from vmmarch_cli.snapshot.fileformat import Header

from conftest import ROOT, finish, needs_unicorn, run_cli

pytestmark = needs_unicorn

CHECK_LINE = re.compile(r"^CHECK (\w+) ([0-9a-f]{16}) (ok|FAIL)$", re.M)
ENGINE = {"VMMARCH_ENGINE": "engine", "LIBUNICORN_PATH": ""}
#: Longer than the 2^33 TSC cycles resume.S allows from its start to its end (~3 s at 2.6 GHz):
#: a restore that let the guest see this gap would fail tsc_continues.
GAP_SECONDS = 4.0


@pytest.fixture(scope="module")
def saved(guests: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resume.S saved at its RESUME READY line."""
    path = tmp_path_factory.mktemp("snap") / "resume.snap"
    done = run_cli("boot", str(guests["resume"]), "--backend", "emulate", "--expect",
                   "RESUME READY", "--snapshot", str(path), env=ENGINE)
    assert done.returncode == 0, done.stderr
    assert f"saved the guest to {path}" in done.stderr
    assert "RESUME DONE" not in done.stdout  # stopped before its end
    return path


def checks(stdout: str) -> dict[str, str]:
    return {name: verdict for name, _, verdict in CHECK_LINE.findall(stdout)}


def test_the_guest_goes_on_as_if_never_stopped(saved: Path) -> None:
    time.sleep(max(0.0, GAP_SECONDS - (time.time() - saved.stat().st_mtime)))
    done = run_cli("resume", str(saved), env=ENGINE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert checks(done.stdout) == {"tsc_continues": "ok", "memory_kept": "ok",
                                   "timer_ticks": "ok"}
    assert "RESUME START" not in done.stdout and "RESUME DONE" in done.stdout
    assert f"resuming {saved}" in done.stderr


def test_a_resumed_guest_can_be_profiled(saved: Path) -> None:
    """resume takes boot's --profile: the samples are of the resumed part alone."""
    done = run_cli("resume", str(saved), "--profile", "2000", env=ENGINE)
    assert done.returncode == 0, done.stderr
    found = re.search(r"^profile: (\d+) samples at 2000 Hz$", done.stderr, re.M)
    assert found and int(found.group(1)) > 0, done.stderr


def test_the_snapshot_is_sparse(saved: Path) -> None:
    """A 256 MiB guest that touched a few pages keeps only those (and its own page tables)."""
    assert os.stat(saved).st_size > 256 << 20
    assert os.stat(saved).st_blocks * 512 < 2 << 20


def test_parallel_resumes_from_one_snapshot(saved: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "vmmarch_cli", "resume", str(saved)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, **ENGINE}) for _ in range(4)]
    for proc in procs:
        out, err = finish(proc, 120)
        assert proc.returncode == 0, err
        assert set(checks(out).values()) == {"ok"}


def test_a_resumed_guest_can_be_saved_again(saved: Path, tmp_path: Path,
                                            guests: dict[str, Path]) -> None:
    """resume --snapshot: the second snapshot goes on from the second stop."""
    second = tmp_path / "second.snap"
    done = run_cli("resume", str(saved), "--expect", "RESUME HALF", "--snapshot",
                   str(second), env=ENGINE)
    assert done.returncode == 0, done.stderr
    assert "RESUME DONE" not in done.stdout
    again = run_cli("resume", str(second), env=ENGINE)
    assert again.returncode == 0, again.stdout + again.stderr
    assert set(checks(again.stdout).values()) == {"ok"} and "RESUME DONE" in again.stdout
    assert "RESUME HALF" not in again.stdout


def rewritten(saved: Path, out: Path, **changes: object) -> Path:
    """``saved`` written again (valid CRCs) with its description changed."""
    snap = fileformat.read(saved)
    from vmmarch_cli.memory import MmapGuestMemory

    memory = MmapGuestMemory([(0, snap.memory_length)])
    with open(saved, "rb") as f:
        memory.map_private(f.fileno(), snap.memory_offset)
    description = {**snap.description, **changes}
    source = image.MemorySource([(host, length) for _, length, host in memory.host_regions()])
    fileformat.write(out, description, snap.sections, source)
    return out


def one_line(done: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    """Bad input (65): one line. A usage error (64) is click's: usage, hint, one error line."""
    assert done.returncode == status, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line]
    if status == 64:
        lines = [line for line in lines if line.startswith("Error:")]
    assert len(lines) == 1 and text in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_bad_snapshots_are_refused_in_one_line(saved: Path, tmp_path: Path) -> None:
    raw = saved.read_bytes()
    header = Header.read(raw)
    cut = tmp_path / "cut.snap"
    cut.write_bytes(raw[: header.memory_offset])
    one_line(run_cli("resume", str(cut), env=ENGINE), 65, "truncated snapshot")
    flipped = bytearray(raw)
    flipped[header.description_offset + 10] ^= 0x20
    corrupt = tmp_path / "corrupt.snap"
    corrupt.write_bytes(flipped)
    one_line(run_cli("resume", str(corrupt), env=ENGINE), 65, "fails the CRC")
    old = bytearray(raw)
    old[Header.version.offset] = 9
    older = tmp_path / "older.snap"
    older.write_bytes(old)
    one_line(run_cli("resume", str(older), env=ENGINE), 65, "format version 9")
    one_line(run_cli("resume", str(tmp_path / "missing.snap"), env=ENGINE), 65,
             "No such file")
    one_line(run_cli("resume", str(tmp_path), env=ENGINE), 65, "is a directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line(run_cli("resume", str(fifo), env=ENGINE, timeout=30), 65, "is a FIFO")


def test_another_engine_backend_or_machine_is_refused(saved: Path, tmp_path: Path) -> None:
    engine = rewritten(saved, tmp_path / "engine.snap", engine="unicorn-2.1.4-000000-000000")
    one_line(run_cli("resume", str(engine), env=ENGINE), 65,
             "taken on unicorn-2.1.4-000000-000000; this emulate backend runs unicorn-")
    one_line(run_cli("resume", str(saved), "--backend", "kvm", env=ENGINE), 65,
             "taken on the emulate backend, not kvm")
    one_line(run_cli("resume", str(saved), "--mem", "512M", env=ENGINE), 65,
             "has 256 MiB of RAM, not --mem 512M")
    one_line(run_cli("resume", str(saved), "--cpus", "2", env=ENGINE), 65,
             "has 1 vCPUs, not --cpus 2")
    wheel = run_cli("resume", str(saved), env={"VMMARCH_ENGINE": "wheel", "LIBUNICORN_PATH": ""})
    assert wheel.returncode == 69 and "snapshots need the vmm-arch engine" in wheel.stderr


def test_a_backend_that_cannot_is_refused_before_the_guest_runs(
        guests: dict[str, Path], tmp_path: Path) -> None:
    done = run_cli("boot", str(guests["resume"]), "--backend", "emulate", "--expect",
                   "RESUME READY", "--snapshot", str(tmp_path / "s"),
                   env={"VMMARCH_ENGINE": "wheel", "LIBUNICORN_PATH": ""})
    assert done.returncode == 69, done.stderr
    assert "snapshots need the vmm-arch engine" in done.stderr
    assert "RESUME START" not in done.stdout
    assert not list(tmp_path.iterdir())


def test_snapshot_options_are_checked_first(guests: dict[str, Path], tmp_path: Path) -> None:
    elf = str(guests["resume"])
    one_line(run_cli("boot", elf, "--backend", "emulate", "--snapshot", str(tmp_path / "s")),
             64, "--snapshot needs --expect")
    one_line(run_cli("boot", elf, "--backend", "emulate", "--expect", "X", "--snapshot",
                     str(tmp_path / "no" / "s")), 64, "is not a directory")
    one_line(run_cli("boot", elf, "--backend", "emulate", "--expect", "X", "--snapshot",
                     str(tmp_path)), 64, "is a directory")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_hundred_restores_leak_nothing(saved: Path, tmp_path: Path) -> None:
    """In one process: 100 restores leave no fd, thread, mapping or memory behind (issue 18).
    The snapshot is the guest half-way through its wait, so each restore runs ~0.25 s."""
    from vmmarch_cli import machine
    from vmmarch_cli.config import BootConfig

    half = tmp_path / "half.snap"
    done = run_cli("resume", str(saved), "--expect", "RESUME HALF", "--snapshot", str(half),
                   env=ENGINE)
    assert done.returncode == 0, done.stderr
    os.environ.update(ENGINE)
    described = fileformat.describe(half).description["machine"]
    config = BootConfig(kernel=Path(described["kernel"]["path"]), backend="emulate",
                        restore=half)

    def resources() -> tuple[int, int, int, int]:
        for thread in threading.enumerate():  # daemon threads of the last run, ending
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        rss_pages = int(Path("/proc/self/statm").read_text().split()[1])
        # Threads: this process's own (vCPUs, their alarms, the CRC check); the OS count
        # also has the engine's, which come and go.
        return (len(os.listdir("/proc/self/fd")), threading.active_count(),
                len(Path("/proc/self/maps").read_text().splitlines()),
                rss_pages * os.sysconf("SC_PAGE_SIZE"))

    def restore() -> None:
        result = machine.run(config, None, quiet=True)
        assert result.status == 0 and result.guest_status == 0, result.detail

    for _ in range(5):  # the engine, the binding and the caches settle first
        restore()
    fds, threads, maps, rss = resources()
    for _ in range(100):
        restore()
    after = resources()
    assert after[:2] == (fds, threads), (after, (fds, threads))
    assert after[2] <= maps + 8, (after[2], maps)
    assert after[3] - rss < 32 << 20, ((after[3] - rss) >> 20, rss >> 20)
