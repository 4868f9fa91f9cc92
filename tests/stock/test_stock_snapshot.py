"""Debian's stock kernel saved on the emulate backend once it has freed its init memory, and
resumed in new processes: init runs, prints its facts and the marker, and exits through the port;
the kernel's clock did not count the time the guest was saved. The snapshot of the 256 MiB guest
takes what it wrote, not its size, on disk (issue 18: <= 60 MiB)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import run_cli
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
