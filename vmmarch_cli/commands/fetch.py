"""``vmm-arch fetch``: download the stock Debian test inputs into the cache, print their paths."""

from __future__ import annotations

import json

import click

_HELP = """Fetch a Debian kernel and a static busybox for test boots.

Downloads linux-image-<flavour> and busybox-static with `apt-get download` into the cache
({cache}; set VMMARCH_CACHE to move it), unpacks them there with `dpkg-deb -x`, extracts the
vmlinux ELF from the bzImage, and builds the busybox initramfs. Nothing is installed: /boot and
the package database are never touched. Files already in the cache are reused.

Prints the bzImage, vmlinux, busybox and initramfs paths and the kernel release, as
`name: value` lines or, with --json, one JSON object.
"""


class _FetchCommand(click.Command):
    """Fills the cache path into the help text when it is shown, not when the CLI is imported."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from vmmarch_cli.files import cache_dir

        self.help = _HELP.format(cache=cache_dir())
        super().format_help_text(ctx, formatter)


@click.command(
    "fetch", cls=_FetchCommand, help=_HELP.format(cache="$VMMARCH_CACHE or ~/.cache/vmm-arch")
)
@click.option(
    "--flavour",
    type=click.Choice(["cloud", "generic"]),
    default="cloud",
    show_default=True,
    help="Debian kernel flavour: cloud (LZ4 payload, fewer drivers) or generic (XZ payload).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def fetch_command(flavour: str, as_json: bool) -> None:
    # Imported here so that `vmm-arch --help` does not load the asset machinery.
    from vmmarch_cli.assets import fetch_busybox, fetch_debian_kernel, stock_initramfs
    from vmmarch_cli.progress import status

    # Status goes to stderr so that stdout stays the result alone.
    with status(f"fetching Debian's {flavour} kernel") as progress:
        kernel = fetch_debian_kernel(flavour, progress=progress)
        busybox = fetch_busybox(progress=progress)
        initramfs = stock_initramfs(progress=progress, busybox=busybox)
    result = {
        "bzimage": str(kernel.bzimage),
        "vmlinux": str(kernel.vmlinux),
        "busybox": str(busybox),
        "initramfs": str(initramfs),
        "version": kernel.version,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for name, value in result.items():
            click.echo(f"{name}: {value}")
