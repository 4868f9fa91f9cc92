"""More than one vCPU with the project's own guests: per-vCPU state read back, the tables in
guest memory, and every vCPU thread stopped however the run ends (issue 6, item 5)."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest

from vmmarch_cli import machine
from vmmarch_cli.config import BootConfig

from conftest import needs_unicorn, run_cli

APIC_BASE_BSP = 1 << 8  # IA32_APIC_BASE bit 8 (SDM vol. 3A 10.4.4)


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize(("guest", "cpus", "timeout", "reason", "status"), [
    ("bootcheck", 4, 60, "exit-port", 0),   # the BSP reports; the APs wait for a SIPI
    ("spin", 3, 0.5, "timeout", 124),       # every vCPU kicked out of KVM_RUN
    ("triplefault", 2, 60, "fault", 70),    # a fault on the BSP stops the APs too
])
def test_every_vcpu_thread_stops(guests: dict[str, Path], guest: str, cpus: int,
                                 timeout: float, reason: str, status: int) -> None:
    config = BootConfig(kernel=guests[guest], backend="kvm", cpus=cpus, timeout=timeout)
    before = threading.active_count()
    t0 = time.monotonic()
    result = machine.run(config, io.BytesIO())
    assert (result.reason, result.status) == (reason, status), result.detail
    assert time.monotonic() - t0 < timeout + 10
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("vcpu")]


@pytest.mark.usefixtures("kvm")
def test_per_vcpu_state_read_back(guests: dict[str, Path]) -> None:
    p = run_cli("dump-regs", str(guests["bootcheck"]), "--cpus", "3", "--json")
    assert p.returncode == 0, p.stderr
    cpus = json.loads(p.stdout)["cpus"]
    assert [c["index"] for c in cpus] == [0, 1, 2]
    for c in cpus:
        leaf1 = next(e for e in c["cpuid"] if e["function"] == "0x1")
        assert int(leaf1["ebx"], 16) >> 24 == c["index"]  # initial APIC ID
        x2apic_ids = {int(e["edx"], 16) for e in c["cpuid"] if e["function"] == "0xb"}
        assert x2apic_ids == {c["index"]}
        core_level = next(e for e in c["cpuid"] if e["function"] == "0xb" and e["index"] == "0x1")
        assert int(core_level["ebx"], 16) & 0xFFFF == 3  # logical processors at the core level
        bsp = int(c["msrs"]["IA32_APIC_BASE"], 16) & APIC_BASE_BSP
        assert bool(bsp) == (c["index"] == 0)
    one = run_cli("dump-regs", str(guests["bootcheck"]), "--cpus", "3", "--cpu", "2", "--json")
    assert [c["index"] for c in json.loads(one.stdout)["cpus"]] == [2]
    bad = run_cli("dump-regs", str(guests["bootcheck"]), "--cpus", "3", "--cpu", "3")
    assert bad.returncode == 64 and "vCPU 3 does not exist with --cpus 3" in bad.stderr


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize("protocol", ["linux64", "pvh"])
def test_tables_decoded_from_guest_memory(guests: dict[str, Path], protocol: str) -> None:
    guest = "pvhcheck" if protocol == "pvh" else "bootcheck"
    p = run_cli("dump-regs", str(guests[guest]), "--cpus", "5", "--mem", "4G", "--json",
                "--tables", "--boot-protocol", protocol)
    assert p.returncode == 0, p.stderr
    tables = json.loads(p.stdout)["tables"]
    assert tables["e820"]["source"] == ("hvm_start_info.memmap" if protocol == "pvh"
                                        else "boot_params.e820_table")
    assert [(e["start"], e["end"], e["type"]) for e in tables["e820"]["entries"]] == [
        ("0x0", "0x9fbff", "usable"), ("0x9fc00", "0xfffff", "reserved"),
        ("0x100000", "0xbfffffff", "usable"), ("0x100000000", "0x13fffffff", "usable")]
    mp = tables["mptable"]
    assert mp["checksum_ok"] and len(mp["cpus"]) == 5 and mp["ioapics"][0]["id"] == 5
    assert [t["signature"] for t in tables["acpi"]["tables"]] == ["XSDT", "FACP", "DSDT", "APIC"]
    assert tables["acpi"]["rsdp"]["checksum_ok"]
    assert sum(r["type"] == "local_apic" for r in tables["acpi"]["madt"]) == 5
    text = run_cli("dump-regs", str(guests[guest]), "--cpus", "2", "--tables",
                   "--boot-protocol", protocol)
    assert text.returncode == 0
    for title in ("e820 map", "MP table", "ACPI tables", "cpu1 registers"):
        assert title in text.stdout


def test_cpu_count_limits(guests: dict[str, Path]) -> None:
    p = run_cli("boot", str(guests["bootcheck"]), "--cpus", "255")
    assert p.returncode == 64 and "1<=x<=254" in p.stderr
    p = run_cli("boot", str(guests["bootcheck"]), "--cpus", "0")
    assert p.returncode == 64


@needs_unicorn
def test_emulate_backend_refuses_more_vcpus_than_it_can_address(guests: dict[str, Path]
                                                                ) -> None:
    from vmmarch_cli.backends.emulate import smp

    p = run_cli("boot", str(guests["bootcheck"]), "--backend", "emulate", "--cpus",
                str(smp.MAX_VCPUS + 1))
    assert p.returncode == 69
    assert p.stderr.strip().count("\n") == 0
    assert f"at most {smp.MAX_VCPUS} vCPUs" in p.stderr
