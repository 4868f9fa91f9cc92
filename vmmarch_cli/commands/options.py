"""Options shared by the commands that build a VM (one definition, one meaning everywhere)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from vmmarch_cli import backends
from vmmarch_cli.arch.x86_64.lapic import MAX_XAPIC_CPUS
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.config import BASE_CMDLINE, BootConfig, parse_mem_size
from vmmarch_cli.loader.host_decompress import Decompress

if TYPE_CHECKING:
    from vmmarch_cli.gdb.stub import Stub
    from vmmarch_cli.machine import Prepared

F = TypeVar("F", bound=Callable[..., Any])

kernel_argument = click.argument("kernel", type=click.Path(path_type=Path))


def profile_options(f: F) -> F:
    """--profile HZ and --symbols FILE: where the guest spends its time (boot, resume)."""
    f = click.option("--symbols", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Kernel symbols (/proc/kallsyms or System.map format) for "
                          "--profile.")(f)
    return click.option("--profile", "profile_hz", type=click.FloatRange(min=0), default=0,
                        metavar="HZ", help="Sample the guest RIP HZ times a second and print "
                                           "the hottest places.")(f)

backend_option = click.option(
    "--backend", default="auto", show_default=True,
    help="Hypervisor backend: kvm, emulate, or auto: KVM where /dev/kvm runs guest ring 0 in "
         "hardware, else the emulate backend (the report line says which and why; `vmm-arch "
         "backends` shows it).")
decompress_option = click.option(
    "--decompress", type=click.Choice([d.value for d in Decompress]),
    default=Decompress.AUTO.value, show_default=True,
    help="Who decompresses a bzImage's payload: host (vmm-arch, cached; the kernel then boots "
         "without KASLR), guest (the kernel's own decompressor), or auto: host on the emulate "
         "backend and on a KVM that emulates guest ring 0, guest on hardware KVM.")


def boot_options(f: F) -> F:
    decorators = [
        backend_option,
        click.option("--initrd", type=click.Path(path_type=Path),
                     help="Initramfs to load at the top of low memory."),
        click.option("--cmdline", default=None, metavar="TEXT",
                     help=f"Kernel command line, replacing the default: '{BASE_CMDLINE}' "
                          "(plus 'mitigations=off' on a ring-0-emulating KVM)."),
        click.option("--append", default="", metavar="TEXT",
                     help="Appended to the (default or given) command line."),
        click.option("--mem", "mem", default="256M", show_default=True, metavar="SIZE",
                     help="Guest RAM: a number with K/M/G suffix (bare number = MiB)."),
        click.option("--boot-protocol", type=click.Choice([AUTO, *(p.value for p in BootProtocol)]),
                     default=AUTO, show_default=True,
                     help="linux64: the 64-bit Linux boot protocol; pvh: the Xen PVH entry of "
                          "an ELF with a PVH note; auto: PVH when the note exists, else linux64."),
        click.option("--cpus", type=click.IntRange(1, MAX_XAPIC_CPUS), default=1,
                     show_default=True,
                     help=f"Number of vCPUs (1-{MAX_XAPIC_CPUS}: xAPIC IDs are 8 bits, 0xFF is "
                          "broadcast and the IOAPIC takes one). The APs start as on hardware: "
                          "the kernel wakes them with INIT/SIPI."),
        click.option("--cpu-mask", default=None, metavar="LIST",
                     help="CPU features to hide from the guest, comma-separated "
                          "(e.g. cx16,xsave,smap; 'none' hides nothing). Default: what this "
                          "host's KVM cannot run in guest ring 0 (empty on hardware KVM)."),
        decompress_option,
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


#: --boot-protocol's choice of the protocol by what the kernel offers (machine.choose_protocol).
AUTO = "auto"


def _protocol(value: str) -> BootProtocol | None:
    return None if value == AUTO else BootProtocol(value)


def boot_config(kwargs: dict[str, Any]) -> BootConfig:
    """Build the frozen config from the shared options; consumes them from ``kwargs``."""
    mask_text = kwargs.pop("cpu_mask")
    mask: frozenset[str] | None = None
    if mask_text is not None:
        from vmmarch_cli.arch.x86_64 import cpuid  # only with --cpu-mask (~1 ms)

        mask = frozenset() if mask_text.strip().lower() == "none" else cpuid.parse_mask(mask_text)
    return BootConfig(
        kernel=kwargs.pop("kernel"),
        backend=kwargs.pop("backend"),
        initrd=kwargs.pop("initrd"),
        cmdline=kwargs.pop("cmdline"),
        append=kwargs.pop("append"),
        mem_size=parse_mem_size(kwargs.pop("mem")),
        cpus=kwargs.pop("cpus"),
        cpu_mask=mask,
        timeout=kwargs.pop("timeout", None),
        expect=tuple(kwargs.pop("expect", ())),
        boot_protocol=_protocol(kwargs.pop("boot_protocol")),
        decompress=Decompress(kwargs.pop("decompress")),
    )


def run_options(f: F) -> F:
    """How a run ends and what it prints: --timeout, --expect, --console-log, --quiet, --json,
    -v (``boot`` and ``resume``)."""
    decorators = [
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                     metavar="SECONDS",
                     help="Stop the guest after SECONDS and exit 124, saying what was last "
                          "seen."),
        click.option("--expect", "expect", multiple=True, metavar="REGEX", callback=regexes,
                     help="Stop with status 0 once the console has matched every REGEX, in "
                          "order. Repeatable."),
        click.option("--console-log",
                     type=click.Path(dir_okay=False, writable=True, path_type=Path),
                     help="Also write the full guest console to this file."),
        click.option("--quiet", "-q", is_flag=True, help="Print nothing but the result."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print one JSON result on stdout; the console goes to stderr (or "
                          "nowhere with --quiet)."),
        click.option("-v", "--verbose", is_flag=True,
                     help="Also show unhandled ports, exit counts and injected events."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def _snapshot_path(ctx: click.Context, param: click.Parameter, value: Path | None
                   ) -> Path | None:
    """A snapshot is written at the end of the run: refuse a path that cannot be one now."""
    if value is not None and not value.parent.is_dir():
        raise click.BadParameter(f"{value.parent} is not a directory", ctx, param)
    if value is not None and value.is_dir():
        raise click.BadParameter(f"{value} is a directory", ctx, param)
    return value


snapshot_option = click.option(
    "--snapshot", type=click.Path(dir_okay=False, path_type=Path), callback=_snapshot_path,
    metavar="FILE",
    help="When every --expect has matched, save the stopped guest to FILE (written whole or "
         "not at all); `vmm-arch resume FILE` goes on from there. Needs --expect; the emulate "
         "backend (docs/snapshots.md).")


def regexes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
            ) -> tuple[str, ...]:
    """Refuse a pattern Python's ``re`` cannot compile while the options are read (status 64),
    not when the console first needs it."""
    import re

    for value in values:
        try:
            re.compile(value.encode())
        except re.error as e:
            raise click.BadParameter(f"{value!r} is not a regular expression: {e}") from None
    return values


#: Where --gdb-no-wait leaves its value for open_debugger (click's context metadata).
GDB_WAIT = "vmm-arch.gdb_wait"


def gdb_option(f: F) -> F:
    """``--gdb``: hold the guest for gdb before its first instruction, or with
    ``--gdb-no-wait`` let it run and take gdb whenever it comes (docs/gdb.md)."""
    decorated: F = click.option(
        "--gdb", "gdb_address", metavar="[HOST:]PORT|unix:PATH", callback=_gdb_address,
        help="A gdb stub there (host 127.0.0.1 by default): the guest waits for gdb before "
             "its first instruction; gdb stops it at breakpoints, steps it, reads and writes "
             "every vCPU's registers and memory, and continues, detaches (the guest runs on; "
             "gdb may come back) or kills (exit 137). docs/gdb.md.")(f)
    decorated = click.option(
        "--gdb-no-wait", is_flag=True, expose_value=False,
        callback=lambda ctx, param, value: ctx.meta.__setitem__(GDB_WAIT, not value),
        help="With --gdb: do not wait for gdb; the guest runs at once and gdb may attach "
             "later (it stops every vCPU then).")(decorated)
    return decorated


def _gdb_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from vmmarch_cli.gdb.stub import parse_address  # only with --gdb: not on every boot

        try:
            parse_address(value)
        except ValueError as e:
            raise click.BadParameter(f"{value!r}: {e} (expected [HOST:]PORT or unix:PATH)"
                                     ) from None
    return value


def open_debugger(address: str | None) -> Stub | None:
    """The gdb stub listening at ``address`` (None: no gdb), said on one line on stderr. It
    listens before anything boots, so a taken address ends the command at once (69)."""
    if address is None:
        return None
    from vmmarch_cli.gdb.stub import Stub, listen

    wait = bool(click.get_current_context().meta.get(GDB_WAIT, True))
    listener, where = listen(address)
    verb = "waiting for gdb" if wait else "gdb may attach"
    click.echo(f"vmm-arch: {verb} on {where} (gdb: target remote {where})", err=True)
    return Stub(listener, wait)


def attach_debugger(debugger: Stub | None) -> Callable[[Prepared], None] | None:
    """machine.run's on_ready for ``debugger`` (passed to it as ``debugger`` too): the VM it
    debugs, once it is made."""
    if debugger is None:
        return None

    def ready(prepared: Prepared) -> None:
        def answer(command: str, cpu: int) -> str | None:
            # Imported when gdb first asks (rich is a boot's largest import), and dump_regs
            # imports this module.
            from vmmarch_cli.commands.dump_regs import monitor
            from vmmarch_cli.render import as_text

            shown = monitor(prepared)(command, cpu)
            return None if shown is None else as_text(shown)

        if prepared.backend.name == "kvm" and not backends.runs_ring0_in_hardware("kvm"):
            click.echo("vmm-arch: gdb on this KVM (it emulates guest ring 0): stops in guest "
                       "ring 0 only, and no data watchpoints (docs/gdb.md)", err=True)
        debugger.attach(prepared.vcpus, prepared.vm.memory, answer)

    return ready
