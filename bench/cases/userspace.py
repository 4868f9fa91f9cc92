"""``userspace``: a userspace-heavy guest on the software CPUs, vmm-arch emulate vs QEMU TCG.

The ``milestones`` case's emulate pair ends at the init marker, one shell script after
``Run /init``: nearly all of it is the kernel's boot. This case boots the same kernel with the
same command line into a busybox /init that does a few seconds of process work (1,175
programs started, 1,433 forks: ``bench/userspace_guest.py`` lists the phases), so the
comparison covers what a software CPU does in userspace: fork and exec, page faults, system
calls, pipes, exceptions and interrupts taken from ring 3.

Per round, A B (after one warm-up pair by default): vmm-arch ``boot vmlinux --boot-protocol
pvh --backend emulate`` and QEMU ``-M microvm -accel tcg -cpu max`` loading the same ELF through
PVH, both with ``-m 256``, as the ``milestones`` case builds them (QEMU's cmdline gets
``tsc_early_khz=``, which microvm under TCG needs). Times come from the one harness: process
start to ``Run /init`` and to the marker, and the userspace part alone (``Run /init`` to the
marker); each phase from its announcement to the next one. Every run's guest report is parsed
and held to the values computed here and to the other runs' (``check_reports``): a run that
did other work than the rest fails the case rather than give a ratio.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench import harness, inputs, peers
from bench import userspace_guest as guest
from bench.cases import Context, Settings
from bench.stats import CaseResult, Sample, Table, alternate, paired_row

NAME = "userspace"
DEFAULTS = Settings(runs=5, warmup=1)
QUICK = Settings(runs=1, warmup=0, quick=True)

MILESTONES = {
    "run_init": r"Run /init",
    **{f"phase_{p}": rf"{guest.PHASE_LINE} {p}\b" for p in guest.PHASES},
    "marker": guest.MARKER,
}
#: Rows of the table, in order (the phase rows are added between userspace and peak RSS).
METRICS = ("run_init", "marker", "userspace")
#: Under QEMU TCG the default workload reaches the marker in ~6 s here; the unicorn wheel
#: is allowed several times that.
VMM_ARCH_TIMEOUT = 300.0
QEMU_TIMEOUT = 120.0


def _log(name: str) -> Path:
    """Where a run's whole output goes (build/bench/console/), to look at a failed run."""
    path = inputs.WORK_DIR / "console" / f"{time.strftime('%Y%m%d-%H%M%S')}-userspace-{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class Runs:
    """The samples of one side, and each run's guest report (for ``check_reports``)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.reports: list[tuple[str, guest.Report]] = []

    def sample(self, run: harness.ProcessRun, log: Path) -> Sample:
        self.reports.append((str(log), guest.parse(run.stdout)))
        sample = dict(run.milestones)
        if "run_init" in sample and "marker" in sample:
            sample["userspace"] = sample["marker"] - sample["run_init"]
        # Each phase lasts until the next one is announced; the last until the marker.
        ends = [f"phase_{p}" for p in guest.PHASES[1:]] + ["marker"]
        for phase, end in zip(guest.PHASES, ends, strict=True):
            if f"phase_{phase}" in sample and end in sample:
                sample[phase] = sample[end] - sample[f"phase_{phase}"]
        sample["peak_rss_mib"] = run.maxrss_kib / 1024
        sample["cpu_s"] = run.cpu_seconds
        return sample


def _vmm_arch(runs: Runs, kernel: Path, initrd: Path, cmdline: str) -> Sample:
    argv = inputs.vmm_arch_argv("boot", str(kernel), "--initrd", str(initrd),
                                "--boot-protocol", "pvh", "--cmdline", cmdline,
                                "--backend", "emulate", "--mem", "256M",
                                "--timeout", str(int(VMM_ARCH_TIMEOUT - 60)))
    log = _log("vmm-arch-emulate")
    run = harness.measure(argv, MILESTONES, timeout=VMM_ARCH_TIMEOUT, env=inputs.vmm_arch_env(),
                          keep_stdout=True, log=log)
    if run.returncode != 0:
        print(f"  vmm-arch --backend emulate exited {run.returncode} (log {log}): "
              f"{run.describe_tail(3)}", file=sys.stderr)
    return runs.sample(run, log)


def _qemu(runs: Runs, argv: list[str]) -> Sample:
    log = _log("qemu-tcg")
    # QEMU has no exit device here: it is killed at the marker, as in ``milestones``.
    run = harness.measure(argv, MILESTONES, timeout=QEMU_TIMEOUT, keep_stdout=True, log=log,
                          kill_on={"marker": MILESTONES["marker"]})
    if "marker" not in run.milestones:
        print(f"  QEMU TCG did not reach the marker ({run.killed_by or run.returncode}, log "
              f"{log}): {run.describe_tail(3)}", file=sys.stderr)
    return runs.sample(run, log)


def check_reports(work: guest.Workload, sides: list[Runs]) -> list[str]:
    """Notes on the guests' reports; raises if any run did other work than expected or than
    another run (same results, same sanity line). A run that never printed its report (a
    timeout, a hang) is reported, not raised: it has no marker, so no ratio uses it."""
    problems: list[str] = []
    notes: list[str] = []
    sanity: dict[str, list[str]] = {}
    results: dict[str, set[str]] = {}
    for side in sides:
        for i, (log, report) in enumerate(side.reports, start=1):
            if not report.sanity and not report.failures:
                notes.append(f"{side.label} run {i} printed no report (log {log})")
                continue
            problems += [f"{side.label} run {i} ({log}): {p}" for p in report.problems(work)]
            sanity.setdefault(report.sanity, []).append(f"{side.label} {i}")
            for name, value in report.results.items():
                results.setdefault(name, set()).add(value)
    if len(sanity) > 1:
        problems.append("the runs disagree: " + "; ".join(
            f"{line or 'no sanity line'} ({', '.join(who)})" for line, who in sanity.items()))
    differing = {name: values for name, values in results.items() if len(values) > 1}
    if differing:
        problems.append(f"results differ between runs: {differing}")
    if problems:
        raise RuntimeError("the guests did not all do the same work:\n  " + "\n  ".join(problems))
    if sanity:
        notes.append(f"every run printed `{next(iter(sanity))}` and the same "
                     f"{len(results)} results; {len(guest.expected(work))} of them equal the "
                     "values computed on the host")
    for side in sides:
        forks = sorted(r.forks for _, r in side.reports if r.forks is not None)
        if forks:
            span = f"{forks[0]}" if forks[0] == forks[-1] else f"{forks[0]}..{forks[-1]}"
            notes.append(f"{side.label}: the kernel counted {span} forks over the workload "
                         f"(/proc/stat) for {work.spawned()} programs started")
    return notes


def run(ctx: Context) -> CaseResult:
    from vmmarch_cli import assets

    s = ctx.settings
    work = guest.QUICK if s.quick else guest.DEFAULT
    stock = ctx.inputs.stock()
    plan = ctx.inputs.plan(stock.vmlinux)
    busybox = assets.fetch_busybox()  # stock() has just resolved it, with progress lines
    initrd = guest.build_initrd(work, busybox, inputs.WORK_DIR / "userspace")
    qemu = ctx.inputs.qemu()
    ctx.say("userspace: loading vmm-arch's unicorn library (building the engine if need be)")
    engine = inputs.engine_choice()
    tcg_extra = peers.tcg_tsc_parameter()

    a_side, b_side = Runs("vmm-arch"), Runs("QEMU")

    def run_a() -> Sample:
        ctx.say("userspace: vmm-arch --backend emulate")
        return _vmm_arch(a_side, stock.vmlinux, initrd, plan.cmdline)

    run_b = None
    if qemu is not None:
        argv = peers.direct_boot(qemu.path, machine=peers.MICROVM, kernel=stock.vmlinux,
                                 initrd=initrd, append=f"{plan.cmdline} {tcg_extra}",
                                 accel="tcg", cpu="max", mem_mib=256)

        def run_b() -> Sample:
            ctx.say("userspace: QEMU microvm -accel tcg")
            return _qemu(b_side, argv)

    a_runs, b_runs = alternate(run_a, run_b, s.runs, s.warmup, ctx.say)
    # Warm-up runs are held to the same work too; their samples are simply not kept.
    notes = check_reports(work, [a_side, b_side])

    table = Table("busybox userspace workload on the software CPUs, identical inputs",
                  "vmm-arch --backend emulate", "QEMU microvm -accel tcg -cpu max")
    notes_by_metric = {"run_init": "process start to `Run /init`",
                       "marker": "process start to the marker (the target)",
                       "userspace": "`Run /init` to the marker: the userspace part alone"}
    for metric in (*METRICS, *guest.PHASES, "peak_rss_mib", "cpu_s"):
        unit = "MiB" if metric == "peak_rss_mib" else "s"
        note = notes_by_metric.get(metric, "phase" if metric in guest.PHASES else "")
        target = "<= 1.0x" if metric == "marker" else ""
        table.rows.append(paired_row(metric, unit, a_runs, b_runs, target=target, note=note))
    table.notes += [
        f"kernel {stock.version}; initrd {initrd.name} ({'quick' if s.quick else 'default'} "
        f"workload: {work}); cmdline (both): {plan.cmdline}; QEMU's also gets `{tcg_extra}`",
        f"vmm-arch's unicorn library: {engine}",
        "both stop at the marker: vmm-arch exits through the port, QEMU is killed",
        *notes,
    ]
    result = CaseResult(NAME, [table])
    if qemu is None:
        result.notes.append(f"no peer: {ctx.inputs.qemu_error}")
    return result
