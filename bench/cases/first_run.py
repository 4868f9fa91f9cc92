"""``first_run``: process start to the guest's first console output (so, past the first
KVM_RUN), on each side, timed by the same external harness.

vmm-arch boots the ``bootcheck`` guest, which prints ``BOOTCHECK START`` from its first
instructions. QEMU cannot load that ELF (no PVH note), so it runs a 64 KiB firmware image whose
reset-vector code prints ``Q`` (``peers.write_tiny_bios``): the nearest equal guest. A second
QEMU figure, start to the QMP greeting with ``-S`` (VM built, no vCPU run yet), is shown alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import harness, inputs, peers
from bench.cases import Context, Settings
from bench.stats import CaseResult, Row, Sample, Summary, Table, paired_row

NAME = "first_run"
DEFAULTS = Settings(runs=10, warmup=1)
QUICK = Settings(runs=1, warmup=0, quick=True)
BOOTCHECK_BANNER = r"BOOTCHECK START"
QMP_GREETING = r'\{"QMP"'


def _vmm_arch(bootcheck: str) -> Sample:
    argv = inputs.vmm_arch_argv("boot", bootcheck, "--json")
    run = harness.measure(argv, {"first_output": BOOTCHECK_BANNER}, timeout=60,
                          env=inputs.vmm_arch_env(), keep_stdout=True)
    if run.returncode != 0 or "first_output" not in run.milestones:
        raise RuntimeError(f"vmm-arch boot bootcheck failed ({run.returncode}): "
                           f"{run.describe_tail()}")
    timings = json.loads(run.stdout)["timings"]
    sample = {"first_output_s": run.milestones["first_output"], "exit_s": run.wall}
    # vmm-arch's own clock starts in machine.run: what came before is interpreter + imports.
    inside = float(timings["first_console_byte"])
    sample["in_process_first_byte_s"] = inside
    sample["before_machine_run_s"] = run.milestones["first_output"] - inside
    for phase in ("open", "load", "setup"):
        sample[f"{phase}_s"] = float(timings[phase])
    return sample


def _qemu_tiny(qemu: str, bios: str, cpu: str) -> Sample:
    argv = peers.tiny_guest(qemu, Path(bios), cpu=cpu)
    run = harness.measure(argv, {"first_output": peers.TINY_BANNER},
                          kill_on={"first_output": peers.TINY_BANNER}, timeout=30)
    if "first_output" not in run.milestones:
        raise RuntimeError(f"QEMU tiny guest printed nothing: {run.describe_tail()}")
    return {"first_output_s": run.milestones["first_output"]}


def _qemu_qmp(qemu: str, cpu: str) -> float:
    argv = [qemu, "-accel", "kvm", "-cpu", cpu, "-m", "256", "-nodefaults", "-no-user-config",
            "-display", "none", "-M", peers.MICROVM, "-S", "-qmp", "stdio"]
    run = harness.measure(argv, {"greeting": QMP_GREETING}, kill_on={"greeting": QMP_GREETING},
                          timeout=30)
    if "greeting" not in run.milestones:
        raise RuntimeError(f"QEMU -S -qmp stdio gave no greeting: {run.describe_tail()}")
    return run.milestones["greeting"]


def run(ctx: Context) -> CaseResult:
    s = ctx.settings
    bootcheck = str(inputs.guest("bootcheck"))
    qemu = ctx.inputs.qemu()
    bios = str(ctx.inputs.tiny_bios())
    cpu = ctx.inputs.host_cpu(qemu) if qemu is not None else ""
    a_runs: list[Sample] = []
    b_runs: list[Sample | None] = []
    qmp: list[float] = []
    for i in range(s.warmup + s.runs):
        ctx.say(f"first_run: round {i + 1}/{s.warmup + s.runs}")
        a = _vmm_arch(bootcheck)
        b = _qemu_tiny(qemu.path, bios, cpu) if qemu is not None else None
        g = _qemu_qmp(qemu.path, cpu) if qemu is not None else None
        if i >= s.warmup:
            a_runs.append(a)
            b_runs.append(b)
            if g is not None:
                qmp.append(g)
    table = Table("process start to first guest console output", "vmm-arch (bootcheck.elf)",
                  "QEMU microvm (reset-vector guest)")
    table.rows.append(paired_row("first_output_s", "s", a_runs, b_runs, target="<= 0.050 s",
                                 note="the target applies to vmm-arch's own figure"))
    for metric, note in (
        ("before_machine_run_s", "vmm-arch: interpreter start + imports + CLI parsing"),
        ("in_process_first_byte_s", "vmm-arch: machine.run() start to first console byte"),
        ("open_s", "vmm-arch: open /dev/kvm + create VM"),
        ("load_s", "vmm-arch: load kernel, create vCPU, CPUID probe"),
        ("setup_s", "vmm-arch: arch pipeline"),
    ):
        table.rows.append(paired_row(metric, "s", a_runs, [None] * len(a_runs), note=note))
    table.rows.append(Row("qmp_greeting_s", "s", None, Summary.of(qmp), None,
                          note="QEMU -S -qmp stdio: start to QMP greeting (VM built, not run)"))
    table.notes.append("both sides: time from spawn to the first guest line read from the pipe")
    if qemu is None:
        table.notes.append(f"no peer: {ctx.inputs.qemu_error}")
    else:
        table.notes.append(f"QEMU -cpu {cpu}")
    return CaseResult(NAME, [table])
