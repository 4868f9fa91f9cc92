"""Snapshots on the KVM backend (issue 18, part 4): the project's ring-0 test guests, saved
mid-run with ``boot --expect ... --snapshot`` and resumed in a new process, give the report an
uninterrupted run gives: every line, every CHECK value, the exit status. KVM's own state goes
through KVM_GET_*/KVM_SET_* (backends/kvm/snapshot.py); the devices are vmm-arch's, as on the
emulate backend.

What this host's KVM cannot do is stated, not skipped: on a KVM that emulates guest ring 0
(kvm_pvm) the guest reads the host's TSC, whatever IA32_TSC is set to, so a restore after a gap
shows the guest the gap (tsc_continues in resume.S), and a timer handler never finds its vector
in service (timer_ticks in resume.S, timer_in_service in apictimer.S: the same with or without
a snapshot)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("kvm")

#: Guests whose whole report runs on this KVM (examples/guests; irq32, triplefault and the
#: user-mode ones end earlier here), each saved at its first line and resumed.
GUESTS = ("apictimer", "bootcheck", "cr3flush", "faultnest", "idtcheck", "nmi", "pvhcheck",
          "resume", "smcalias", "stosb", "syscallcheck", "uartflood")
#: resume.S's TSC check allows 2^33 cycles (~3 s) from its start to its end.
GAP_SECONDS = 4.0
CHECK_LINE = re.compile(r"^CHECK (\w+) ([0-9a-f]{16}) (ok|FAIL)$", re.M)


def report(stdout: str) -> list[str]:
    """The guest's report: its lines, without the timings the speed guests print."""
    return [line for line in stdout.splitlines() if line and not line.startswith("TIME ")]


def save(elf: Path, at: str, path: Path) -> None:
    done = run_cli("boot", str(elf), "--backend", "kvm", "--expect", re.escape(at),
                   "--snapshot", str(path))
    assert done.returncode == 0 and f"saved the guest to {path}" in done.stderr, done.stderr


@pytest.mark.parametrize("name", GUESTS)
def test_a_guest_saved_mid_run_gives_the_same_report(name: str, guests: dict[str, Path],
                                                     tmp_path: Path) -> None:
    plain = run_cli("boot", str(guests[name]), "--backend", "kvm", "--timeout", "60")
    first, *rest = report(plain.stdout)
    path = tmp_path / f"{name}.snap"
    save(guests[name], first, path)
    resumed = run_cli("resume", str(path), "--timeout", "60")
    assert report(resumed.stdout) == rest, resumed.stdout + resumed.stderr
    assert resumed.returncode == plain.returncode, resumed.stderr
    assert f"resuming {path}" in resumed.stderr and "on kvm" in resumed.stderr


def test_a_timer_guest_resumed_after_a_gap(guests: dict[str, Path], tmp_path: Path) -> None:
    """resume.S saved with its APIC timer running: the ticks, the memory and (on a KVM that can
    set the guest's TSC) the TSC go on as if it had never stopped."""
    from vmmarch_cli.backends.kvm.system import host_needs_ring0_workarounds

    plain = run_cli("boot", str(guests["resume"]), "--backend", "kvm")
    path = tmp_path / "resume.snap"
    save(guests["resume"], "RESUME READY", path)
    time.sleep(GAP_SECONDS)
    resumed = run_cli("resume", str(path))
    before = {n: (v, ok) for n, v, ok in CHECK_LINE.findall(plain.stdout)}
    after = {n: (v, ok) for n, v, ok in CHECK_LINE.findall(resumed.stdout)}
    differ = {n for n in before if before[n] != after.get(n)}
    assert differ == ({"tsc_continues"} if host_needs_ring0_workarounds() else set()), \
        (before, after)
    assert after["memory_kept"] == ("0000000000000000", "ok")
    assert "RESUME HALF" in resumed.stdout and "RESUME DONE" in resumed.stdout


def test_kvm_and_emulate_snapshots_stay_on_their_backend(guests: dict[str, Path],
                                                         tmp_path: Path) -> None:
    path = tmp_path / "k.snap"
    save(guests["bootcheck"], "BOOTCHECK START", path)
    done = run_cli("resume", str(path), "--backend", "emulate")
    assert done.returncode == 65 and "taken on the kvm backend, not emulate" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_a_snapshot_of_another_cpu_is_refused(guests: dict[str, Path], tmp_path: Path) -> None:
    from test_resume import rewritten

    path = tmp_path / "k.snap"
    save(guests["bootcheck"], "BOOTCHECK START", path)
    other = rewritten(path, tmp_path / "other.snap", engine="kvm, cpu 0000000000000000")
    done = run_cli("resume", str(other))
    assert done.returncode == 65, done.stderr
    assert "taken on kvm, cpu 0000000000000000; this kvm backend runs kvm, cpu" in done.stderr
