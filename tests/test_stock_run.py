"""``vmm-arch run`` and panics on the stock kernel: each case is one (slow) boot, started
together so that they share the wall-clock time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.stock, pytest.mark.usefixtures("kvm")]

TIMEOUT = 1500

CASES: dict[str, list[str]] = {
    "true": ["run", "{vmlinux}", "--", "true"],
    "false": ["run", "{vmlinux}", "--", "false"],
    "exit7": ["run", "{vmlinux}", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"],
    # rdinit names a program that does not exist: the kernel falls back to mounting a root
    # file system, finds none and panics ("VFS: Unable to mount root fs", init/do_mounts.c);
    # panic=-1 resets at once. That must never read as success.
    "panic": ["boot", "{vmlinux}", "--initrd", "{initramfs}", "--append",
              "rdinit=/nonexistent init=/nonexistent"],
}


@pytest.fixture(scope="module")
def cases(user_syscalls: tuple[bool, str]) -> dict[str, list[str]]:
    """Every case where user processes can make system calls; only the kernel-side one where
    this KVM cannot deliver them (the usersyscall guest's verdict is the stated reason)."""
    works, _ = user_syscalls
    return CASES if works else {"panic": CASES["panic"]}


def need_userspace(user_syscalls: tuple[bool, str]) -> None:
    works, line = user_syscalls
    if not works:
        pytest.skip(f"this KVM runs a guest's SYSCALL from ring 3 without entering ring 0 "
                    f"({line}; docs/limited-kvm.md), so no guest command can run here")


@pytest.fixture(scope="module")
def runs(stock: dict[str, Path],
         cases: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess[str]]:
    procs = {}
    for name, args in cases.items():
        argv = [a.format(**{k: str(v) for k, v in stock.items()}) for a in args]
        argv[2:2] = ["--timeout", str(TIMEOUT)]
        procs[name] = subprocess.Popen([sys.executable, "-m", "vmmarch_cli", *argv],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, cwd=ROOT)
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=TIMEOUT + 60)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def test_true_and_false(runs: dict[str, subprocess.CompletedProcess[str]],
                        user_syscalls: tuple[bool, str]) -> None:
    need_userspace(user_syscalls)
    assert runs["true"].returncode == 0, runs["true"].stderr[-2000:]
    assert runs["false"].returncode == 1, runs["false"].stderr[-2000:]


def test_exit_status_and_streams_kept_apart(
    runs: dict[str, subprocess.CompletedProcess[str]], user_syscalls: tuple[bool, str],
) -> None:
    need_userspace(user_syscalls)
    p = runs["exit7"]
    assert p.returncode == 7, p.stderr[-2000:]
    assert p.stdout == "to-stdout\n"
    assert "to-stderr\n" in p.stderr
    assert "to-stdout" not in p.stderr
    assert "Linux version" not in p.stdout + p.stderr  # the kernel log stays out without -v


def test_panic_never_reads_as_success(runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    p = runs["panic"]
    assert p.returncode == 255, p.stderr[-2000:]
    # Measured here: "Kernel panic - not syncing: VFS: Unable to mount root fs on
    # unknown-block(0,0)" (the missing rdinit sends the kernel to prepare_namespace()).
    assert re.search(r"vmm-arch: panic \(status 255\): .*Kernel panic - not syncing: "
                     r"VFS: Unable to mount root fs", p.stderr), p.stderr[-2000:]
