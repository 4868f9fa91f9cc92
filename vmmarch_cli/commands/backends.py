"""``vmm-arch backends``: which hypervisor backends work here, and why not."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from vmmarch_cli import backends
from vmmarch_cli.errors import BackendUnavailableError
from vmmarch_cli.vcpu import HypervisorInfo


@click.command("backends")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def backends_command(as_json: bool) -> None:
    """List each backend, whether it is usable on this machine, and why not.

    For KVM this opens /dev/kvm and checks the API version and every capability vmm-arch
    needs; it also says whether guest ring 0 runs in hardware or is emulated (then the CPU
    mask and the int3 fallback apply). The last row says what --backend auto (the default)
    picks here, and why.
    """
    infos = [backends.probe(name) for name in backends.names()] + [_auto()]
    if as_json:
        click.echo(json.dumps([{"name": i.name, "usable": i.usable, "reason": i.reason,
                                "facts": i.facts} for i in infos], indent=2))
        return
    t = Table(title="backends")
    t.add_column("backend")
    t.add_column("usable")
    t.add_column("why not / facts", overflow="fold")  # a library path is wrapped, never cut
    for i in infos:
        facts = i.reason or "; ".join(f"{k}: {v}" for k, v in i.facts.items())
        t.add_row(i.name, "yes" if i.usable else "[red]no[/]", facts)
    Console().print(t)


def _auto() -> HypervisorInfo:
    """``auto`` as a row: what it picks here and why (backends.pick)."""
    try:
        chosen = backends.pick()
    except BackendUnavailableError as e:
        return HypervisorInfo(backends.AUTO, False, str(e))
    return HypervisorInfo(backends.AUTO, True, "", {"picks": chosen.name, "why": chosen.reason})
