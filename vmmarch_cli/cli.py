"""The ``vmm-arch`` command group and the one place errors become exit statuses.

Commands are imported lazily: ``vmm-arch --help`` loads none of the backends.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import sys
from typing import Any, NoReturn

import click

from vmmarch_cli import __version__
from vmmarch_cli.errors import EX_INTERRUPTED, EX_USAGE, VmmArchError

#: command name -> (module, function, summary). The summary is the first sentence of the
#: command's docstring (tests/cli/test_cli_manners.py checks they agree): `vmm-arch --help` lists
#: the commands from it without importing them (importing them all took ~180 ms).
COMMANDS = {
    "boot": ("vmmarch_cli.commands.boot", "boot_command",
             "Boot KERNEL and stream the guest console to stdout."),
    "dump-regs": ("vmmarch_cli.commands.dump_regs", "dump_regs_command",
                  "Load KERNEL, run the arch setup pipeline, and show the vCPU state it left, "
                  "read back from the hypervisor, without starting the guest."),
    "engine": ("vmmarch_cli.commands.engine", "engine_command",
               "Show the emulate backend's CPU engine: which library it runs on, the patches, "
               "when it was built, and why the wheel would be used instead."),
    "fetch": ("vmmarch_cli.commands.fetch", "fetch_command",
              "Fetch a Debian kernel and a static busybox for test boots."),
    "backends": ("vmmarch_cli.commands.backends", "backends_command",
                 "List each backend, whether it is usable on this machine, and why not."),
    "stock": ("vmmarch_cli.commands.stock", "stock_command",
              "Fetch Debian's linux-image-<flavour>-amd64 and busybox-static with apt-get "
              "download (into the cache, never /boot), build an initramfs whose /init prints "
              "facts and the marker VMM-INIT-REACHED, and boot it."),
    "run": ("vmmarch_cli.commands.run", "run_command",
            "Boot KERNEL with a generated initramfs that runs COMMAND, and exit with its "
            "status."),
    "resume": ("vmmarch_cli.commands.resume", "resume_command",
               "Go on with the guest a `vmm-arch boot --snapshot` saved, from where it "
               "stopped."),
    "mkinitramfs": ("vmmarch_cli.commands.mkinitramfs", "mkinitramfs_command",
                    "Write a newc cpio initramfs with a static busybox to OUTPUT."),
    "inspect": ("vmmarch_cli.commands.inspect", "inspect_command",
                "Show what KERNEL is (detected from its bytes) and how `vmm-arch boot` would "
                "start it: format, version, boot protocols offered and the one picked, entry "
                "points, load segments, the PVH note, setup-header fields with their meaning, "
                "payload compression, memory needed."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Click's listing (same layout and truncation), from the summaries above."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, _shortened(COMMANDS[name][2], limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _shortened(summary: str, limit: int) -> str:
    """``summary`` cut at a word to fit ``limit`` columns with "..." (Click's listing does the
    same; its helper for it is deprecated in Click 8.2)."""
    if len(summary) <= limit:
        return summary
    words: list[str] = []
    used = 0
    for word in summary.split():
        if used + len(word) + bool(words) > limit - 3:
            break
        used += len(word) + bool(words)
        words.append(word)
    return " ".join(words) + "..."


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
    # A command is short-lived and makes few reference cycles: the cyclic collector only costs
    # time here (~8 ms of collections during the imports of a boot, measured).
    gc.disable()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        # Without standalone mode Click returns ctx.exit()'s status instead of exiting.
        status = cli.main(args=argv, prog_name="vmm-arch", standalone_mode=False)
        _ending()
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
        _ending()
        click.echo("vmm-arch: interrupted", err=True)
        sys.exit(EX_INTERRUPTED)
    sys.exit(status if isinstance(status, int) else 0)


def run() -> NoReturn:
    """The command-line entry point (``vmm-arch``, ``python -m vmmarch_cli``): ``main``, then
    the process ends at once with its status. Python's own shutdown (every module torn down, a
    last collection) took ~20 ms of every command for nothing: the files a command writes are
    closed before it returns, and the standard streams are flushed here."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = _status(e.code)
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # a profiler or coverage tool writes its data at the shutdown
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(code)


def _status(code: object) -> int:
    """What SystemExit's code means as an exit status (as the interpreter reads it)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _ending() -> None:
    """The command is over and vmm-arch exits with its status: a further Ctrl-C (the second of
    an impatient user), SIGTERM or SIGHUP changes nothing now. Without this, one that came
    after the orderly stop and its report killed the process by SIGINT instead of exit 130."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
