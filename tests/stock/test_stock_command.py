"""``vmm-arch stock`` (the README's first command): fetches, builds, boots; here only until a
short timeout, since the full boot is what tests/stock/test_stock_boot.py checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.stock]


@pytest.mark.usefixtures("kvm")
def test_stock_command_fetches_and_boots(stock: dict[str, Path]) -> None:
    p = run_cli("stock", "--backend", "kvm", "--timeout", "3", "--json", "--quiet", timeout=300)
    assert p.returncode == 124, p.stderr
    doc = json.loads(p.stdout)
    assert doc["reason"] == "timeout"
    assert doc["kernel"]["path"] == str(stock["vmlinux"])
    assert doc["kernel"]["boot_protocol"] == "pvh"  # auto: the Debian vmlinux has the PVH note


def test_stock_command_reaches_userspace_on_the_emulate_backend(stock: dict[str, Path]) -> None:
    """The README's first command as written: the marker, then status 0 through the port."""
    p = run_cli("stock", "--backend", "emulate", "--json", "--quiet", "--timeout", "600",
                timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout)
    assert (doc["reason"], doc["guest_exit_code"], doc["backend"]) == ("exit-port", 0, "emulate")
    assert doc["kernel"]["path"] == str(stock["vmlinux"])
    assert "VMM-INIT-REACHED" in "\n".join(doc["console_tail"])
