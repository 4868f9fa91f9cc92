"""Shared fixtures: the project's own guests (built from examples/), /dev/kvm, the stock kernel.

A test that needs a part skips only when the part is truly absent here, and says which.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import build as guest_build  # noqa: E402  (examples/build.py)
import stockboots  # noqa: E402  (tests/stockboots.py)

#: The emulate backend's tests need unicorn's binding. Found, not imported: importing it loads a
#: library, and the backend chooses which (backends/emulate/library.py) on first use.
UNICORN_MISSING = importlib.util.find_spec("unicorn") is None
needs_unicorn = pytest.mark.skipif(
    UNICORN_MISSING, reason="the emulate backend needs unicorn: pip install 'vmm-arch[emulate]'")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers from what a test needs (before ``-m`` selects): ``kvm`` for /dev/kvm, ``stock``
    for Debian's kernel, and ``slow`` for the stock boots on KVM (minutes each on a KVM that
    emulates ring 0): the README's test command leaves those out (pyproject.toml), and
    ``.ci/run`` runs them with ``-m slow``."""
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if "kvm" in needs:
            item.add_marker(pytest.mark.kvm)
        if needs & {"stock", "stock_boots"}:
            item.add_marker(pytest.mark.stock)
        if "stock_boots" in needs:
            item.add_marker(pytest.mark.slow)


def kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


@pytest.fixture(scope="session")
def kvm() -> None:
    reason = kvm_unusable_reason()
    if reason is None:
        return
    if os.environ.get("VMMARCH_CI") and os.path.exists("/dev/kvm"):
        pytest.fail(f"CI on a machine with /dev/kvm must run the KVM tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every guest under examples/guests, assembled and linked by examples/build.py."""
    out = tmp_path_factory.mktemp("guests")
    names = sorted(p.stem for p in (ROOT / "examples" / "guests").glob("*.S"))
    return {name: guest_build.build_guest(name, out) for name in names}


@pytest.fixture(scope="session")
def stock() -> Iterator[dict[str, Path]]:
    """Debian's cloud kernel (ELF and bzImage) and the marker initramfs, fetched with apt."""
    from vmmarch_cli import assets

    k = assets.fetch_debian_kernel("cloud")
    yield {"vmlinux": k.vmlinux, "bzimage": k.bzimage, "initramfs": assets.stock_initramfs()}


@pytest.fixture(scope="session")
def user_syscalls(kvm: None, guests: dict[str, Path]) -> tuple[bool, str]:
    """Whether a guest user process can enter the guest kernel with SYSCALL on this KVM, and
    the usersyscall guest's report. False on a KVM that emulates ring 0 for guests not written
    for it (kvm_pvm): there SYSCALL runs the kernel's entry at CPL 3 (docs/limited-kvm.md)."""
    p = run_cli("boot", str(guests["usersyscall"]), "--backend", "kvm", "--timeout", "60")
    line = next((x for x in p.stdout.splitlines() if x.startswith("SYSCALL_CS")), "")
    assert line, f"usersyscall guest printed no verdict: {p.stdout!r} {p.stderr!r}"
    return p.returncode == 0, line


@pytest.fixture(scope="session")
def stock_boots(request: pytest.FixtureRequest, stock: dict[str, Path],
                user_syscalls: tuple[bool, str], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[stockboots.StockBoots]:
    """Every stock-kernel boot the selected tests use (each test module lists its own in
    ``STOCK_BOOTS``; tests/stockboots.py defines them), started together."""
    wanted = {name for item in request.session.items
              for name in getattr(item.module, "STOCK_BOOTS", ())}
    boots = stockboots.StockBoots(stock, tmp_path_factory.mktemp("stock"), user_syscalls[0],
                                  ROOT, wanted)
    yield boots
    boots.stop_all()


def finish(proc: subprocess.Popen[Any], timeout: float) -> tuple[Any, Any]:
    """``proc.communicate(timeout=timeout)``, but a process still running then is killed and the
    test fails: a hung vmm-arch left behind slows every later test (two hung spin guests once
    took both cores for the rest of a run)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args} still ran after {timeout:g} s: killed")


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run ``python -m vmmarch_cli ARGS`` as a user would; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "vmmarch_cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
