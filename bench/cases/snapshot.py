"""``snapshot``: ``vmm-arch run`` from its cached snapshot (issue 18), against QEMU TCG booting
the same kernel to the init marker, and a run that takes the snapshot against one without.

Each round: ``run -- true`` with the snapshot cached; QEMU TCG to the marker; the first run (the
snapshot deleted before it: it boots, saves, runs the command in the same VM; the file's writer
outlives it, and the round waits for it before it goes on); and ``run --no-snapshot -- true``. Then,
once: the snapshot's size on disk, and 8 runs at once from it, each one's peak RSS against a
run alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from bench import harness, inputs, peers
from bench.cases import Context, Settings
from bench.stats import CaseResult, Row, Sample, Summary, Table, paired_row
from vmmarch_cli.snapshot.writer import wait_for_writer

NAME = "snapshot"
DEFAULTS = Settings(runs=7, warmup=1)
QUICK = Settings(runs=1, warmup=0, quick=True)
MARKER = r"VMM-INIT-REACHED"
PARALLEL = 8
TIMEOUT = 300.0


def _run(vmlinux: Path, *extra: str) -> tuple[Sample, dict[str, object]]:
    argv = inputs.vmm_arch_argv("run", "--backend", "emulate", "--json", *extra, str(vmlinux),
                                "--", "true")
    run = harness.measure(argv, {}, timeout=TIMEOUT, env=inputs.vmm_arch_env(),
                          keep_stdout=True)
    if run.returncode != 0:
        raise RuntimeError(f"vmm-arch run failed ({run.returncode}): {run.describe_tail()}")
    return {"wall_s": run.wall, "peak_rss_mib": run.maxrss_kib / 1024}, json.loads(run.stdout)


def _qemu(argv: list[str]) -> Sample:
    run = harness.measure(argv, {"marker": MARKER}, kill_on={"marker": MARKER},
                          timeout=TIMEOUT)
    if "marker" not in run.milestones:
        raise RuntimeError(f"QEMU TCG did not reach the marker: {run.describe_tail()}")
    return {"wall_s": run.milestones["marker"]}


def _parallel(vmlinux: Path, count: int) -> list[float]:
    """Peak RSS (MiB) of each of ``count`` runs started together from the cached snapshot."""
    argv = inputs.vmm_arch_argv("run", "--backend", "emulate", str(vmlinux), "--", "true")
    env = {**os.environ, **inputs.vmm_arch_env()}
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(count)]
    peaks = []
    deadline = time.monotonic() + TIMEOUT
    for proc in procs:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"a parallel run exited {proc.returncode}")
        peaks.append(usage.ru_maxrss / 1024)
    return peaks


def run(ctx: Context) -> CaseResult:
    s = ctx.settings
    stock = ctx.inputs.stock()
    plan = ctx.inputs.plan(stock.vmlinux)
    qemu = ctx.inputs.qemu()
    q_argv = (peers.direct_boot(qemu.path, machine=peers.MICROVM,
                                append=f"{plan.cmdline} {peers.tcg_tsc_parameter()}",
                                accel="tcg", cpu="max", kernel=stock.vmlinux,
                                initrd=stock.initrd) if qemu is not None else None)
    _, doc = _run(stock.vmlinux)  # takes the snapshot if there is none
    snap = Path(str(doc["snapshot"]["path"]))  # type: ignore[index]
    cached: list[Sample] = []
    peer: list[Sample | None] = []
    first: list[Sample] = []
    plain: list[Sample | None] = []
    for i in range(s.warmup + s.runs):
        ctx.say(f"snapshot: round {i + 1}/{s.warmup + s.runs}")
        c, _ = _run(stock.vmlinux)
        q = _qemu(q_argv) if q_argv is not None else None
        snap.unlink(missing_ok=True)
        f, doc = _run(stock.vmlinux)
        if not doc["snapshot"]["taken"]:  # type: ignore[index]
            raise RuntimeError("the first run did not take the snapshot")
        # Its writer outlives it (vmmarch_cli/snapshot/writer.py): wait, so that the next
        # measurement does not share the CPUs with it, and say how long it went on.
        waited = time.monotonic()
        wait_for_writer(snap)
        f = {**f, "writer_after_s": time.monotonic() - waited}
        p, _ = _run(stock.vmlinux, "--no-snapshot")
        if i >= s.warmup:
            cached.append(c)
            peer.append(q)
            first.append(f)
            plain.append(p)
    alone, _ = _run(stock.vmlinux)
    peaks = _parallel(stock.vmlinux, PARALLEL)
    size_mib = os.stat(snap).st_blocks * 512 / (1 << 20)

    table = Table("vmm-arch run -- true from its cached snapshot", "vmm-arch run (emulate)",
                  "QEMU microvm -accel tcg -cpu max, to the init marker")
    table.rows.append(paired_row("wall_s", "s", cached, [None] * len(cached),
                                 target="<= 0.250 s", note="process start to exit"))
    table.rows.append(paired_row("wall_s", "s", cached, peer, target="<= 0.2x",
                                 note="against QEMU booting the kernel to its marker"))
    table.rows.append(paired_row("peak_rss_mib", "MiB", cached, [None] * len(cached)))
    second = Table("the run that takes the snapshot", "vmm-arch run (snapshot taken)",
                   "vmm-arch run --no-snapshot")
    second.rows.append(paired_row("wall_s", "s", first, plain, target="<= 1.1x",
                                  note="boot to init, save, run the command in the same VM; "
                                       "against a fresh boot with the command in the initramfs"))
    second.rows.append(paired_row("writer_after_s", "s", first, [None] * len(first),
                                  note="the file's writer, a child, ends this long after the "
                                       "run (a run started meanwhile waits for it)"))
    second.rows.append(Row("snapshot_mib", "MiB", Summary.of([size_mib]), None, None,
                           target="<= 60 MiB", note="on disk (st_blocks) for a 256 MiB guest"))
    ratio = [p / alone["peak_rss_mib"] for p in peaks]
    second.rows.append(Row("parallel_rss", "x", Summary.of(ratio), None, None,
                           target="<= 1.2x", note=f"peak RSS of each of {PARALLEL} runs at "
                                                  "once from one snapshot / one run alone"))
    table.notes.append(f"snapshot: {snap}")
    if qemu is None:
        table.notes.append(f"no peer: {ctx.inputs.qemu_error}")
    return CaseResult(NAME, [table, second])
