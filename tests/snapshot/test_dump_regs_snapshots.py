"""``vmm-arch dump-regs`` on snapshots (issue 18, part 5): a snapshot's vCPUs as their backend
read them when it was saved, and two snapshots side by side: the same guest saved at the same
console line on KVM and on the emulate backend shows where the two CPUs' states differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmmarch_cli.snapshot import fileformat, guest

from conftest import needs_unicorn, run_cli

pytestmark = needs_unicorn
ENGINE = {"VMMARCH_ENGINE": "engine", "LIBUNICORN_PATH": ""}


def saved(elf: Path, backend: str, path: Path) -> Path:
    done = run_cli("boot", str(elf), "--backend", backend, "--expect", "SPIN", "--snapshot",
                   str(path), env=ENGINE)
    assert done.returncode == 0, done.stderr
    return path


def test_a_snapshots_vcpus_as_saved(guests: dict[str, Path], tmp_path: Path) -> None:
    path = saved(guests["spin"], "emulate", tmp_path / "spin.snap")
    done = run_cli("dump-regs", str(path), "--json", env=ENGINE)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["backend"] == "emulate" and doc["snapshot"] == str(path) and doc["steps"] == []
    assert doc["cpus"] == guest.readbacks(fileformat.describe(path))
    rip = int(doc["cpus"][0]["regs"]["rip"], 16)
    assert 0x100_0000 <= rip < 0x100_1000, rip  # in spin.S's code, after its line
    text = run_cli("dump-regs", str(path), env=ENGINE)
    assert text.returncode == 0 and "cpu0 registers (when saved)" in text.stdout
    assert doc["cpus"][0]["regs"]["rip"] in text.stdout


@pytest.mark.usefixtures("kvm")
def test_kvm_and_emulate_snapshots_side_by_side(guests: dict[str, Path],
                                                tmp_path: Path) -> None:
    """spin.S saved after its line on both backends: they stop at different instructions of
    its loop (each stops when it sees the line), so general registers may differ; every
    control, segment and descriptor-table register, MSR and LAPIC value the two read back
    agrees."""
    on_kvm = saved(guests["spin"], "kvm", tmp_path / "kvm.snap")
    emulated = saved(guests["spin"], "emulate", tmp_path / "emulate.snap")
    done = run_cli("dump-regs", str(on_kvm), "--compare", str(emulated), "--json", env=ENGINE)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["a"]["backend"], doc["b"]["backend"]) == ("kvm", "emulate")
    outside = [d for d in doc["diff"] if not d["path"].startswith("cpus.0.regs.")]
    assert outside == [], outside
    text = run_cli("dump-regs", str(on_kvm), "--compare", str(emulated), env=ENGINE)
    assert "kvm kvm.snap vs emulate emulate.snap" in text.stdout


def test_a_snapshot_is_compared_with_snapshots_only(guests: dict[str, Path],
                                                    tmp_path: Path) -> None:
    path = saved(guests["spin"], "emulate", tmp_path / "spin.snap")
    for extra, text in ((["--compare", "kvm"], "kvm is not a snapshot"),
                        (["--tables"], "--tables decodes a booting guest's memory")):
        done = run_cli("dump-regs", str(path), *extra, env=ENGINE)
        assert done.returncode == 64, done.stderr
        assert text in done.stderr and "Traceback" not in done.stderr
