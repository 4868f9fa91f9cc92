"""``vmm-arch mkinitramfs``: the initramfs builder of ``run`` on its own."""

from __future__ import annotations

from pathlib import Path

import click

from vmmarch_cli import files
from vmmarch_cli.commands.run import parse_add


@click.command("mkinitramfs")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("command", nargs=-1)
@click.option("--busybox", type=click.Path(dir_okay=False, path_type=Path),
              help="Static busybox (default: Debian's busybox-static, fetched into the cache).")
@click.option("--add", "adds", multiple=True, metavar="HOST[:GUEST]",
              help="Copy a host file in (default guest path /root/NAME). Repeatable.")
@click.option("--marker", default="VMM-INIT-REACHED", show_default=True,
              help="Without COMMAND: the line init prints before reporting status 0.")
@click.option("--gzip/--no-gzip", "compress", default=True, show_default=True,
              help="Compress the newc cpio archive with gzip.")
def mkinitramfs_command(output: Path, command: tuple[str, ...], busybox: Path | None,
                        adds: tuple[str, ...], marker: str, compress: bool) -> None:
    """Write a newc cpio initramfs with a static busybox to OUTPUT.

    With COMMAND (after `--`) its /init runs COMMAND with stdout on ttyS1 and stderr on ttyS2
    and reports the exit status through I/O port 0xf4, as `vmm-arch run` does. Without it,
    /init prints facts (cmdline, CPUs, memory) and the marker line, then reports status 0.
    """
    from vmmarch_cli import initramfs
    from vmmarch_cli.assets import fetch_busybox

    box = busybox if busybox is not None else fetch_busybox()
    script = (initramfs.command_init_script(initramfs.Command(command)) if command
              else initramfs.marker_init_script(marker))
    image = initramfs.busybox_initramfs(box, script, [parse_add(a) for a in adds], compress)
    try:
        files.write_atomic(output, image)
    except OSError as exc:
        raise files.output_error(output, exc) from None
    click.echo(f"{output}: {len(image)} bytes")
