"""The ``vmm-arch`` command group and the one place errors become exit statuses.

Commands are imported lazily: ``vmm-arch --help`` loads none of the backends.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any

import click

from vmmarch_cli import __version__
from vmmarch_cli.errors import EX_INTERRUPTED, EX_USAGE, VmmArchError

#: command name -> (module, function)
COMMANDS = {
    "boot": ("vmmarch_cli.commands.boot", "boot_command"),
    "dump-regs": ("vmmarch_cli.commands.dump_regs", "dump_regs_command"),
    "fetch": ("vmmarch_cli.commands.fetch", "fetch_command"),
    "backends": ("vmmarch_cli.commands.backends", "backends_command"),
    "stock": ("vmmarch_cli.commands.stock", "stock_command"),
    "run": ("vmmarch_cli.commands.run", "run_command"),
    "mkinitramfs": ("vmmarch_cli.commands.mkinitramfs", "mkinitramfs_command"),
    "inspect": ("vmmarch_cli.commands.inspect", "inspect_command"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmm-arch")
def cli() -> None:
    """Boot x86_64 kernels through one hypervisor-neutral arch pipeline.

    \b
    Exit statuses (for CI scripts):
      0    clean guest poweroff/reset, --expect matched, or the command's job done
      N    the status the guest wrote to the exit port (0xf4)
      64   usage error          65  bad input (kernel, initrd, cmdline, size)
      69   backend unavailable  70  guest fault (registers are printed)
      124  timeout              130 interrupted (Ctrl-C, SIGTERM, SIGHUP)
      255  kernel panic seen on the console
    """


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM and SIGHUP stop a boot the same orderly way Ctrl-C does: the guest is stopped,
    # every vCPU thread joined, the VM closed, then the process exits 130.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> Any:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        # Without standalone mode Click returns ctx.exit()'s status instead of exiting.
        status = cli.main(args=argv, prog_name="vmm-arch", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("vmm-arch: interrupted", err=True)
        sys.exit(EX_INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(EX_USAGE if e.exit_code == 2 else e.exit_code)
    except VmmArchError as e:
        click.echo(f"vmm-arch: error: {e}", err=True)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        click.echo("vmm-arch: interrupted", err=True)
        sys.exit(EX_INTERRUPTED)
    sys.exit(status if isinstance(status, int) else 0)
