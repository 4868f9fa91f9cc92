"""One boot of Debian's stock cloud kernel to the busybox init marker on the real /dev/kvm.

Guest kernel code is emulated on a PVM host (about 1000x slower than native), so each boot
takes minutes; they run once per session (tests/stockboots.py) and every test below reads the
same records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from stockboots import (
    StockBoots,
    kernel_total_kib,
    pipeline_e820,
    printed_e820,
    printed_memory_total_kib,
)

pytestmark = [pytest.mark.stock, pytest.mark.usefixtures("kvm")]

MARKER = "VMM-INIT-REACHED"


@dataclass
class Boot:
    returncode: int
    result: dict  # the --json document
    console: str
    facts: dict[str, str]
    initrd: Path


#: The same kernel, initramfs and cmdline three ways (tests/stockboots.py).
WAYS = ("elf-linux64", "elf-pvh", "bzimage")
STOCK_BOOTS = WAYS


@pytest.fixture(scope="module")
def boots(stock: dict[str, Path], stock_boots: StockBoots) -> dict[str, Boot]:
    boots = {}
    for way in WAYS:
        f = stock_boots[way]
        assert f.stdout.strip(), f"{way}: no JSON result; stderr: {f.stderr[-2000:]}"
        boots[way] = Boot(f.returncode, json.loads(f.stdout), f.console, f.facts,
                          stock["initramfs"])
    return boots


@pytest.fixture(params=WAYS)
def boot(request: pytest.FixtureRequest, boots: dict[str, Boot]) -> Boot:
    return boots[request.param]


def test_kernel_hands_over_to_init(boot: Boot) -> None:
    assert "Run /init as init process" in boot.console, boot.console[-3000:]


def test_userspace_reports_through_the_exit_port(boot: Boot,
                                                 user_syscalls: tuple[bool, str]) -> None:
    """With working user system calls, /init prints the marker and exits 0 through the port.
    On a KVM whose SYSCALL from ring 3 never enters ring 0 (kvm_pvm), init's first system call
    faults, the kernel panics ("Attempted to kill init") and vmm-arch must say so: 255."""
    works, _ = user_syscalls
    if works:
        assert MARKER in boot.console, boot.console[-3000:]
        assert boot.result["reason"] == "exit-port", boot.result
        assert boot.result["guest_exit_code"] == 0 and boot.returncode == 0
    else:
        # The kernel's own entry_SYSCALL_64 (wherever KASLR put it), fetched in user mode.
        assert re.search(r"init\[1\]: segfault at (ffffffff[0-9a-f]+) ip \1 ", boot.console)
        assert "Attempted to kill init" in boot.console
        assert (boot.result["reason"], boot.returncode) == ("panic", 255)


def test_kernel_command_line_is_ours(boot: Boot, user_syscalls: tuple[bool, str]) -> None:
    ours = boot.result["cmdline"]
    assert f"Command line: {ours}" in boot.console
    if user_syscalls[0]:
        assert boot.facts["cmdline"] == ours


def test_kernel_e820_map_matches_the_pipeline(boot: Boot) -> None:
    assert printed_e820(boot.console) == pipeline_e820(256 << 20)


def test_initrd_range_matches_placement(boot: Boot) -> None:
    size = boot.initrd.stat().st_size
    top = 256 << 20
    start = (top - size) & ~0xFFF
    m = re.search(r"RAMDISK: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\]", boot.console)
    assert m, "kernel did not report the initrd"
    # The kernel prints the page-aligned range it reserved.
    assert int(m.group(1), 16) == start
    assert int(m.group(2), 16) == ((start + size + 0xFFF) & ~0xFFF) - 1


def test_cpu_count_and_memory_seen_by_the_guest(boot: Boot,
                                                user_syscalls: tuple[bool, str]) -> None:
    assert "smpboot: Allowing 1 CPUs" in boot.console
    assert printed_memory_total_kib(boot.console) == kernel_total_kib(256 << 20)
    if user_syscalls[0]:
        assert boot.facts["nproc"] == "1"
        assert boot.facts["online"] == "0"
        assert 200_000 < int(boot.facts["memtotal_kb"]) < 262_144


def test_milestones_in_order(boot: Boot) -> None:
    t = boot.result["timings"]
    assert t["linux_banner"] < t["memory_line"] < t["run_init"] < t["total"]
    if "Decompressing" not in boot.console:  # a bzImage's decompressor prints first
        assert t["first_console_byte"] <= t["linux_banner"]


def test_boot_protocol_reported(boots: dict[str, Boot]) -> None:
    assert boots["elf-linux64"].result["kernel"]["boot_protocol"] == "linux64"
    assert boots["elf-pvh"].result["kernel"]["boot_protocol"] == "pvh"
    assert boots["bzimage"].result["kernel"]["format"] == "bzimage"
    assert "Decompressing Linux" in boots["bzimage"].console or \
        "Linux version" in boots["bzimage"].console


def test_workarounds_were_needed_and_used_on_this_host(boot: Boot) -> None:
    """On a ring-0-emulating KVM the int3 self-test is completed by injection; on hardware
    KVM no event is injected and no mask applies."""
    from vmmarch_cli.backends.kvm.system import host_needs_ring0_workarounds

    if host_needs_ring0_workarounds():
        assert boot.result["injected_events"].get("int3", 0) >= 1
        assert "clearcpuid=" in boot.result["cmdline"]
        assert "mitigations=off" in boot.result["cmdline"]
    else:
        assert boot.result["injected_events"] == {}
        assert boot.result["cpu_mask"] == []


def test_json_result_validates(boot: Boot) -> None:
    import jsonschema

    from conftest import ROOT

    schema = json.loads((ROOT / "docs" / "result.schema.json").read_text())
    jsonschema.validate(boot.result, schema)
