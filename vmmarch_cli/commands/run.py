"""``vmm-arch run KERNEL -- CMD ARGS``: run one command in a fresh guest, end with its status."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import click

from vmmarch_cli import files, machine
from vmmarch_cli.commands import options
from vmmarch_cli.commands.boot import report, result_json
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.stop import StopReason

#: With --json the command's output is kept for the document, up to this many bytes each.
CAPTURE_LIMIT = 1 << 20


def parse_add(spec: str) -> tuple[Path, str]:
    """``HOST[:GUEST]``; GUEST defaults to /root/<name of HOST>."""
    host, sep, guest = spec.partition(":")
    path = Path(host)
    if not path.is_file():
        raise BadInputError(f"--add {spec}: {host} is not a file")
    return path, guest if sep else f"/root/{path.name}"


class _Capture:
    def __init__(self) -> None:
        self.data = bytearray()
        self.truncated = False

    def write(self, chunk: bytes) -> None:
        room = CAPTURE_LIMIT - len(self.data)
        self.data += chunk[:room]
        self.truncated |= len(chunk) > room


def _stream(out: BinaryIO) -> Callable[[bytes], None]:
    def write(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()

    return write


@click.command("run", context_settings={"ignore_unknown_options": False})
@options.kernel_argument
@click.argument("command", nargs=-1, required=True)
@options.boot_options
@click.option("--busybox", type=click.Path(dir_okay=False, path_type=Path),
              help="Static busybox to use (default: busybox on PATH if static, else Debian's "
                   "busybox-static fetched into the cache).")
@click.option("--add", "adds", multiple=True, metavar="HOST[:GUEST]",
              help="Copy a host file into the initramfs (default guest path /root/NAME). "
                   "Repeatable.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after SECONDS and exit 124.")
@click.option("--console-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the kernel log (the serial console) to this file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document; the command's output is in it, not streamed.")
@click.option("-v", "--verbose", is_flag=True, help="Show the kernel log on stderr.")
@options.gdb_option
@click.pass_context
def run_command(ctx: click.Context, /, command: tuple[str, ...], busybox: Path | None,
                adds: tuple[str, ...], as_json: bool, verbose: bool, console_log: Path | None,
                gdb_address: str | None, **kwargs: Any) -> None:
    """Boot KERNEL with a generated initramfs that runs COMMAND, and exit with its status.

    \b
    Example:  vmm-arch run vmlinux -- sh -c 'uname -a; exit 7'   (exits 7)

    COMMAND runs as PID 1's child under busybox sh with /proc, /sys and /dev mounted. Its
    stdout and stderr reach this process's stdout and stderr (through the guest's COM2 and
    COM3); the kernel log (COM1) is shown only with -v or written to --console-log. A kernel
    panic exits 255, a timeout 124, a guest fault 70.
    """
    from vmmarch_cli import initramfs
    from vmmarch_cli.assets import AssetError, fetch_busybox

    if kwargs.get("initrd") is not None:
        raise BadInputError("run builds its own initramfs; use --add to put files in it")
    from vmmarch_cli.progress import status

    extra = [parse_add(spec) for spec in adds]
    # Piped, run's stderr is the command's alone: no status lines there.
    with status("building the initramfs", quiet=as_json or not sys.stderr.isatty()) as progress:
        box = busybox if busybox is not None else _static_busybox() or fetch_busybox(progress)
        # Uncompressed, as for `stock`: no inflate in guest ring 0 (minutes on a PVM host).
        image = initramfs.busybox_initramfs(box, initramfs.command_init_script(command), extra,
                                            compress=False)
    with tempfile.NamedTemporaryFile(prefix="vmm-arch-run-", suffix=".cpio") as rd:
        try:
            rd.write(image)
            rd.flush()
        except OSError as exc:
            raise AssetError(f"cannot write the initramfs in {tempfile.gettempdir()}: "
                             f"{exc.strerror}; {files.advice(exc)} (set TMPDIR)") from None
        kwargs["initrd"] = Path(rd.name)
        config = options.boot_config(kwargs)
        debugger = options.open_debugger(gdb_address)
        out, err = _Capture(), _Capture()
        sinks = ((out.write, err.write) if as_json
                 else (_stream(sys.stdout.buffer), _stream(sys.stderr.buffer)))
        console = sys.stderr.buffer if verbose and not as_json else None
        log = console_log.open("wb") if console_log is not None else None
        try:
            result = machine.run(config, console, log, serial_sinks=sinks,
                                 on_ready=options.attach_debugger(debugger),
                                 debugger=debugger)
            if debugger is not None:
                debugger.finish(result.status)
        finally:
            if log is not None:
                # A write error was already reported (Console.warnings); closing retries it.
                with contextlib.suppress(OSError):
                    log.close()
    if as_json:
        doc = result_json(result)
        doc["command"] = list(command)
        doc["stdout"] = out.data.decode(errors="replace")
        doc["stderr"] = err.data.decode(errors="replace")
        doc["output_truncated"] = out.truncated or err.truncated
        if console_log is not None:
            doc["console_log"] = str(console_log)
        click.echo(json.dumps(doc, indent=2))
    elif result.reason is not StopReason.EXIT_PORT or verbose or result.warnings:
        report(result, quiet=not verbose, verbose=verbose)
    ctx.exit(result.status)


def _static_busybox() -> Path | None:
    """busybox on PATH, if it is statically linked (a dynamic one cannot run in the guest)."""
    found = shutil.which("busybox")
    if found is None:
        return None
    with open(found, "rb") as f:
        head = f.read(4096)
    # A dynamically linked ELF names its interpreter (PT_INTERP) near the start.
    return None if b"ld-linux" in head else Path(found)
