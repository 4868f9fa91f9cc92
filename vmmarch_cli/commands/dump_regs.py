"""``vmm-arch dump-regs``: run the pipeline, read the boot state back from the vCPU, show it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from vmmarch_cli import machine
from vmmarch_cli.arch.x86_64 import tables
from vmmarch_cli.commands import options
from vmmarch_cli.config import BootConfig
from vmmarch_cli.readback import readback
from vmmarch_cli.render import kv_table, regs_table, sregs_tables
from vmmarch_cli.vcpu import Regs, Sregs

#: Read-back values that legitimately differ between backends (docs/backends.md, "Backend-
#: specific values"), as paths below ``cpus.<n>.``: the TSC counts on KVM and is kept as written
#: by the emulator; CR2 is whatever the hypervisor last left there; CPUID starts from each
#: hypervisor's own model.
BACKEND_SPECIFIC = ("msrs.IA32_TSC", "sregs.cr2", "cpuid")
#: Room for a path and two 64-bit values side by side, even when stdout is a pipe.
COMPARE_WIDTH = 110


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [2]} -> {"a.b": 1, "c.0": 2}."""
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = list(value.items())
    elif isinstance(value, list):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, v in items:
        out.update(flatten(v, f"{prefix}.{key}" if prefix else key))
    return out


def backend_specific(path: str) -> bool:
    parts = path.split(".")
    rest = ".".join(parts[2:]) if parts[0] == "cpus" else path
    return any(rest == p or rest.startswith(p + ".") for p in BACKEND_SPECIFIC)


