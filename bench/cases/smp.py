"""``smp``: the stock kernel with 1, 2 and 4 vCPUs and with 256 MiB, 4 GiB and 16 GiB.

vmm-arch boots Debian's cloud vmlinux (PVH, identical command line and CPU mask as in
``milestones``) to the init hand-off (``Run /init``; the last kernel line this KVM lets a stock
kernel reach, docs/limited-kvm.md) and is stopped there with ``--expect``. QEMU (``-M microvm``,
the same ``-smp``/``-m``) runs the same inputs until it dies at the int3 self-test, which comes
before SMP bring-up: the ratios cover the milestones both reach (banner, ``Memory:``), and
``smp: Brought up`` / ``Run /init`` are vmm-arch's alone. Peak RSS for both processes.
"""

from __future__ import annotations

import functools
import sys

from bench import harness, inputs, peers
from bench.cases import Context, Settings
from bench.stats import CaseResult, Sample, Table, alternate, paired_row

NAME = "smp"
DEFAULTS = Settings(runs=1, warmup=0)
QUICK = Settings(runs=1, warmup=0, quick=True)
#: (vCPUs, guest MiB): the vCPU series at 256 MiB, the memory series at 1 vCPU.
CONFIGS = ((1, 256), (2, 256), (4, 256), (1, 4096), (1, 16384))
#: Which configurations to run; set by the command line (--smp-configs).
SELECTED: tuple[tuple[int, int], ...] = CONFIGS
MILESTONES = {
    "linux_version": r"Linux version ",
    "memory": r"Memory: ",
    "smp_up": r"smp: Brought up",
    "run_init": r"Run /init",
}
METRICS = ("linux_version", "memory", "smp_up", "run_init", "peak_rss_mib")
#: Measured here: 1 vCPU reaches Run /init in ~7 min; 4 vCPUs on 2 host cores had not after
#: 33 min (the kernel's cross-CPU work under an emulated ring 0), so each run is capped.
TIMEOUT = 1200.0
QEMU_TIMEOUT = 900.0


def _sample(run: harness.ProcessRun) -> Sample:
    return {**run.milestones, "peak_rss_mib": run.maxrss_kib / 1024}


def _vmm_arch(ctx: Context, cpus: int, mib: int, cmdline: str) -> Sample:
    stock = ctx.inputs.stock()
    argv = inputs.vmm_arch_argv("boot", str(stock.vmlinux), "--initrd", str(stock.initrd),
                                "--boot-protocol", "pvh", "--cmdline", cmdline,
                                "--cpus", str(cpus), "--mem", f"{mib}M",
                                "--expect", MILESTONES["run_init"],
                                "--timeout", str(int(TIMEOUT - 60)))
    run = harness.measure(argv, MILESTONES, timeout=TIMEOUT, env=inputs.vmm_arch_env())
    if run.returncode != 0:
        # Still a result (the milestones it reached): say what happened and go on, so one
        # slow configuration does not lose the others' figures.
        print(f"  vmm-arch --cpus {cpus} --mem {mib}M exited {run.returncode}: "
              f"{run.describe_tail(3)}", file=sys.stderr)
    return _sample(run)


def _qemu(ctx: Context, qemu: peers.Qemu, cpus: int, mib: int, cmdline: str, cpu: str
          ) -> Sample:
    stock = ctx.inputs.stock()
    argv = peers.direct_boot(qemu.path, machine=peers.MICROVM, kernel=stock.vmlinux,
                             initrd=stock.initrd, append=cmdline, cpu=cpu, mem_mib=mib,
                             cpus=cpus)
    run = harness.measure(argv, MILESTONES, timeout=QEMU_TIMEOUT,
                          kill_on={"died": peers.KVM_INTERNAL_ERROR, "run_init": r"Run /init"})
    return _sample(run)


def _say(ctx: Context, label: str, message: str) -> None:
    ctx.say(f"smp {label}: {message}")


def run(ctx: Context) -> CaseResult:
    s = ctx.settings
    stock = ctx.inputs.stock()
    plan = ctx.inputs.plan(stock.vmlinux)
    qemu = ctx.inputs.qemu()
    cpu = ctx.inputs.host_cpu(qemu, plan.cpu_mask) if qemu is not None else ""
    configs = SELECTED[:1] if s.quick else SELECTED
    table = Table("stock kernel: vCPUs and guest size", "vmm-arch (PVH)",
                  "QEMU microvm (PVH), until it dies")
    for cpus, mib in configs:
        label = f"{cpus} vCPU{'s' if cpus > 1 else ''}, {mib} MiB"
        peer = (functools.partial(_qemu, ctx, qemu, cpus, mib, plan.cmdline, cpu)
                if qemu is not None else None)
        say = functools.partial(_say, ctx, label)
        a_runs, b_runs = alternate(functools.partial(_vmm_arch, ctx, cpus, mib, plan.cmdline),
                                   peer, s.runs, s.warmup, say)
        for metric in METRICS:
            unit = "MiB" if metric == "peak_rss_mib" else "s"
            table.rows.append(paired_row(metric, unit, a_runs, b_runs, note=label))
    table.notes += [
        f"kernel {stock.version}; cmdline (both): {plan.cmdline}",
        "vmm-arch stops at 'Run /init' (--expect): init's first system call cannot work on a "
        "ring-0-emulating KVM; QEMU dies at the int3 self-test, before 'smp: Brought up'",
        "peak RSS should not grow with guest size beyond the pages the guest touched "
        "(the kernel's struct pages: about 1.6% of guest RAM)",
    ]
    if qemu is None:
        table.notes.append(f"no peer: {ctx.inputs.qemu_error}")
    return CaseResult(NAME, [table])
