"""``startup``: wall time of a process that only starts (import cost) on each side."""

from __future__ import annotations

from bench import harness, inputs
from bench.cases import Context, Settings
from bench.stats import CaseResult, Sample, Table, paired_row

NAME = "startup"
DEFAULTS = Settings(runs=10, warmup=1)
QUICK = Settings(runs=1, warmup=0, quick=True)


def _wall(argv: list[str], env: dict[str, str] | None = None) -> Sample:
    run = harness.measure(argv, {}, timeout=60, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {run.returncode}: {run.describe_tail()}")
    return {"wall_s": run.wall, "rss_mib": run.maxrss_kib / 1024}


def run(ctx: Context) -> CaseResult:
    s = ctx.settings
    env = inputs.vmm_arch_env()
    bootcheck = inputs.guest("bootcheck")
    qemu = ctx.inputs.qemu()
    help_runs: list[Sample] = []
    dump_runs: list[Sample] = []
    peer_runs: list[Sample | None] = []
    for i in range(s.warmup + s.runs):
        ctx.say(f"startup: round {i + 1}/{s.warmup + s.runs}")
        h = _wall(inputs.vmm_arch_argv("--help"), env)
        d = _wall(inputs.vmm_arch_argv("dump-regs", str(bootcheck)), env)
        p = _wall([qemu.path, "--version"]) if qemu is not None else None
        if i >= s.warmup:
            help_runs.append(h)
            dump_runs.append(d)
            peer_runs.append(p)
    table = Table("process start to exit", "vmm-arch", "qemu-system-x86_64 --version")
    table.rows.append(paired_row("wall_s", "s", help_runs, peer_runs,
                                 note="vmm-arch --help"))
    table.rows.append(paired_row("wall_s", "s", dump_runs, peer_runs,
                                 note="vmm-arch dump-regs bootcheck.elf (opens /dev/kvm)"))
    table.rows.append(paired_row("rss_mib", "MiB", help_runs, peer_runs,
                                 note="peak RSS of --help: the interpreter and its imports"))
    table.notes.append(f"vmm-arch runs as `{inputs.vmm_arch_argv()[0]} -m vmmarch_cli`; rounds "
                       "are --help, dump-regs, qemu --version in turn")
    if qemu is None:
        table.notes.append(f"no peer: {ctx.inputs.qemu_error}")
    return CaseResult(NAME, [table])
