"""``--backend auto``, the default: which backend it picks, that it says why, and that every
command that takes ``--backend`` agrees (backends.pick)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmmarch_cli import backends
from vmmarch_cli.errors import BadInputError

from conftest import needs_unicorn, run_cli


def _kvm_is_emulated_here() -> bool:
    # The same host facts the KVM backend reads (backends/kvm/system.py), from the files.
    if Path("/sys/module/kvm_pvm").exists():
        return True
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "").split()
    return "vmx" not in flags and "svm" not in flags


@needs_unicorn
def test_auto_row_of_backends_matches_the_host() -> None:
    p = run_cli("backends", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert list(rows) == ["kvm", "emulate", "auto"]
    auto = rows["auto"]
    assert auto["usable"] is True
    if not rows["kvm"]["usable"]:
        assert auto["facts"] == {"picks": "emulate", "why": rows["kvm"]["reason"]}
    elif _kvm_is_emulated_here():
        assert auto["facts"] == {"picks": "emulate",
                                 "why": "this host's KVM emulates guest ring 0"}
    else:
        assert auto["facts"] == {"picks": "kvm", "why": "/dev/kvm runs guest ring 0 in hardware"}


@needs_unicorn
def test_without_kvm_auto_boots_on_the_emulate_backend_and_says_why(
        guests: dict[str, Path], tmp_path: Path) -> None:
    gone = tmp_path / "kvm"
    env = {"VMMARCH_KVM_DEVICE": str(gone)}
    p = run_cli("boot", str(guests["bootcheck"]), env=env)
    assert p.returncode == 0, p.stderr
    announce = next(x for x in p.stderr.splitlines() if "via the" in x)
    assert " on emulate (" in announce and "does not exist" in announce
    doc = json.loads(run_cli("boot", "--json", "--quiet", str(guests["bootcheck"]),
                             env=env).stdout)
    assert doc["backend"] == "emulate" and str(gone) in doc["backend_reason"]
    regs = json.loads(run_cli("dump-regs", "--json", str(guests["bootcheck"]), env=env).stdout)
    assert regs["backend"] == "emulate"
    shown = run_cli("inspect", "--json", str(guests["bootcheck"]), env=env)
    assert shown.returncode == 0, shown.stderr


def test_a_named_backend_is_used_without_asking_auto(guests: dict[str, Path],
                                                     tmp_path: Path) -> None:
    # --backend kvm without /dev/kvm is an error (69), never a silent switch to emulate.
    p = run_cli("boot", "--backend", "kvm", str(guests["bootcheck"]),
                env={"VMMARCH_KVM_DEVICE": str(tmp_path / "kvm")})
    assert p.returncode == 69 and "does not exist" in p.stderr
    assert "Traceback" not in p.stderr


def test_resolve_names_and_refuses_unknown_ones() -> None:
    assert backends.resolve("emulate") == backends.Pick("emulate", "--backend emulate")
    with pytest.raises(BadInputError, match="choose one of auto, kvm, emulate"):
        backends.resolve("vmx")


@needs_unicorn
def test_run_with_default_options_gives_the_commands_status(stock: dict[str, Path]) -> None:
    """Issue 17's newcomer case: no --backend, no --timeout. On a KVM that emulates ring 0 this
    once spent minutes and ended in a panic; auto runs it where it can finish."""
    p = run_cli("run", str(stock["vmlinux"]), "--", "sh", "-c", "exit 7", timeout=300)
    assert p.returncode == 7, p.stderr[-2000:]
