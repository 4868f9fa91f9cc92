"""Debian's stock cloud kernel on the software CPU (``--backend emulate``, issue 9): to the
busybox init marker four ways (the ELF through both protocols, the bzImage decompressed by its
own decompressor and by the host), the same facts as the kernel prints on KVM, and ``run``'s
exit status and streams. Each boot takes seconds here (against minutes on this host's KVM)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmmarch_cli.arch.x86_64 import acpi, e820

from conftest import ROOT
from stockboots import (
    StockBoots,
    init_facts,
    kernel_total_kib,
    pipeline_e820,
    printed_e820,
    printed_memory_total_kib,
)

pytestmark = [pytest.mark.stock]

MARKER = "VMM-INIT-REACHED"
#: The KVM boot whose kernel log the emulated boots are compared with (tests/stockboots.py).
STOCK_BOOTS = ("elf-linux64",)
#: Seconds a boot may take: ~6 s alone, slower while the KVM boots share the two cores.
TIMEOUT = 600
#: Way -> (kernel, --boot-protocol, --decompress).
WAYS = {"elf-linux64": ("{vmlinux}", "linux64", "auto"), "elf-pvh": ("{vmlinux}", "pvh", "auto"),
        "bzimage": ("{bzimage}", "linux64", "guest"),
        "bzimage-host": ("{bzimage}", "linux64", "host")}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    console: str

    @property
    def result(self) -> dict:  # the --json document
        return json.loads(self.stdout)

    @property
    def facts(self) -> dict[str, str]:
        return init_facts(self.console)


def _vmm(args: list[str], log: Path | None = None) -> Run:
    argv = [sys.executable, "-m", "vmmarch_cli", *args]
    if log is not None:
        argv[4:4] = ["--console-log", str(log)]  # right after the subcommand
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT + 60)
    console = log.read_text(errors="replace") if log is not None and log.exists() else ""
    return Run(p.returncode, p.stdout, p.stderr, console)


@pytest.fixture(scope="module")
def boots(stock: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    out = tmp_path_factory.mktemp("emulate")
    done = {}
    for way, (kernel, protocol, decompress) in WAYS.items():
        done[way] = _vmm(["boot", "--backend", "emulate", "--timeout", str(TIMEOUT), "--initrd",
                          str(stock["initramfs"]), "--json", "--quiet", "--boot-protocol",
                          protocol, "--decompress", decompress,
                          kernel.format(**{k: str(v) for k, v in stock.items()})],
                         out / f"{way}.log")
    return done


@pytest.fixture(params=list(WAYS))
def boot(request: pytest.FixtureRequest, boots: dict[str, Run]) -> Run:
    return boots[request.param]


def test_init_marker_and_exit_through_the_port(boot: Run) -> None:
    assert MARKER in boot.console, boot.console[-3000:]
    assert (boot.result["reason"], boot.result["guest_exit_code"], boot.returncode) == \
        ("exit-port", 0, 0), boot.stderr[-2000:]
    assert boot.result["backend"] == "emulate"


def test_init_reports_the_facts_of_this_vm(boot: Run) -> None:
    facts = boot.facts
    assert facts["cmdline"] == boot.result["cmdline"]
    assert facts["nproc"] == "1" and facts["online"] == "0"
    assert 200_000 < int(facts["memtotal_kb"]) < 262_144


def test_e820_and_memory_as_the_pipeline_wrote_them(boot: Run) -> None:
    assert printed_e820(boot.console) == pipeline_e820(256 << 20)
    assert "smpboot: Allowing 1 CPUs" in boot.console


def test_the_kernel_sees_the_same_machine_on_kvm(boots: dict[str, Run], stock_boots: StockBoots
                                                 ) -> None:
    """The same kernel, initramfs and command line on both backends prints the same memory
    map, memory total, CPU count and ACPI configuration: one pipeline, two CPUs under it."""
    kvm = stock_boots["elf-linux64"].console
    emulated = boots["elf-linux64"].console
    patterns = [r"BIOS-e820: .*", r"Memory: \d+K/(\d+K) available", r"smpboot: Allowing \d+ CPUs",
                r"ACPI: Using ACPI \(MADT\).*", r"ACPI: INT_SRC_OVR .*", r"IOAPIC\[0\]: .*",
                r"RAMDISK: .*"]
    for pattern in patterns:
        on_kvm = re.findall(pattern, kvm)
        assert on_kvm, f"the KVM boot printed no {pattern!r}"
        assert re.findall(pattern, emulated) == on_kvm, pattern


def test_the_host_decompressed_bzimage_skips_the_kernels_decompressor(
        boots: dict[str, Run]) -> None:
    """The kernel's decompressor, when it randomizes the kernel's placement, sets KASLR_FLAG in
    boot_params.hdr.loadflags (arch/x86/boot/compressed/kaslr.c, choose_random_location), and
    only then does the kernel randomize its memory regions too and print "Memory KASLR using
    ..." (arch/x86/mm/kaslr.c, kaslr_memory_enabled). The host-decompressed vmlinux starts at
    its own entry with the bzImage's header, in which the flag is clear: no such line."""
    host, guest = boots["bzimage-host"], boots["bzimage"]
    assert (host.result["kernel"]["entry"], guest.result["kernel"]["entry"]) == \
        ("0x1000000", "0x100200")
    assert host.result["kernel"]["decompress"]["where"] == "host"
    assert host.result["kernel"]["decompress"]["compression"] == "lz4"
    assert guest.result["kernel"]["decompress"]["where"] == "guest"
    assert "Memory KASLR using" in guest.console
    assert "Memory KASLR using" not in host.console


