"""``vmm-arch dump-regs``: run the pipeline, read the boot state back from the vCPU, show it."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console

from vmmarch_cli import machine
from vmmarch_cli.arch.x86_64 import lapic, msr
from vmmarch_cli.commands import options
from vmmarch_cli.render import (
    hex64,
    kv_table,
    regs_dict,
    regs_table,
    sregs_dict,
    sregs_tables,
)
from vmmarch_cli.vcpu import Vcpu

#: MSRs read back: the boot list plus the two the CPU state depends on.
READBACK_MSRS = (
    *(e.index for e in msr.boot_msrs()),
    msr.MSR_EFER,
    msr.MSR_IA32_APIC_BASE,
)


def readback(vcpu: Vcpu) -> dict[str, Any]:
    """Everything dump-regs shows, read from the vCPU (never from our own inputs)."""
    fpu = vcpu.get_fpu()
    lap = vcpu.get_lapic()
    return {
        "regs": regs_dict(vcpu.get_regs()),
        "sregs": sregs_dict(vcpu.get_sregs()),
        "fpu": {"fcw": f"{fpu.fcw:#06x}", "mxcsr": f"{fpu.mxcsr:#010x}"},
        "msrs": {msr.MSR_NAMES.get(e.index, f"{e.index:#x}"): hex64(e.value)
                 for e in vcpu.get_msrs(READBACK_MSRS)},
        "lapic": {"lvt0": f"{lap.register(lapic.APIC_LVT0):#010x}",
                  "lvt1": f"{lap.register(lapic.APIC_LVT1):#010x}"},
        "cpuid": [
            {"function": f"{e.function:#x}", "index": f"{e.index:#x}", "eax": f"{e.eax:#010x}",
             "ebx": f"{e.ebx:#010x}", "ecx": f"{e.ecx:#010x}", "edx": f"{e.edx:#010x}"}
            for e in vcpu.get_cpuid()
        ],
    }


@click.command("dump-regs")
@options.kernel_argument
@options.boot_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (64-bit values as hex strings).")
@click.option("--cpuid/--no-cpuid", "show_cpuid", default=False,
              help="Also list every CPUID leaf set (always in --json).")
def dump_regs_command(as_json: bool, show_cpuid: bool, **kwargs: Any) -> None:
    """Load KERNEL, run the arch setup pipeline, and show the vCPU state it left, read back
    from the hypervisor, without starting the guest.

    The steps and what each set are listed first, so a difference can be traced to a step.
    """
    config = options.boot_config(kwargs)
    with machine.prepare(config) as prepared:
        cpus = [readback(v) for v in prepared.vcpus]
        regs0, sregs0 = prepared.vcpus[0].get_regs(), prepared.vcpus[0].get_sregs()
        doc = {
            "backend": config.backend,
            "kernel": {"path": prepared.kernel.path, "format": prepared.kernel.format,
                       "entry": f"{prepared.kernel.entry:#x}",
                       "boot_protocol": prepared.protocol},
            "cmdline": prepared.cmdline,
            "cpu_mask": sorted(prepared.cpu_mask),
            "steps": [{"step": r.step, "target": r.target, "set": r.summary}
                      for r in prepared.setup],
            "cpus": cpus,
        }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    out = Console(highlight=False)
    steps = [(f"{r.target}:{r.step}", "  ".join(f"{k}={v}" for k, v in r.summary.items()))
             for r in prepared.setup]
    out.print(kv_table("pipeline steps", steps))
    out.print(regs_table(regs0, "cpu0 registers (read back)"))
    for t in sregs_tables(sregs0):
        out.print(t)
    cpu0 = cpus[0]
    out.print(kv_table("fpu", cpu0["fpu"]))
    out.print(kv_table("msrs", cpu0["msrs"]))
    out.print(kv_table("lapic", cpu0["lapic"]))
    if show_cpuid:
        rows = [(f"{e['function']}.{e['index']}",
                 f"eax={e['eax']} ebx={e['ebx']} ecx={e['ecx']} edx={e['edx']}")
                for e in cpu0["cpuid"]]
        out.print(kv_table("cpuid", rows))
