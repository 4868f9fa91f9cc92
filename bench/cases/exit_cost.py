"""``exit_cost``: one port-I/O exit round trip through vmm-arch's run loop vs a bare KVM_RUN loop.

Both sides run the ``outloop`` guest (``outloop_count`` x ``out 0x80``, then status 0 to port
0xf4) in this process on a fresh VM each time:

* vmm-arch: ``machine.run(BootConfig(kernel=outloop))``; its ``run`` phase (vCPU thread start to
  stop) divided by the number of I/O exits it counted.
* bare: ``machine.prepare(config)`` for the same VM, then ``system.ioctl(fd, KVM_RUN)`` in a
  loop that reads ``exit_reason`` and the port from ``kvm_run`` until port 0xf4. It uses the
  vCPU's private ``_fd``, which is acceptable for a benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from bench import inputs
from bench.cases import Context, Settings
from bench.stats import CaseResult, Sample, Table, alternate, paired_row
from vmmarch_cli import machine
from vmmarch_cli.arch.x86_64 import board
from vmmarch_cli.backends.kvm import abi, system
from vmmarch_cli.backends.kvm.vcpu import KvmVcpu
from vmmarch_cli.config import BootConfig
from vmmarch_cli.vcpu import GuestMemory

NAME = "exit_cost"
DEFAULTS = Settings(runs=5, warmup=1)
QUICK = Settings(runs=1, warmup=0, quick=True)
COUNT = 100_000
QUICK_COUNT = 2_000
EXIT_PORT = board.EXIT_PORT


def count_address(elf: Path) -> int:
    """Guest-physical address of ``outloop_count`` (the guest is linked with vaddr == paddr)."""
    with elf.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            raise RuntimeError(f"{elf} has no symbol table")
        symbols = symtab.get_symbol_by_name("outloop_count")
        if not symbols:
            raise RuntimeError(f"{elf} has no outloop_count symbol")
        return int(symbols[0]["st_value"])


def _patch(memory: GuestMemory, address: int, count: int) -> None:
    memory.write(address, count.to_bytes(8, "little"))


def through_vmm_arch(elf: Path, address: int, count: int) -> Sample:
    def on_ready(p: machine.Prepared) -> None:
        _patch(p.vm.memory, address, count)

    result = machine.run(BootConfig(kernel=elf, backend="kvm", timeout=120), None,
                         on_ready=on_ready)
    if result.reason != "exit-port" or result.guest_status != 0:
        raise RuntimeError(f"outloop ended with {result.reason}: {result.detail}")
    exits = result.exits["io"]
    if exits != count + 1:
        raise RuntimeError(f"outloop made {exits} I/O exits, expected {count + 1}")
    run_s = result.timings["run"]
    return {"per_exit_us": run_s / exits * 1e6, "run_s": run_s, "exits": float(exits)}


def bare_loop(elf: Path, address: int, count: int) -> Sample:
    with machine.prepare(BootConfig(kernel=elf, backend="kvm")) as p:
        _patch(p.vm.memory, address, count)
        vcpu = p.vcpus[0]
        if not isinstance(vcpu, KvmVcpu):
            raise RuntimeError("the bare loop needs the KVM backend")
        fd = vcpu._fd  # private, on purpose: the benchmark is the raw ioctl
        run = vcpu.run_struct
        ioctl, kvm_run, exit_io = system.ioctl, abi.KVM_RUN, abi.KVM_EXIT_IO
        exits = 0
        t0 = time.perf_counter()
        while True:
            ioctl(fd, kvm_run)
            exits += 1
            if run.exit_reason != exit_io:
                raise RuntimeError(f"bare loop: exit reason {run.exit_reason}")
            if run.exit.io.port == EXIT_PORT:
                break
        elapsed = time.perf_counter() - t0
        del run  # the kvm_run view pins the vCPU mapping; prepare() unmaps it on exit
    if exits != count + 1:
        raise RuntimeError(f"bare loop made {exits} exits, expected {count + 1}")
    return {"per_exit_us": elapsed / exits * 1e6, "run_s": elapsed, "exits": float(exits)}


def run(ctx: Context) -> CaseResult:
    s = ctx.settings
    count = QUICK_COUNT if s.quick else COUNT
    elf = inputs.guest("outloop")
    address = count_address(elf)
    a_runs, b_runs = alternate(
        lambda: through_vmm_arch(elf, address, count),
        lambda: bare_loop(elf, address, count),
        s.runs, s.warmup, lambda label: ctx.say(f"exit_cost: {label}"),
    )
    table = Table(f"port-I/O exit round trip, outloop guest, {count} x out 0x80",
                  "vmm-arch run loop (machine.run)", "bare KVM_RUN loop (same process)")
    table.rows.append(paired_row("per_exit_us", "us", a_runs, b_runs, target="<= 1.2x"))
    table.rows.append(paired_row("run_s", "s", a_runs, b_runs))
    table.notes.append("vmm-arch: its 'run' timing (threads start to join) / its I/O exit count")
    return CaseResult(NAME, [table])
