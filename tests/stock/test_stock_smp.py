"""Debian's cloud kernel with 2 and 4 vCPUs and 5 GiB: it finds the APs and the IOAPIC through
our ACPI tables (it has no MP-table parser), wakes the APs with INIT/SIPI, and sees memory on
both sides of the 32-bit gap. The boots are started with the others (tests/stockboots.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vmmarch_cli.arch.x86_64 import e820

from conftest import run_cli
from stockboots import (
    Finished,
    StockBoots,
    kernel_total_kib,
    printed_e820,
    printed_memory_total_kib,
)

pytestmark = [pytest.mark.stock, pytest.mark.usefixtures("kvm")]

#: (boot, vCPUs, protocol, guest RAM) as in tests/stockboots.py
SMP_BOOTS = {"smp2-5g": (2, "pvh", 5 << 30), "smp4": (4, "linux64", 256 << 20)}
STOCK_BOOTS = tuple(SMP_BOOTS)


@pytest.fixture(params=list(SMP_BOOTS))
def smp(request: pytest.FixtureRequest, stock_boots: StockBoots) -> tuple[str, Finished]:
    return request.param, stock_boots[request.param]


def test_boot_ends_where_it_should(smp: tuple[str, Finished],
                                   user_syscalls: tuple[bool, str]) -> None:
    _, f = smp
    doc = json.loads(f.stdout)
    if user_syscalls[0]:
        assert (doc["reason"], f.returncode) == ("exit-port", 0), f.stderr[-2000:]
    else:
        # Stopped by --expect at the last SMP line: every vCPU thread was stopped and joined
        # (the process could not have printed its result otherwise).
        assert (doc["reason"], f.returncode) == ("expect", 0), f.console[-3000:]


def test_kernel_finds_the_cpus_through_acpi(smp: tuple[str, Finished],
                                            user_syscalls: tuple[bool, str]) -> None:
    name, f = smp
    cpus = SMP_BOOTS[name][0]
    for line in ("ACPI: Using ACPI (MADT) for SMP configuration information",
                 f"smpboot: Allowing {cpus} CPUs, 0 hotplug CPUs",
                 f"IOAPIC[0]: apic_id {cpus}, version 17, address 0xfec00000, GSI 0-23",
                 "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])",
                 f"smp: Brought up 1 node, {cpus} CPUs"):
        assert line in f.console, (line, f.console[-3000:])
    assert "x86: Booting SMP configuration" in f.console
    if user_syscalls[0]:
        assert f.facts["nproc"] == str(cpus)
        assert f.facts["online"] == f"0-{cpus - 1}"


def test_acpi_tables_the_kernel_printed_are_the_ones_dump_regs_decodes(
        smp: tuple[str, Finished], stock: dict[str, Path]) -> None:
    name, f = smp
    cpus, protocol, mem = SMP_BOOTS[name]
    p = run_cli("dump-regs", str(stock["vmlinux"]), "--backend", "kvm", "--json", "--tables",
                "--cpus", str(cpus), "--mem", str(mem // (1 << 20)), "--boot-protocol", protocol)
    assert p.returncode == 0, p.stderr
    tables = json.loads(p.stdout)["tables"]
    # "ACPI: APIC 0x00000000000E0180 000062 (v05 VMMARC VMMAMADT ...)" (drivers/acpi/tables.c)
    printed = {sig: (int(addr, 16), int(length, 16)) for sig, addr, length in
               re.findall(r"ACPI: (RSDP|XSDT|FACP|DSDT|APIC) (0x[0-9A-F]+) ([0-9A-F]+) ",
                          f.console)}
    decoded = {t["signature"]: (int(t["address"], 16), t["length"])
               for t in tables["acpi"]["tables"]}
    decoded["RSDP"] = (int(tables["acpi"]["rsdp"]["address"], 16), tables["acpi"]["rsdp"]["length"])
    assert printed == decoded
    assert all(t["checksum_ok"] for t in tables["acpi"]["tables"])
    lapics = [r for r in tables["acpi"]["madt"] if r["type"] == "local_apic"]
    assert [r["apic_id"] for r in lapics] == list(range(cpus))
    assert [c["bsp"] for c in tables["mptable"]["cpus"]] == [True] + [False] * (cpus - 1)
    # The e820 map the kernel printed is the one dump-regs read back from guest memory.
    assert printed_e820(f.console) == [
        (int(e["start"], 16), int(e["end"], 16), e["type"]) for e in tables["e820"]["entries"]]


def test_guest_sees_all_memory_on_both_sides_of_the_gap(stock_boots: StockBoots,
                                                         user_syscalls: tuple[bool, str]) -> None:
    f = stock_boots["smp2-5g"]
    usable = [e for e in e820.memory_map(e820.ram_layout(5 << 30)) if e.type == e820.E820_RAM]
    assert any(e.address >= 1 << 32 for e in usable)
    assert "Normal   [mem 0x0000000100000000-0x000000017fffffff]" in f.console
    total = kernel_total_kib(5 << 30)
    assert printed_memory_total_kib(f.console) == total
    if user_syscalls[0]:
        # MemTotal: what is left after the kernel image and its early reservations.
        memtotal = int(f.facts["memtotal_kb"])
        assert total - 300 * 1024 < memtotal <= total