@pytest.mark.parametrize("decompress", ["host", "guest"])
def test_where_the_kernel_runs(stock: dict[str, Path], decompress: str) -> None:
    """From inside the guest: the host-decompressed kernel runs where it was linked (physical
    LOAD_PHYSICAL_ADDR, 16 MiB; virtual __START_KERNEL_map + 16 MiB), as with ``nokaslr``;
    the kernel's own decompressor places it at random (both addresses equal to the linked
    ones by chance: about 1 in 50,000)."""
    r = _vmm(["run", "--backend", "emulate", "--decompress", decompress, "--timeout",
              str(TIMEOUT), str(stock["bzimage"]), "--", "sh", "-c",
              "grep 'Kernel code' /proc/iomem; grep -w _text /proc/kallsyms"])
    assert r.returncode == 0, r.stderr[-2000:]
    physical = re.search(r"^\s*([0-9a-f]+)-[0-9a-f]+ : Kernel code$", r.stdout, re.MULTILINE)
    virtual = re.search(r"^([0-9a-f]{16}) T _text$", r.stdout, re.MULTILINE)
    assert physical and virtual, r.stdout
    linked = (0x100_0000, 0xFFFF_FFFF_8100_0000)
    placed = (int(physical.group(1), 16), int(virtual.group(1), 16))
    assert (placed == linked) == (decompress == "host"), placed


def test_boot_params_carry_debians_setup_header(stock: dict[str, Path]) -> None:
    """The guest finds the bzImage's own setup header in boot_params (code32_start aside: the
    loader's, saying where the kernel is; cmdline_size: the length vmm-arch gives every
    kernel), read back from guest memory before the guest runs."""
    from vmmarch_cli import loader, machine
    from vmmarch_cli.arch.x86_64 import boot_params, layout
    from vmmarch_cli.config import BootConfig
    from vmmarch_cli.loader.host_decompress import Decompress

    image = stock["bzimage"].read_bytes()
    config = BootConfig(kernel=stock["bzimage"], backend="emulate", decompress=Decompress.HOST)
    with machine.prepare(config, quiet=True) as prepared:
        page = prepared.vm.memory.read(layout.ZERO_PAGE_START, boot_params.ZERO_PAGE_SIZE)
    bz = loader.parse_kernel(stock["bzimage"]).bzimage
    assert bz is not None
    header_end = boot_params.SETUP_HEADER_START + len(bz.header.raw)
    written = {"code32_start", "type_of_loader", "cmd_line_ptr", "cmdline_size",
               "ramdisk_image", "ramdisk_size"}
    for name, (offset, _) in boot_params.FIELDS.items():
        if boot_params.SETUP_HEADER_START <= offset < header_end and name not in written:
            assert boot_params.get(page, name) == boot_params.get(
                image[: boot_params.ZERO_PAGE_SIZE], name), name
    assert boot_params.get(page, "code32_start") == 0x100_0000
    assert boot_params.get(page, "version") == 0x020F


