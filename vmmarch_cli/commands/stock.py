"""``vmm-arch stock``: fetch Debian's stock kernel and a busybox initramfs, boot to userspace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vmmarch_cli.commands import options
from vmmarch_cli.commands.boot import execute


@click.command("stock")
@click.option("--flavour", type=click.Choice(["cloud", "generic"]), default="cloud",
              show_default=True, help="Which Debian kernel to fetch and boot.")
@click.option("--image", type=click.Choice(["vmlinux", "bzimage"]), default="vmlinux",
              show_default=True, help="Boot the extracted ELF vmlinux or the bzImage itself.")
@options.boot_options
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=1800,
              show_default=True, metavar="SECONDS", help="Give up after SECONDS (exit 124).")
@click.option("--console-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full guest console to this file.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but the result.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Also show exit counts and injected events.")
@click.pass_context
def stock_command(ctx: click.Context, /, flavour: str, image: str, as_json: bool, quiet: bool,
                  verbose: bool, console_log: Path | None, **kwargs: Any) -> None:
    """Fetch Debian's linux-image-<flavour>-amd64 and busybox-static with apt-get download
    (into the cache, never /boot), build an initramfs whose /init prints facts and the marker
    VMM-INIT-REACHED, and boot it. Exits 0 when init reports success through the exit port.

    The boot takes about a second on hardware KVM and on the emulate backend, which --backend
    auto (the default) picks where /dev/kvm is missing or emulates guest ring 0 (nested PVM
    hosts, where a stock kernel on KVM needs minutes and never reaches userspace). The first
    run on the emulate backend also builds its CPU engine (about a minute, once).
    """
    from vmmarch_cli.assets import fetch_busybox, fetch_debian_kernel, stock_initramfs
    from vmmarch_cli.progress import status

    with status(f"fetching Debian's {flavour} kernel", quiet=quiet or as_json) as progress:
        kernel = fetch_debian_kernel(flavour, progress=progress)
        initramfs = stock_initramfs(progress=progress, busybox=fetch_busybox(progress=progress))
    kwargs["kernel"] = kernel.vmlinux if image == "vmlinux" else kernel.bzimage
    if kwargs.get("initrd") is None:
        kwargs["initrd"] = initramfs
    execute(ctx, options.boot_config(kwargs), as_json, quiet, verbose, console_log)
