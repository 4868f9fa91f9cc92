"""Environment faults (issue 7, item 4): a read-only cache, a disk that fills up while a .deb
is unpacked or an output is written, a closed stdout. Each ends in one line that says what to
do, with exit status 69 (environment) or 65 (a path the user named), and leaves no half-written
file behind. The small file systems are real tmpfs mounts (root only)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmmarch_cli import assets

from conftest import run_cli


@contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False, fill: bool = False,
          leave: int = 0) -> Iterator[Path]:
    """A real file system of ``size`` at ``where``: read-only, or filled up but ``leave`` bytes
    (Python's tempfile probes a directory with a small write and skips it when that fails)."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        if os.geteuid() == 0:
            pytest.fail(f"root cannot mount a tmpfs here: {p.stderr.strip()}")
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        if fill:
            fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                with pytest.raises(OSError) as full:
                    while True:
                        os.write(fd, bytes(4096))
                assert full.value.errno == errno.ENOSPC
                if leave:
                    os.ftruncate(fd, os.fstat(fd).st_size - leave)
            finally:
                os.close(fd)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _one_error_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("vmm-arch: error:")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_read_only_cache(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        p = run_cli("fetch", env={"VMMARCH_CACHE": str(ro / "cache")})
    assert p.returncode == 69
    _one_error_line(p.stderr, "Read-only file system", "VMMARCH_CACHE", "writable")


def test_disk_full_while_unpacking_the_kernel(tmp_path: Path, stock: dict[str, Path]) -> None:
    debs = sorted((assets.cache_dir() / "debs").glob("linux-image-*-cloud-amd64_*.deb"))
    assert debs, "the stock fixture fetched the kernel .deb into the cache"
    with tmpfs(tmp_path / "small", "40m") as small:
        (small / "debs").mkdir()
        shutil.copy(debs[-1], small / "debs")  # ~27 MB: the download is done, the unpack is not
        p = run_cli("fetch", env={"VMMARCH_CACHE": str(small)}, timeout=300)
        leftovers = list((small / "pkgs").iterdir())
    assert p.returncode == 69
    _one_error_line(p.stderr, "ran out of space", "free some space", str(small),
                    "VMMARCH_CACHE")
    assert leftovers == []  # no half-unpacked tree that a later run would trust


def test_output_on_a_full_disk_leaves_nothing(tmp_path: Path, stock: dict[str, Path]) -> None:
    with tmpfs(tmp_path / "full", "64k", fill=True) as full:
        p = run_cli("mkinitramfs", str(full / "init.cpio"))
        names = sorted(x.name for x in full.iterdir())
    assert p.returncode == 65
    _one_error_line(p.stderr, "cannot write", "No space left on device", "free some space")
    assert names == ["filler"]


def test_run_with_a_full_tmpdir(tmp_path: Path, stock: dict[str, Path],
                                guests: dict[str, Path]) -> None:
    busybox = assets.fetch_busybox()  # cached by the stock fixture: no apt run below
    with tmpfs(tmp_path / "tmp", "64k", fill=True, leave=8192) as full:
        p = run_cli("run", "--busybox", str(busybox), str(guests["bootcheck"]), "--", "true",
                    env={"TMPDIR": str(full)})
        # apt-get itself needs TMPDIR: its failure must name space, not the network. An empty
        # cache, so that apt is asked: with the shared one its answers are remembered
        # (assets._apt_query) and everything is there, so fetch needs neither apt nor TMPDIR.
        q = run_cli("fetch", env={"TMPDIR": str(full), "VMMARCH_CACHE": str(tmp_path / "new")})
        r = run_cli("fetch", env={"TMPDIR": str(full)})
    assert r.returncode == 0, r.stderr
    assert p.returncode == 69
    _one_error_line(p.stderr, "initramfs", "No space left on device", "TMPDIR")
    assert q.returncode == 69
    _one_error_line(q.stderr, "ran out of space", "free some space", str(full), "TMPDIR")


@pytest.mark.usefixtures("kvm")
def test_console_log_on_a_full_disk_keeps_the_guest_status(tmp_path: Path,
                                                           guests: dict[str, Path]) -> None:
    with tmpfs(tmp_path / "full", "64k", fill=True) as full:
        text = run_cli("boot", str(guests["bootcheck"]), "--console-log",
                       str(full / "log"))
        doc = run_cli("boot", str(guests["bootcheck"]), "--quiet", "--json", "--console-log",
                      str(full / "log"))
    assert text.returncode == 0  # the guest's status: the boot itself went on
    assert "vmm-arch: warning: console log incomplete: No space left on device" in text.stderr
    assert doc.returncode == 0
    # The count is all of the guest's console, which the text run also streamed to stdout.
    assert json.loads(doc.stdout)["warnings"] == [
        f"console log incomplete: No space left on device ({len(text.stdout.encode())} bytes "
        "of console output)"]


@pytest.mark.usefixtures("kvm")
def test_closed_stdout_is_a_warning(guests: dict[str, Path]) -> None:
    import os
    import sys

    from conftest import ROOT
    # Like `vmm-arch boot ... | true`: the reader is gone before the first console byte, so
    # the outcome does not depend on how fast the backend runs the guest.
    read_end, write_end = os.pipe()
    os.close(read_end)
    p = subprocess.Popen([sys.executable, "-m", "vmmarch_cli", "boot", str(guests["bootcheck"])],
                         stdout=write_end, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(write_end)
    assert p.stderr is not None
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0, err
    assert "Traceback" not in err
    assert "vmm-arch: warning: console output stopped: Broken pipe" in err