def test_com_ports_get_their_irqs_through_acpi(boot: Run) -> None:
    """A hardware-reduced kernel binds the COM ports from the DSDT (aml.py), with IRQs routed
    through the I/O APIC; the console then works as a tty, which is how init's lines got out.
    (`boot` emulates COM1 only: the other two are described and found absent; `run` has all
    three, tested below through the command's streams.)"""
    assert f"pnp: PnP ACPI: found {len(acpi.COM_PORTS)} devices" in boot.console
    com1 = acpi.COM_PORTS[0]
    assert re.search(rf"ttyS0 at I/O {com1.io_base:#x} \(irq = \d+", boot.console)
    assert any(name.startswith("interrupt 0x") and name != "interrupt 0xec"
               for name in boot.result["injected_events"]), boot.result["injected_events"]


def test_run_exit_status_and_streams(stock: dict[str, Path]) -> None:
    r = _vmm(["run", "--backend", "emulate", "--timeout", str(TIMEOUT), str(stock["vmlinux"]),
              "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"])
    assert r.returncode == 7, r.stderr[-2000:]
    assert r.stdout == "to-stdout\n"
    assert "to-stderr" in r.stderr and "to-stdout" not in r.stderr


def test_run_streams_with_two_vcpus(stock: dict[str, Path], tmp_path: Path) -> None:
    """The command's stdout (COM2, IRQ 3) with two vCPUs: Linux may route the IRQ to CPU 1, so
    the I/O APIC must deliver to the CPU its redirection entry names (vm.py); delivered to
    CPU 0 the output was lost and init waited ~30 s for the tty to drain."""
    r = _vmm(["run", "--backend", "emulate", "--cpus", "2", "--timeout", str(TIMEOUT),
              str(stock["vmlinux"]), "--", "sh", "-c",
              "echo to-stdout; echo to-stderr >&2; exit 3"], tmp_path / "console.log")
    # The kernel log's tail says what a stuck vCPU was doing (an RCU stall names it).
    assert r.returncode == 3, r.stderr[-2000:] + "\nkernel log:\n" + r.console[-6000:]
    assert r.stdout == "to-stdout\n"
    assert "to-stderr" in r.stderr


@pytest.mark.parametrize(("command", "status"), [("true", 0), ("false", 1)])
def test_run_true_and_false(stock: dict[str, Path], command: str, status: int) -> None:
    r = _vmm(["run", "--backend", "emulate", "--timeout", str(TIMEOUT), str(stock["vmlinux"]),
              "--", command])
    assert r.returncode == status, r.stderr[-2000:]


def test_panic_never_reads_as_success(stock: dict[str, Path]) -> None:
    """No initramfs: the kernel panics looking for a root file system; status 255, as on KVM
    (tests/stock/test_stock_run.py)."""
    r = _vmm(["boot", "--backend", "emulate", "--timeout", str(TIMEOUT), "--quiet",
              str(stock["vmlinux"])])
    assert r.returncode == 255, r.stderr[-2000:]
    assert re.search(r"vmm-arch: panic \(status 255\): .*Kernel panic - not syncing: "
                     r"VFS: Unable to mount root fs", r.stderr), r.stderr[-2000:]