def diff_states(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Paths under ``cpus`` whose values differ, without the backend-specific ones."""
    fa, fb = flatten(a["cpus"], "cpus"), flatten(b["cpus"], "cpus")
    paths = list(fa) + [p for p in fb if p not in fa]
    return [{"path": p, "a": fa.get(p), "b": fb.get(p)} for p in paths
            if fa.get(p) != fb.get(p) and not backend_specific(p)]


def _document(config: BootConfig, prepared: machine.Prepared, cpu: int | None = None,
              with_tables: bool = False) -> dict[str, Any]:
    """The steps, the read-back state of every vCPU (or of ``cpu``), what was booted, and with
    ``with_tables`` the memory map, MP and ACPI tables decoded from guest memory."""
    vcpus = prepared.vcpus if cpu is None else [prepared.vcpus[cpu]]
    doc = {
        "backend": prepared.backend.name,
        "kernel": {"path": prepared.kernel.path, "format": prepared.kernel.format,
                   "entry": f"{prepared.kernel.entry:#x}", "boot_protocol": prepared.protocol,
                   "decompress": (prepared.kernel.decompression.as_json()
                                  if prepared.kernel.decompression is not None else None)},
        "cmdline": prepared.cmdline,
        "cpu_mask": sorted(prepared.cpu_mask),
        "steps": [{"step": r.step, "target": r.target, "set": r.summary}
                  for r in prepared.setup],
        "cpus": [readback(v) for v in vcpus],
    }
    if with_tables:
        doc["tables"] = tables.read_boot_tables(prepared.vm.memory, prepared.protocol)
    return doc


def state_document(config: BootConfig) -> dict[str, Any]:
    """Run the pipeline on ``config.backend`` and read everything back."""
    with machine.prepare(config) as prepared:
        return _document(config, prepared)


@click.command("dump-regs")
@options.kernel_argument
@options.boot_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (64-bit values as hex strings).")
@click.option("--cpuid/--no-cpuid", "show_cpuid", default=False,
              help="Also list every CPUID leaf set (always in --json).")
@click.option("--compare", "compare", default=None, metavar="BACKEND|SNAPSHOT",
              help="Also run the pipeline on BACKEND, or read SNAPSHOT, and show both states "
                   "side by side, differences in red (JSON: {a, b, diff}). Backend-specific "
                   "values (TSC, CR2, CPUID) are not counted as differences.")
@click.option("--cpu", "cpu", type=click.IntRange(min=0), default=None, metavar="N",
              help="Show only vCPU N (default: every vCPU).")
@click.option("--tables", "show_tables", is_flag=True,
              help="Also decode the e820 map, the MP table and the ACPI tables (RSDP, XSDT, "
                   "FADT, DSDT, MADT) from guest memory, with their checksums.")
def dump_regs_command(as_json: bool, show_cpuid: bool, compare: str | None, cpu: int | None,
                      show_tables: bool, **kwargs: Any) -> None:
    """Load KERNEL, run the arch setup pipeline, and show the vCPU state it left, read back
    from the hypervisor, without starting the guest.

    The steps and what each set are listed first, so a difference can be traced to a step.
    KERNEL (or --compare) may be a snapshot (`boot --snapshot`): its vCPUs are shown as their
    backend read them when it was taken. Two snapshots of one guest taken at the same console
    line on KVM and on the emulate backend show where the two CPUs' states part.
    """
    from vmmarch_cli.snapshot import fileformat

    if fileformat.is_snapshot(kwargs["kernel"]):
        _snapshot_command(kwargs["kernel"], compare, as_json, show_cpuid, cpu, show_tables)
        return
    config = options.boot_config(kwargs)
    if cpu is not None and cpu >= config.cpus:
        raise click.BadParameter(f"vCPU {cpu} does not exist with --cpus {config.cpus} "
                                 f"(vCPUs are numbered 0..{config.cpus - 1})",
                                 param_hint="'--cpu'")
    if compare is not None:
        other = (snapshot_document(Path(compare)) if fileformat.is_snapshot(Path(compare))
                 else state_document(replace(config, backend=compare)))
        _compare(state_document(config), other, as_json)
        return
    with machine.prepare(config) as prepared:
        doc = _document(config, prepared, cpu, show_tables)
        shown = [(v.index, v.get_regs(), v.get_sregs()) for v in prepared.vcpus
                 if cpu is None or v.index == cpu]
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    out = Console(highlight=False)
    steps = [(f"{r.target}:{r.step}", "  ".join(f"{k}={v}" for k, v in r.summary.items()))
             for r in prepared.setup]
    out.print(kv_table("pipeline steps", steps))
    for (index, regs, sregs), state in zip(shown, doc["cpus"], strict=True):
        for t in cpu_tables(index, regs, sregs, state):
            out.print(t)
        if show_cpuid:
            out.print(cpuid_table(index, state))
    if show_tables:
        for t in tables_view(doc["tables"]):
            out.print(t)


def cpu_tables(index: int, regs: Regs, sregs: Sregs, state: dict[str, Any]) -> list[Table]:
    """One vCPU's registers, segments, descriptor tables, FPU, MSRs and LAPIC (``state``:
    its ``readback``)."""
    return [regs_table(regs, f"cpu{index} registers (read back)"), *sregs_tables(sregs),
            kv_table(f"cpu{index} fpu", state["fpu"]),
            kv_table(f"cpu{index} msrs", state["msrs"]),
            kv_table(f"cpu{index} lapic", state["lapic"])]


def monitor(prepared: machine.Prepared) -> Callable[[str, int], list[Table] | None]:
    """gdb's ``monitor`` commands for a VM: ``regs`` (the selected vCPU, as dump-regs shows
    it) and ``tables`` (the e820 map, MP and ACPI tables, decoded from guest memory)."""

    def run(command: str, cpu: int) -> list[Table] | None:
        if command == "regs":
            v = prepared.vcpus[cpu]
            return cpu_tables(v.index, v.get_regs(), v.get_sregs(), readback(v))
        if command == "tables":
            return tables_view(tables.read_boot_tables(prepared.vm.memory, prepared.protocol))
        return None

    return run


def tables_view(doc: dict[str, Any]) -> list[Table]:
    """The decoded boot tables as rich tables: memory map, MP table, ACPI."""
    out = []
    e820_rows = [(f"{e['start']}-{e['end']}", e["type"]) for e in doc["e820"]["entries"]]
    out.append(kv_table(f"e820 map (from {doc['e820']['source']})", e820_rows))
    mp = doc["mptable"]
    if mp is None:
        out.append(kv_table("MP table", [("floating pointer", "not found")]))
    elif "error" in mp:
        out.append(kv_table("MP table", [("error", mp["error"])]))
    else:
        rows = [("floating pointer", mp["address"]), ("table", mp["table_address"]),
                ("checksums", "ok" if mp["checksum_ok"] else "BAD")]
        rows += [(f"cpu apic_id={c['apic_id']}",
                  ("BSP " if c["bsp"] else "") + ("enabled" if c["enabled"] else "disabled"))
                 for c in mp["cpus"]]
        rows += [(f"ioapic id={i['id']}", i["address"]) for i in mp["ioapics"]]
        rows += [(k, str(mp[k])) for k in ("buses", "io_interrupts", "local_interrupts")
                 if k in mp]
        out.append(kv_table("MP table", rows))
    acpi_doc = doc["acpi"]
    if acpi_doc is None or "error" in acpi_doc:
        out.append(kv_table("ACPI", [("error", acpi_doc["error"]) if acpi_doc
                                     else ("RSDP", "not given to the kernel")]))
    else:
        rsdp = acpi_doc["rsdp"]
        rows = [(f"RSDP {rsdp['address']}", f"rev {rsdp['revision']} xsdt={rsdp['xsdt']} "
                 f"checksums {'ok' if rsdp['checksum_ok'] else 'BAD'}")]
        rows += [(f"{t['signature']} {t['address']}", f"rev {t['revision']} len {t['length']} "
                  f"checksum {'ok' if t['checksum_ok'] else 'BAD'}") for t in acpi_doc["tables"]]
        rows += [(f"MADT {r['type']}", " ".join(f"{k}={v}" for k, v in r.items() if k != "type"))
                 for r in acpi_doc["madt"]]
        devices = acpi_doc["dsdt_devices"]
        if isinstance(devices, dict):
            rows.append(("DSDT devices", devices["error"]))
        else:
            rows += [(f"DSDT {d['name']}", f"{d['hid']} uid={d['uid']} io={d['io_base']}+"
                      f"{d['io_length']} irq={d['irq']}") for d in devices]
        out.append(kv_table("ACPI tables", rows))
    return out


def snapshot_document(path: Path) -> dict[str, Any]:
    """A snapshot's vCPUs as ``_document`` shows a boot's, from the file alone (its description
    and each vCPU's readback section: snapshot/guest.py)."""
    from vmmarch_cli.snapshot import fileformat, guest

    snapshot = fileformat.describe(path)
    taken = machine.described_machine(snapshot)
    return {
        "backend": taken.backend,
        "label": f"{taken.backend} {path.name}",
        "snapshot": str(path),
        "kernel": {"path": taken.kernel.path, "format": taken.kernel.format,
                   "entry": f"{taken.kernel.entry:#x}", "boot_protocol": taken.protocol},
        "cmdline": taken.cmdline,
        "cpu_mask": sorted(taken.cpu_mask),
        "steps": [],
        "cpus": guest.readbacks(snapshot),
    }


def _snapshot_command(path: Path, compare: str | None, as_json: bool, show_cpuid: bool,
                      cpu: int | None, show_tables: bool) -> None:
    """dump-regs of a snapshot: its vCPUs as saved, or compared with another snapshot's."""
    from vmmarch_cli.snapshot import fileformat

    if show_tables:
        raise click.UsageError("--tables decodes a booting guest's memory, not a snapshot's")
    doc = snapshot_document(path)
    if compare is not None:
        if not fileformat.is_snapshot(Path(compare)):
            raise click.BadParameter(
                f"{compare} is not a snapshot: a snapshot restores only on the backend that "
                "took it (docs/snapshots.md), so it is compared with another snapshot",
                param_hint="'--compare'")
        _compare(doc, snapshot_document(Path(compare)), as_json)
        return
    if cpu is not None and cpu >= len(doc["cpus"]):
        raise click.BadParameter(f"vCPU {cpu} does not exist in {path} (vCPUs are numbered "
                                 f"0..{len(doc['cpus']) - 1})", param_hint="'--cpu'")
    doc["cpus"] = [c for c in doc["cpus"] if cpu is None or c["index"] == cpu]
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    out = Console(highlight=False)
    out.print(kv_table("snapshot", [("file", str(path)), ("backend", doc["backend"]),
                                    ("kernel", doc["kernel"]["path"])]))
    for state in doc["cpus"]:
        index = state["index"]
        out.print(kv_table(f"cpu{index} registers (when saved)", state["regs"]))
        out.print(kv_table(f"cpu{index} special registers",
                           {k: str(v) for k, v in flatten(state["sregs"]).items()}))
        for part in ("fpu", "msrs", "lapic"):
            out.print(kv_table(f"cpu{index} {part}", state[part]))
        if show_cpuid:
            out.print(cpuid_table(index, state))


def cpuid_table(index: int, state: dict[str, Any]) -> Table:
    """One vCPU's CPUID leaves (``state``: its ``readback``)."""
    rows = [(f"{e['function']}.{e['index']}",
             f"eax={e['eax']} ebx={e['ebx']} ecx={e['ecx']} edx={e['edx']}")
            for e in state["cpuid"]]
    return kv_table(f"cpu{index} cpuid", rows)


def _compare(a: dict[str, Any], b: dict[str, Any], as_json: bool) -> None:
    diff = diff_states(a, b)
    if as_json:
        click.echo(json.dumps({"a": a, "b": b, "diff": diff}, indent=2))
        return
    out = Console(highlight=False, width=max(Console().width, COMPARE_WIDTH))
    out.print(compare_table(a, b, {d["path"] for d in diff}))
    verdict = (f"[red]{len(diff)} difference(s)[/]" if diff else "[green]no differences[/]")
    out.print(f"{_label(a)} vs {_label(b)}: {verdict} "
              f"(not counted: {', '.join(BACKEND_SPECIFIC)})")


def _label(doc: dict[str, Any]) -> str:
    """How a state is named: its backend, and the snapshot it came from."""
    return str(doc.get("label", doc["backend"]))


def compare_table(a: dict[str, Any], b: dict[str, Any], differing: set[str]) -> Table:
    t = Table(title=f"vCPU state: {_label(a)} vs {_label(b)}", padding=(0, 1))
    t.add_column("value", no_wrap=True)
    t.add_column(_label(a), no_wrap=True)
    t.add_column(_label(b), no_wrap=True)
    fa, fb = flatten(a["cpus"], "cpus"), flatten(b["cpus"], "cpus")
    for path in [p for p in fa if ".cpuid." not in p] + [p for p in fb if p not in fa
                                                          and ".cpuid." not in p]:
        va, vb = str(fa.get(path, "-")), str(fb.get(path, "-"))
        if path in differing:
            t.add_row(f"[red]{path}[/]", f"[red]{va}[/]", f"[red]{vb}[/]")
        elif backend_specific(path) and va != vb:
            t.add_row(f"[dim]{path} (backend-specific)[/]", f"[dim]{va}[/]", f"[dim]{vb}[/]")
        else:
            t.add_row(path, va, vb)
    for i, (ca, cb) in enumerate(zip(a["cpus"], b["cpus"], strict=False)):
        t.add_row(f"[dim]cpus.{i}.cpuid (backend-specific)[/]",
                  f"[dim]{len(ca['cpuid'])} leaves[/]", f"[dim]{len(cb['cpuid'])} leaves[/]")
    return t
