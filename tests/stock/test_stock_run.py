"""``vmm-arch run`` and panics on the stock kernel: each case is one (slow) boot, started
together so that they share the wall-clock time."""

from __future__ import annotations

import re

import pytest

from stockboots import StockBoots

pytestmark = [pytest.mark.stock, pytest.mark.usefixtures("kvm")]
STOCK_BOOTS = ("run-true", "run-false", "run-exit7", "panic")


def need_userspace(user_syscalls: tuple[bool, str]) -> None:
    works, line = user_syscalls
    if not works:
        pytest.skip(f"this KVM runs a guest's SYSCALL from ring 3 without entering ring 0 "
                    f"({line}; docs/limited-kvm.md), so no guest command can run here")


def test_true_and_false(stock_boots: StockBoots,
                        user_syscalls: tuple[bool, str]) -> None:
    need_userspace(user_syscalls)
    assert stock_boots["run-true"].returncode == 0, stock_boots["run-true"].stderr[-2000:]
    assert stock_boots["run-false"].returncode == 1, stock_boots["run-false"].stderr[-2000:]


def test_exit_status_and_streams_kept_apart(
    stock_boots: StockBoots, user_syscalls: tuple[bool, str],
) -> None:
    need_userspace(user_syscalls)
    p = stock_boots["run-exit7"]
    assert p.returncode == 7, p.stderr[-2000:]
    assert p.stdout == "to-stdout\n"
    assert "to-stderr\n" in p.stderr
    assert "to-stdout" not in p.stderr
    assert "Linux version" not in p.stdout + p.stderr  # the kernel log stays out without -v


def test_panic_never_reads_as_success(stock_boots: StockBoots) -> None:
    p = stock_boots["panic"]
    assert p.returncode == 255, p.stderr[-2000:]
    # Measured here: "Kernel panic - not syncing: VFS: Unable to mount root fs on
    # unknown-block(0,0)" (the missing rdinit sends the kernel to prepare_namespace()).
    assert re.search(r"vmm-arch: panic \(status 255\): .*Kernel panic - not syncing: "
                     r"VFS: Unable to mount root fs", p.stderr), p.stderr[-2000:]
