"""``milestones``: process start to the stock kernel's console milestones and the init marker.

One harness (``bench.harness``) spawns each VMM, reads its serial output from a pipe and
timestamps the first line matching each regex, for both tools alike. The inputs are Debian's
cloud kernel (ELF vmlinux and bzImage) and the marker initramfs.

Per round (A B A B ..., no warm-up by default: one stock boot takes minutes here):

* ``pvh``: vmm-arch ``boot vmlinux --boot-protocol pvh`` vs QEMU ``-M microvm`` loading the same
  ELF through its PVH note. The same vmm-arch run is also paired with QEMU under TCG
  (``-accel tcg -cpu max``) and with QEMU's own defaults (vmm-arch's defaults pick exactly this
  protocol and command line; the table says so after checking).
* ``bzimage``: vmm-arch ``boot bzImage --boot-protocol linux64`` vs QEMU ``-M pc`` with it.
* ``elf64``: vmm-arch ``boot vmlinux --boot-protocol linux64``; QEMU has no such path (it loads an
  ELF only through PVH), so it is paired with the same round's QEMU PVH run.

Identical inputs: QEMU gets exactly vmm-arch's command line (``dump-regs --json``), and
``-cpu host`` minus vmm-arch's CPU mask (plus what ``-cpu host`` needs to start on this KVM).
QEMU pauses on a KVM internal error; the harness kills it there (``-no-reboot`` keeps it from
booting again after a reset).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench import harness, inputs, peers
from bench.cases import Context, Settings
from bench.stats import CaseResult, Sample, Table, paired_row

NAME = "milestones"
DEFAULTS = Settings(runs=2, warmup=0)
QUICK = Settings(runs=1, warmup=0, quick=True)
CONFIGS = ("pvh", "bzimage", "elf64", "emulate", "emulate-bzimage")
#: Which configurations to run; set by the command line (--milestone-configs).
SELECTED: tuple[str, ...] = CONFIGS

MILESTONES = {
    "linux_version": r"Linux version ",
    "memory": r"Memory: ",
    "x86_fpu": r"x86/fpu: ",
    "run_init": r"Run /init",
    "marker": r"VMM-INIT-REACHED",
    "internal_error": peers.KVM_INTERNAL_ERROR,
}
ROW_METRICS = ("linux_version", "memory", "x86_fpu", "marker", "end", "peak_rss_mib",
               "cpu_s")
#: The software CPU against QEMU's, to the init marker (both exit there).
EMULATE_METRICS = ("linux_version", "memory", "x86_fpu", "run_init", "marker", "peak_rss_mib",
                   "cpu_s")
EMULATE_TIMEOUT = 120.0
VMM_ARCH_TIMEOUT = 1500.0
QEMU_KVM_TIMEOUT = 400.0
QEMU_TCG_TIMEOUT = 120.0


def _sample(run: harness.ProcessRun) -> Sample:
    sample = dict(run.milestones)
    sample["end"] = run.wall
    sample["peak_rss_mib"] = run.maxrss_kib / 1024
    sample["cpu_s"] = run.cpu_seconds
    return sample


def _log(name: str) -> Path:
    """Where a run's whole output goes (build/bench/console/), to see why a boot was slow."""
    path = inputs.WORK_DIR / "console" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _vmm_arch(kernel: Path, initrd: Path, protocol: str, cmdline: str,
              backend: str = "kvm", *extra: str) -> Sample:
    timeout = VMM_ARCH_TIMEOUT if backend == "kvm" else EMULATE_TIMEOUT
    argv = inputs.vmm_arch_argv("boot", str(kernel), "--initrd", str(initrd),
                                "--boot-protocol", protocol, "--cmdline", cmdline,
                                "--backend", backend, "--timeout", str(int(timeout - 60)),
                                *extra)
    run = harness.measure(argv, MILESTONES, timeout=timeout, env=inputs.vmm_arch_env(),
                          log=_log(f"vmm-arch-{backend}-{kernel.name}-{protocol}"))
    if run.returncode != 0:
        # Still a result (the milestones it reached), but say what happened.
        print(f"  vmm-arch {kernel.name} ({protocol}) exited {run.returncode}: "
              f"{run.describe_tail(3)}", file=sys.stderr)
    return _sample(run)


def _qemu(argv: list[str], timeout: float, name: str) -> Sample:
    run = harness.measure(argv, MILESTONES, timeout=timeout, log=_log(name),
                          kill_on={"internal_error": peers.KVM_INTERNAL_ERROR,
                                   "marker": MILESTONES["marker"]})
    return _sample(run)