def test_user_processes_keep_every_system_call(stock: dict[str, Path], tmp_path: Path) -> None:
    """80 processes each read a 1 MiB file and hash it in ring 3 while the timer interrupts
    them: every sum equals the host's. A stop from another thread once made unicorn skip the
    SYSCALL hook (native.Kick): read(2) then "returned" 0 and the sums differed within a boot."""
    data = tmp_path / "data.bin"
    data.write_bytes(random.Random(9).randbytes(1 << 20))
    want = f"{hashlib.md5(data.read_bytes(), usedforsecurity=False).hexdigest()}  /root/data.bin"
    r = _vmm(["run", "--backend", "emulate", "--timeout", str(TIMEOUT), "--add",
              f"{data}:/root/data.bin", str(stock["vmlinux"]), "--", "sh", "-c",
              "for i in $(seq 1 80); do md5sum /root/data.bin || echo FAILED; done"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [want] * 80


def test_guest_sees_5_gib_on_both_sides_of_the_gap(stock: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """Issue 6's memory checks from inside the guest: MemTotal of a 5 GiB guest (RAM below the
    32-bit MMIO gap and above 4 GiB), and the e820 map the kernel printed equal to what
    `dump-regs --tables` decodes from guest memory."""
    vmlinux = str(stock["vmlinux"])
    r = _vmm(["boot", "--backend", "emulate", "--timeout", str(TIMEOUT), "--mem", "5G",
              "--initrd", str(stock["initramfs"]), "--json", "--quiet", vmlinux],
             tmp_path / "5g.log")
    assert (r.returncode, r.result["reason"]) == (0, "exit-port"), r.stderr[-2000:]
    usable = [e for e in e820.memory_map(e820.ram_layout(5 << 30)) if e.type == e820.E820_RAM]
    assert any(e.address >= 1 << 32 for e in usable)
    total = kernel_total_kib(5 << 30)
    assert printed_memory_total_kib(r.console) == total
    # MemTotal: what is left after the kernel image, its struct pages and early reservations.
    memtotal = int(r.facts["memtotal_kb"])
    assert total - 300 * 1024 < memtotal <= total
    tables = json.loads(_vmm(["dump-regs", "--backend", "emulate", "--mem", "5G", "--tables",
                              "--json", vmlinux]).stdout)["tables"]
    assert printed_e820(r.console) == [
        (int(e["start"], 16), int(e["end"], 16), e["type"]) for e in tables["e820"]["entries"]]


@pytest.fixture(scope="module")
def smp_boots(stock: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[int, Run]:
    out = tmp_path_factory.mktemp("emulate-smp")
    return {cpus: _vmm(["boot", "--backend", "emulate", "--timeout", str(TIMEOUT), "--cpus",
                        str(cpus), "--initrd", str(stock["initramfs"]), "--json", "--quiet",
                        str(stock["vmlinux"])], out / f"smp{cpus}.log")
            for cpus in (2, 4)}


@pytest.mark.parametrize("cpus", [2, 4])
def test_guest_brings_up_every_vcpu_and_sees_them_online(smp_boots: dict[int, Run],
                                                        cpus: int) -> None:
    """Issue 6 from inside the guest: the kernel finds the CPUs through the MADT, wakes the APs
    with INIT/SIPI, and init's /proc/cpuinfo and /sys/devices/system/cpu/online list them all."""
    r = smp_boots[cpus]
    assert (r.returncode, r.result["reason"]) == (0, "exit-port"), r.stderr[-2000:]
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in r.console
    assert f"smpboot: Allowing {cpus} CPUs" in r.console
    assert f"smp: Brought up 1 node, {cpus} CPUs" in r.console
    assert r.facts["nproc"] == str(cpus)
    assert r.facts["online"] == f"0-{cpus - 1}"
    # The APs took interrupts of their own: IPIs (0xfb-0xfd: call function, reschedule).
    events = r.result["injected_events"]
    assert any(events.get(f"interrupt {v:#x}", 0) for v in (0xFB, 0xFC, 0xFD)), events
