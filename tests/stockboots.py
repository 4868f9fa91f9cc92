"""Every boot of the stock kernel the test suite makes, started at once.

A boot of Debian's kernel takes minutes on a KVM that emulates guest ring 0 and each is one
busy vCPU thread, so the suite starts all of them together when the first stock test needs
one, and each test module reads the finished boot it asserts on. One boot checks many things.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vmmarch_cli.arch.x86_64 import e820

#: Seconds each boot may take. Alone a boot to init takes 7-8 minutes on a PVM host; all of
#: them at once on two host cores take about 20.
TIMEOUT = 2100
#: Where the kernel-side checks of an SMP boot are all printed (kernel/smp.c, smp_cpus_done):
#: on a KVM that cannot run user processes these boots stop there instead of at init.
SMP_DONE = "smp: Brought up"


def init_facts(console: str) -> dict[str, str]:
    """The VMMARCH-FACT lines of the marker /init (vmmarch_cli/initramfs.py), by name."""
    return dict(re.findall(r"^VMMARCH-FACT (\w+) (.*?)\r?$", console, re.M))


def printed_e820(console: str) -> list[tuple[int, int, str]]:
    """(first, last, type) of each "BIOS-e820: [mem A-B] type" line the kernel printed."""
    return [(int(a, 16), int(b, 16), t) for a, b, t in
            re.findall(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] (\w+)", console)]


def pipeline_e820(mem: int) -> list[tuple[int, int, str]]:
    """The e820 map the pipeline writes for ``mem`` bytes, as the kernel prints it."""
    return [(e.address, e.end - 1, "usable" if e.type == e820.E820_RAM else "reserved")
            for e in e820.memory_map(e820.ram_layout(mem))]


def kernel_total_kib(mem: int) -> int:
    """The total of the kernel's "Memory: .../<total>K available" line for ``mem`` bytes: every
    whole page of the usable e820 ranges, less page 0, which the kernel reserves for itself
    (arch/x86/kernel/setup.c, e820__update_table for the first page)."""
    usable = [e for e in e820.memory_map(e820.ram_layout(mem)) if e.type == e820.E820_RAM]
    return (sum(e.end // 4096 - -(-e.address // 4096) for e in usable) - 1) * 4


def printed_memory_total_kib(console: str) -> int | None:
    m = re.search(r"Memory: \d+K/(\d+)K available", console)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Spec:
    """One boot: argv after ``python -m vmmarch_cli`` with {vmlinux}, {bzimage}, {initramfs}
    and {log} filled in; ``userspace_only`` boots start only where user processes can run;
    ``kernel_only_args`` are added where they cannot (to stop at a kernel milestone)."""

    argv: tuple[str, ...]
    userspace_only: bool = False
    kernel_only_args: tuple[str, ...] = ()


def _boot(*extra: str) -> tuple[str, ...]:
    return ("boot", "--backend", "kvm", "--initrd", "{initramfs}", "--json", "--quiet",
            "--console-log", "{log}", *extra)


SPECS: dict[str, Spec] = {
    # The same kernel, initramfs and cmdline three ways (issue 2: ELF through the 64-bit Linux
    # protocol; issue 4: ELF through PVH, and the bzImage, which decompresses itself: without
    # --decompress guest a KVM that emulates ring 0 would decompress it on the host).
    "elf-linux64": Spec(_boot("{vmlinux}", "--boot-protocol", "linux64")),
    "elf-pvh": Spec(_boot("{vmlinux}", "--boot-protocol", "pvh")),
    "bzimage": Spec(_boot("{bzimage}", "--boot-protocol", "linux64", "--decompress", "guest")),
    # Issue 6: SMP through ACPI (the cloud kernel has no MP-table parser) on both protocols,
    # and memory on both sides of the 32-bit gap.
    "smp2-5g": Spec(_boot("{vmlinux}", "--boot-protocol", "pvh", "--cpus", "2", "--mem", "5G"),
                    kernel_only_args=("--expect", SMP_DONE)),
    "smp4": Spec(_boot("{vmlinux}", "--boot-protocol", "linux64", "--cpus", "4"),
                 kernel_only_args=("--expect", SMP_DONE)),
    # Issue 5: `run` exit statuses and streams, and a panic that must never read as success.
    "run-true": Spec(("run", "--backend", "kvm", "{vmlinux}", "--", "true"),
                     userspace_only=True),
    "run-false": Spec(("run", "--backend", "kvm", "{vmlinux}", "--", "false"),
                      userspace_only=True),
    "run-exit7": Spec(("run", "--backend", "kvm", "{vmlinux}", "--", "sh", "-c",
                       "echo to-stdout; echo to-stderr >&2; exit 7"), userspace_only=True),
    # rdinit names a program that does not exist: the kernel falls back to mounting a root
    # file system, finds none and panics ("VFS: Unable to mount root fs", init/do_mounts.c);
    # panic=-1 resets at once.
    "panic": Spec(("boot", "--backend", "kvm", "{vmlinux}", "--initrd", "{initramfs}", "--append",
                   "rdinit=/nonexistent init=/nonexistent")),
}


@dataclass
class Finished:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    console: str  # the --console-log file, if the boot wrote one
    facts: dict[str, str] = field(default_factory=dict)  # VMMARCH-FACT lines from /init


class StockBoots:
    """Started boots by name; reading one waits for it (and keeps the result)."""

    def __init__(self, inputs: dict[str, Path], out: Path, userspace: bool, cwd: Path,
                 wanted: set[str]) -> None:
        self._procs: dict[str, tuple[subprocess.Popen[str], list[str], Path]] = {}
        self._done: dict[str, Finished] = {}
        unknown = wanted - SPECS.keys()
        if unknown:
            raise ValueError(f"no stock boot named {', '.join(sorted(unknown))}")
        for name, spec in SPECS.items():
            if name not in wanted or (spec.userspace_only and not userspace):
                continue
            log = out / f"{name}.log"
            values = {**{k: str(v) for k, v in inputs.items()}, "log": str(log)}
            argv = [a.format(**values) for a in spec.argv]
            argv[1:1] = ["--timeout", str(TIMEOUT)]  # right after the subcommand
            if not userspace:
                argv += spec.kernel_only_args
            cmd = [sys.executable, "-m", "vmmarch_cli", *argv]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=cwd)
            self._procs[name] = (proc, argv, log)

    def __getitem__(self, name: str) -> Finished:
        if name not in self._done:
            proc, argv, log = self._procs[name]
            stdout, stderr = proc.communicate(timeout=TIMEOUT + 120)
            console = log.read_text(errors="replace") if log.exists() else ""
            self._done[name] = Finished(argv, proc.returncode, stdout, stderr, console,
                                        init_facts(console))
        return self._done[name]

    def stop_all(self) -> None:
        for proc, _, _ in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
