"""``rss``: peak RSS of the VMM process (``os.wait4`` ``ru_maxrss``) for 256 MiB, 4 GiB and
16 GiB guests.

vmm-arch boots ``bootcheck`` (``--mem``). QEMU cannot load that ELF (no PVH note), so by
default it runs the reset-vector guest of ``first_run`` (``-m``) and is killed once it prints:
both guests touch a few pages, so the figure is the VMM's own. ``--rss-peer-guest stock`` runs
the Debian kernel under QEMU instead, up to the point where it dies on this host (much slower;
the guest then touches tens of MiB itself).
"""

from __future__ import annotations

import functools

from bench import harness, inputs, peers
from bench.cases import Context, Settings
from bench.stats import CaseResult, Sample, Table, alternate, paired_row

NAME = "rss"
DEFAULTS = Settings(runs=2, warmup=0)
QUICK = Settings(runs=1, warmup=0, quick=True)
SIZES_MIB = (256, 4096, 16384)
QUICK_SIZES_MIB = (256,)
#: Which QEMU guest to use ("tiny" or "stock"); set by the command line.
PEER_GUEST = "tiny"


def _vmm_arch(bootcheck: str, mib: int) -> Sample:
    argv = inputs.vmm_arch_argv("boot", bootcheck, "--mem", f"{mib}M", "-q")
    run = harness.measure(argv, {}, timeout=120, env=inputs.vmm_arch_env())
    if run.returncode != 0:
        raise RuntimeError(f"vmm-arch boot --mem {mib}M exited {run.returncode}: "
                           f"{run.describe_tail()}")
    return {"peak_rss_mib": run.maxrss_kib / 1024, "wall_s": run.wall}


def _qemu(ctx: Context, qemu: peers.Qemu, mib: int) -> Sample:
    cpu = ctx.inputs.host_cpu(qemu)
    if PEER_GUEST == "stock":
        stock = ctx.inputs.stock()
        plan = ctx.inputs.plan(stock.vmlinux)
        cpu = ctx.inputs.host_cpu(qemu, plan.cpu_mask)
        argv = peers.direct_boot(qemu.path, machine=peers.MICROVM, kernel=stock.vmlinux,
                                 initrd=stock.initrd, append=plan.cmdline, cpu=cpu, mem_mib=mib)
        run = harness.measure(argv, {}, kill_on={"died": peers.KVM_INTERNAL_ERROR,
                                                 "marker": "VMM-INIT-REACHED"}, timeout=300)
    else:
        argv = peers.tiny_guest(qemu.path, ctx.inputs.tiny_bios(), cpu=cpu, mem_mib=mib)
        run = harness.measure(argv, {}, kill_on={"ran": peers.TINY_BANNER}, timeout=30)
    if not run.killed_by or run.killed_by == "timeout":
        raise RuntimeError(f"QEMU -m {mib} did not reach its end point: {run.describe_tail()}")
    return {"peak_rss_mib": run.maxrss_kib / 1024, "wall_s": run.wall}


def _say(ctx: Context, prefix: str, label: str) -> None:
    ctx.say(f"{prefix}: {label}")


def run(ctx: Context) -> CaseResult:
    s = ctx.settings
    bootcheck = str(inputs.guest("bootcheck"))
    qemu = ctx.inputs.qemu()
    sizes = QUICK_SIZES_MIB if s.quick else SIZES_MIB
    peer_guest = ("Debian cloud kernel to its death point" if PEER_GUEST == "stock"
                  else "reset-vector guest")
    table = Table("peak RSS of the VMM process", "vmm-arch (bootcheck.elf)",
                  f"QEMU microvm ({peer_guest})")
    for mib in sizes:
        peer = functools.partial(_qemu, ctx, qemu, mib) if qemu is not None else None
        a_runs, b_runs = alternate(
            functools.partial(_vmm_arch, bootcheck, mib), peer, s.runs, s.warmup,
            functools.partial(_say, ctx, f"rss {mib} MiB"),
        )
        table.rows.append(paired_row("peak_rss_mib", "MiB", a_runs, b_runs,
                                     note=f"guest RAM {mib} MiB"))
    table.notes.append("target: vmm-arch RSS beyond touched guest pages <= 40 MiB and flat in "
                       "guest size (bootcheck touches a few pages)")
    table.notes.append("vmm-arch lays out one RAM region below 3 GiB and the rest above 4 GiB; "
                       "the mappings are MAP_NORESERVE")
    if qemu is None:
        table.notes.append(f"no peer: {ctx.inputs.qemu_error}")
    return CaseResult(NAME, [table])