def run(ctx: Context) -> CaseResult:
    s = ctx.settings
    stock = ctx.inputs.stock()
    plan = ctx.inputs.plan(stock.vmlinux)
    qemu = ctx.inputs.qemu()
    cmdline = plan.cmdline
    cpu = ctx.inputs.host_cpu(qemu, plan.cpu_mask) if qemu is not None else ""
    own_cpu = ctx.inputs.host_cpu(qemu) if qemu is not None else ""
    results: dict[str, list[Sample | None]] = {
        k: [] for k in ("pvh", "bzimage", "elf64", "emulate", "emulate_bz", "q_pvh", "q_bz",
                        "q_tcg", "q_own", "q_tcg_emu", "q_tcg_bz")}

    tcg_extra = peers.tcg_tsc_parameter()
    peer: dict[str, list[str]] = {}
    if qemu is not None:
        elf, initrd = stock.vmlinux, stock.initrd
        peer = {
            "q_pvh": peers.direct_boot(qemu.path, machine=peers.MICROVM, append=cmdline,
                                       cpu=cpu, kernel=elf, initrd=initrd),
            "q_tcg": peers.direct_boot(qemu.path, machine=peers.MICROVM,
                                       append=f"{cmdline} {tcg_extra}", accel="tcg",
                                       cpu="max", kernel=elf, initrd=initrd),
            "q_own": peers.direct_boot(qemu.path, machine="microvm", append="console=ttyS0",
                                       cpu=own_cpu, kernel=elf, initrd=initrd),
            "q_bz": peers.direct_boot(qemu.path, machine="pc", kernel=stock.bzimage,
                                      initrd=stock.initrd, append=cmdline, cpu=cpu),
            # The bzImage under TCG: SeaBIOS and QEMU's Linux loader, then the kernel's own
            # decompressor (QEMU has no other way to boot it).
            "q_tcg_bz": peers.direct_boot(qemu.path, machine="pc", kernel=stock.bzimage,
                                          initrd=stock.initrd, append=f"{cmdline} {tcg_extra}",
                                          accel="tcg", cpu="max"),
        }

    def q(key: str, timeout: float) -> Sample | None:
        return _qemu(peer[key], timeout, key.replace("q_", "qemu-")) if key in peer else None

    total = s.warmup + s.runs
    for i in range(total):
        keep = i >= s.warmup
        tag = f"milestones round {i + 1}/{total}" + ("" if keep else " (warm-up)")
        got: dict[str, Sample | None] = {}
        if "pvh" in SELECTED or "elf64" in SELECTED:
            if "pvh" in SELECTED:
                ctx.say(f"{tag}: vmm-arch vmlinux via PVH (minutes)")
                got["pvh"] = _vmm_arch(stock.vmlinux, stock.initrd, "pvh", cmdline)
            ctx.say(f"{tag}: QEMU microvm, vmlinux via PVH, KVM")
            got["q_pvh"] = q("q_pvh", QEMU_KVM_TIMEOUT)
            if "pvh" in SELECTED:
                ctx.say(f"{tag}: QEMU microvm, vmlinux via PVH, TCG")
                got["q_tcg"] = q("q_tcg", QEMU_TCG_TIMEOUT)
                ctx.say(f"{tag}: QEMU microvm with its own defaults, KVM")
                got["q_own"] = q("q_own", QEMU_KVM_TIMEOUT)
        if "bzimage" in SELECTED:
            ctx.say(f"{tag}: vmm-arch bzImage via the Linux boot protocol (minutes)")
            # The kernel's own decompressor, as QEMU runs it: identical work on both sides.
            got["bzimage"] = _vmm_arch(stock.bzimage, stock.initrd, "linux64", cmdline, "kvm",
                                       "--decompress", "guest")
            ctx.say(f"{tag}: QEMU pc, bzImage, KVM")
            got["q_bz"] = q("q_bz", QEMU_KVM_TIMEOUT)
        if "elf64" in SELECTED:
            ctx.say(f"{tag}: vmm-arch vmlinux via the 64-bit Linux boot protocol (minutes)")
            got["elf64"] = _vmm_arch(stock.vmlinux, stock.initrd, "linux64", cmdline)
        if "emulate" in SELECTED:
            ctx.say(f"{tag}: vmm-arch --backend emulate, vmlinux via PVH")
            got["emulate"] = _vmm_arch(stock.vmlinux, stock.initrd, "pvh", cmdline,
                                       backend="emulate")
            ctx.say(f"{tag}: QEMU microvm, vmlinux via PVH, TCG (the emulate pair)")
            got["q_tcg_emu"] = q("q_tcg", QEMU_TCG_TIMEOUT)
        if "emulate-bzimage" in SELECTED:
            ctx.say(f"{tag}: vmm-arch --backend emulate, bzImage (decompressed as auto picks)")
            got["emulate_bz"] = _vmm_arch(stock.bzimage, stock.initrd, "linux64", cmdline,
                                          backend="emulate")
            ctx.say(f"{tag}: QEMU pc, bzImage, TCG (the emulate bzImage pair)")
            got["q_tcg_bz"] = q("q_tcg_bz", QEMU_TCG_TIMEOUT)
        if keep:
            for key in got:
                results[key].append(got[key])

    def rows(table: Table, a_key: str, b_key: str, label: str,
             metrics: tuple[str, ...] = ROW_METRICS) -> None:
        a_runs = [r for r in results[a_key] if r is not None]
        b_runs = results[b_key] if results[b_key] else [None] * len(a_runs)
        for metric in metrics:
            unit = "MiB" if metric == "peak_rss_mib" else "s"
            table.rows.append(paired_row(metric, unit, a_runs, b_runs, note=label))

    tables: list[Table] = []
    same = Table("stock kernel, identical inputs, both on KVM", "vmm-arch", "QEMU")
    if "pvh" in SELECTED:
        rows(same, "pvh", "q_pvh", "vmlinux via PVH / QEMU microvm PVH")
    if "bzimage" in SELECTED:
        rows(same, "bzimage", "q_bz", "bzImage / QEMU pc bzImage")
    if "elf64" in SELECTED:
        rows(same, "elf64", "q_pvh", "vmlinux via 64-bit Linux protocol / QEMU microvm PVH")
    same.notes += [
        f"kernel {stock.version}; cmdline (both): {cmdline}",
        f"QEMU -cpu {cpu}",
        "target: each common milestone <= 1.0x QEMU",
        "end: vmm-arch exits through the exit port after the marker; QEMU under KVM is killed "
        "at its death (KVM internal error at the int3 self-test on a ring-0-emulating KVM), so "
        "the 'end' ratio compares different end points",
    ]
    tables.append(same)
    if "pvh" in SELECTED:
        default_plan = ctx.inputs.plan(stock.vmlinux)
        own = Table("stock kernel, each tool's own defaults, KVM", "vmm-arch boot vmlinux",
                    "QEMU -M microvm -cpu host, console=ttyS0")
        rows(own, "pvh", "q_own", "own defaults")
        own.notes += [
            "vmm-arch's defaults (auto protocol, default cmdline) resolve to protocol "
            f"{default_plan.protocol!r} and the cmdline above, so its PVH run serves here",
            f"QEMU -cpu {own_cpu} (-arch-capabilities only when this KVM needs it to start)",
            "target: each common milestone <= 0.7x QEMU",
        ]
        tables.append(own)
        tcg = Table("headline: vmm-arch on KVM vs QEMU TCG, identical inputs", "vmm-arch (KVM)",
                    "QEMU microvm -accel tcg -cpu max")
        rows(tcg, "pvh", "q_tcg", "vmlinux via PVH")
        tcg.notes.append(f"QEMU under TCG gets `{tcg_extra}` appended: microvm has no PIT/HPET "
                         "reference for TSC calibration under TCG, and without it the guest "
                         "hangs after 'Marking TSC unstable'")
        tables.append(tcg)
    if "emulate" in SELECTED:
        emu = Table("software CPUs: vmm-arch emulate vs QEMU TCG, identical inputs",
                    "vmm-arch --backend emulate", "QEMU microvm -accel tcg -cpu max")
        rows(emu, "emulate", "q_tcg_emu", "vmlinux via PVH", EMULATE_METRICS)
        emu.notes += [
            "both run to the init marker; vmm-arch then exits through the port, QEMU is killed",
            "target (issue 16): the init marker <= 0.7x QEMU TCG (issue 9 asked <= 1.0x)",
            "vmm-arch's unicorn library: "
            + inputs.engine_choice(),
        ]
        tables.append(emu)
    if "emulate-bzimage" in SELECTED:
        emu_bz = Table("software CPUs, the bzImage: vmm-arch emulate vs QEMU TCG",
                       "vmm-arch --backend emulate", "QEMU pc -accel tcg -cpu max")
        rows(emu_bz, "emulate_bz", "q_tcg_bz", "bzImage", EMULATE_METRICS)
        emu_bz.notes += [
            "vmm-arch decompresses the payload on the host (--decompress auto on emulate; the "
            "vmlinux cached after the first run, docs/decompression.md); QEMU runs SeaBIOS, "
            "its loader and the kernel's own decompressor",
            "target (issue 16): the init marker <= 0.7x QEMU TCG",
        ]
        tables.append(emu_bz)
    result = CaseResult(NAME, tables)
    if qemu is None:
        result.notes.append(f"no peer: {ctx.inputs.qemu_error}")
    return result
