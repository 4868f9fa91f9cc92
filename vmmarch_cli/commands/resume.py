"""``vmm-arch resume``: go on with a guest saved by ``boot --snapshot``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vmmarch_cli import backends
from vmmarch_cli.commands import options
from vmmarch_cli.commands.boot import check_snapshot_use, execute
from vmmarch_cli.config import BootConfig, parse_mem_size
from vmmarch_cli.machine import described_machine
from vmmarch_cli.profile import Symbols
from vmmarch_cli.snapshot import fileformat
from vmmarch_cli.snapshot.fileformat import SnapshotError


@click.command("resume")
@click.argument("snapshot_file", metavar="SNAPSHOT", type=click.Path(path_type=Path))
@options.backend_option
@click.option("--mem", default=None, metavar="SIZE",
              help="Guest RAM; a snapshot has its own, and a different size is refused (65).")
@click.option("--cpus", type=click.IntRange(min=1), default=None,
              help="vCPUs; a snapshot has its own, and a different count is refused (65).")
@options.run_options
@options.profile_options
@options.snapshot_option
@click.pass_context
def resume_command(ctx: click.Context, /, snapshot_file: Path, backend: str, mem: str | None,
                   cpus: int | None, snapshot: Path | None, as_json: bool, quiet: bool,
                   verbose: bool, console_log: Path | None, profile_hz: float,
                   symbols: Path | None, **kwargs: Any) -> None:
    """Go on with the guest a `vmm-arch boot --snapshot` saved, from where it stopped.

    The snapshot holds guest RAM (mapped copy-on-write: nothing is read until the guest touches
    it), every vCPU and every device; the guest's clocks go on from where they were, as if no
    time had passed. It ends as `boot` does (exit port, --expect, --timeout, ...), and
    --snapshot saves it again. A snapshot that is truncated, corrupted, from another format
    version, another backend or another CPU engine build is refused in one line (65).
    """
    taken = described_machine(fileformat.describe(snapshot_file))
    if mem is not None and parse_mem_size(mem) != taken.mem_size:
        raise SnapshotError(f"{snapshot_file}: the guest has {taken.mem_size >> 20} MiB of RAM, "
                            f"not --mem {mem}")
    if cpus is not None and cpus != taken.cpus:
        raise SnapshotError(f"{snapshot_file}: the guest has {taken.cpus} vCPUs, not "
                            f"--cpus {cpus}")
    config = BootConfig(kernel=Path(taken.kernel.path),
                        backend=taken.backend if backend == backends.AUTO else backend,
                        mem_size=taken.mem_size, cpus=taken.cpus, timeout=kwargs.pop("timeout"),
                        expect=tuple(kwargs.pop("expect")), snapshot=snapshot,
                        restore=snapshot_file, profile_hz=profile_hz)
    check_snapshot_use(config, None)
    syms = Symbols.load(symbols) if symbols is not None else None
    execute(ctx, config, as_json, quiet, verbose, console_log, syms)
