"""``vmm-arch boot``: boot a kernel, stream its console, end with a status a script can use."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import click

from vmmarch_cli import backends, machine
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.commands import options
from vmmarch_cli.config import BootConfig
from vmmarch_cli.machine import BootResult, Fault
from vmmarch_cli.profile import Symbols, fold
from vmmarch_cli.render import regs_dict, regs_table, sregs_dict, sregs_tables, stderr_console
from vmmarch_cli.stop import StopReason
from vmmarch_cli.vcpu import ATTR_L


@click.command("boot")
@options.kernel_argument
@options.boot_options
@options.run_options
@options.profile_options
@options.snapshot_option
@options.gdb_option
@click.pass_context
def boot_command(ctx: click.Context, /, as_json: bool, quiet: bool, verbose: bool,
                 console_log: Path | None, profile_hz: float, symbols: Path | None,
                 gdb_address: str | None, snapshot: Path | None, **kwargs: Any) -> None:
    """Boot KERNEL and stream the guest console to stdout.

    KERNEL is an ELF vmlinux (x86_64) or a bzImage (--decompress says who decompresses its
    payload; the first line says who did, and why). The run ends when the guest writes a
    status to the exit port 0xf4 (that status is the exit status), powers off or resets (0),
    panics (255), faults (70, registers printed), matches every --expect (0), or hits
    --timeout (124).

    A phase timing summary goes to stderr. On this kind of host (a KVM that emulates ring 0)
    the default CPU mask and `mitigations=off` are applied; `vmm-arch backends` says which.
    """
    config = replace(options.boot_config(kwargs), profile_hz=profile_hz, snapshot=snapshot)
    check_snapshot_use(config, gdb_address)
    syms = Symbols.load(symbols) if symbols is not None else None
    execute(ctx, config, as_json, quiet, verbose, console_log, syms, gdb_address)


def check_snapshot_use(config: BootConfig, gdb_address: str | None) -> None:
    """--snapshot saves the guest when --expect stops it; a debugger's breakpoints would not
    survive it (status 64 for either)."""
    if config.snapshot is None:
        return
    if not config.expect:
        raise click.UsageError("--snapshot needs --expect: the guest is saved when every "
                               "--expect has matched")
    if gdb_address is not None:
        raise click.UsageError("--snapshot cannot be used with --gdb")


def execute(ctx: click.Context, config: BootConfig, as_json: bool, quiet: bool, verbose: bool,
            console_log: Path | None, symbols: Symbols | None = None,
            gdb_address: str | None = None) -> None:
    """Run one boot and end the command with its status (shared by ``boot`` and ``stock``)."""
    debugger = options.open_debugger(gdb_address)
    attach = options.attach_debugger(debugger)
    sink: BinaryIO | None = None
    if not quiet:
        sink = sys.stderr.buffer if as_json else sys.stdout.buffer
    log = console_log.open("wb") if console_log is not None else None
    def announce(p: machine.Prepared) -> None:
        if not quiet and p.restored is not None:
            click.echo(f"vmm-arch: resuming {p.restored.path} ({p.kernel.format} "
                       f"{p.kernel.path}) on {p.backend.name}, cmdline: {p.cmdline}", err=True)
        elif not quiet:
            d = p.kernel.decompression
            how = f", {d.describe()}" if d is not None else ""
            why = f" ({p.backend.reason})" if config.backend == backends.AUTO else ""
            click.echo(f"vmm-arch: {p.kernel.format} {p.kernel.path} via the "
                       f"{PROTOCOL_NAMES[p.protocol]} (entry {p.plan_entry:#x}) on "
                       f"{p.backend.name}{why}{how}, cmdline: {p.cmdline}", err=True)
        if attach is not None:
            attach(p)

    try:
        result = machine.run(config, sink, log, on_ready=announce, quiet=quiet,
                             debugger=debugger)
        if debugger is not None:
            debugger.finish(result.status)
    finally:
        if log is not None:
            # A write error was already reported (Console.warnings); closing retries it.
            with contextlib.suppress(OSError):
                log.close()
    hot = fold(result.rip_samples, symbols).most_common(PROFILE_TOP)
    if as_json:
        doc = result_json(result)
        if console_log is not None:
            doc["console_log"] = str(console_log)
        if config.snapshot is not None and result.reason is StopReason.EXPECT:
            doc["snapshot"] = str(config.snapshot)
        if config.profile_hz:
            doc["profile"] = [{"where": w, "samples": n} for w, n in hot]
        click.echo(json.dumps(doc, indent=2))
    else:
        report(result, quiet=quiet, verbose=verbose)
        if config.snapshot is not None and result.reason is StopReason.EXPECT and not quiet:
            _say(f"vmm-arch: saved the guest to {config.snapshot}")
        if config.profile_hz:
            total = sum(result.rip_samples.values())
            click.echo(f"profile: {total} samples at {config.profile_hz:g} Hz", err=True)
            for where, n in hot:
                click.echo(f"  {100 * n / total:5.1f}%  {where}", err=True)
    ctx.exit(result.status)


def result_json(r: BootResult) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "status": r.status,
        "reason": r.reason,
        "guest_exit_code": r.guest_status,
        "detail": r.detail,
        "backend": r.backend,
        "backend_reason": r.backend_reason,
        "cmdline": r.cmdline,
        "cpu_mask": list(r.cpu_mask),
        "timings": {k: round(v, 6) for k, v in r.timings.items()},
        "exits": dict(r.exits),
        "injected_events": r.injected_events,
        "unhandled_ports": r.unhandled_ports,
        "console_tail": r.console_tail[-10:],
        "warnings": r.warnings,
    }
    if r.kernel is not None:
        d = r.kernel.decompression
        doc["kernel"] = {"path": r.kernel.path, "format": r.kernel.format,
                         "entry": f"{r.kernel.entry:#x}", "boot_protocol": r.protocol,
                         "load": [f"{r.kernel.load_start:#x}", f"{r.kernel.load_end:#x}"],
                         "decompress": d.as_json() if d is not None else None}
    if r.fault is not None:
        doc["fault"] = {
            "cpu": r.fault.cpu,
            "reason": r.fault.reason,
            "instruction": r.fault.instruction.hex(),
            "code": ({"address": f"{r.fault.code.address:#x}", "bytes": r.fault.code.data.hex()}
                     if r.fault.code else None),
            "regs": regs_dict(r.fault.regs) if r.fault.regs else None,
            "sregs": sregs_dict(r.fault.sregs) if r.fault.sregs else None,
        }
    return doc


PROFILE_TOP = 20

PROTOCOL_NAMES = {BootProtocol.LINUX64: "64-bit Linux boot protocol",
                  BootProtocol.PVH: "Xen PVH entry"}

PHASES = ("open", "load", "setup", "first_console_byte", "linux_banner", "memory_line",
          "run_init", "run", "total")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(r: BootResult, quiet: bool, verbose: bool) -> None:
    # Plain lines but for a fault's tables: importing rich costs ~20 ms of every exit.
    if r.fault is not None:
        _report_fault(r.fault, r.console_tail)
    if r.reason is StopReason.TIMEOUT and r.console_tail:
        _say(f"last console line: {r.console_tail[-1]}")
    for warning in r.warnings:
        _say(f"vmm-arch: warning: {warning}")
    summary = f"vmm-arch: {r.reason} (status {r.status})"
    if r.detail and r.reason is not StopReason.FAULT:
        summary += f": {r.detail}"
    _say(summary)
    if quiet:
        return
    phases = "  ".join(f"{k}={r.timings[k]:.3f}s" for k in PHASES if k in r.timings)
    _say(f"timings: {phases}")
    if verbose:
        _say(f"exits: {dict(r.exits)}  injected events: {r.injected_events}")
        if r.unhandled_ports:
            _say(f"unhandled ports: {r.unhandled_ports}")


def _report_fault(fault: Fault, console_tail: list[str]) -> None:
    from vmmarch_cli.crash import disassemble  # only after a fault

    err = stderr_console()
    err.print(f"[bold red]guest fault[/] on cpu{fault.cpu}: {fault.reason}")
    if fault.instruction:
        err.print(f"instruction bytes: {fault.instruction.hex(' ')}")
    if fault.code is not None and fault.sregs is not None:
        err.print("code at the fault:")
        long_mode = bool(fault.sregs.cs.attributes & ATTR_L)
        for line in disassemble(fault.code, mode64=long_mode):
            err.print(f"  {line}", markup=False)
    if fault.regs is not None:
        err.print(regs_table(fault.regs, "registers at the fault"))
    if fault.sregs is not None:
        for t in sregs_tables(fault.sregs):
            err.print(t)
    if console_tail:
        err.print("last console lines:")
        for line in console_tail[-10:]:
            err.print(f"  {line}", markup=False)
