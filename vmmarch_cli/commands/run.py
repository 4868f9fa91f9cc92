"""``vmm-arch run KERNEL -- CMD ARGS``: run one command in a fresh guest, end with its status."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click

from vmmarch_cli import files, machine
from vmmarch_cli.commands import options
from vmmarch_cli.commands.boot import report, result_json
from vmmarch_cli.config import BootConfig
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.stop import StopReason

if TYPE_CHECKING:
    from vmmarch_cli.initramfs import Job

#: With --json the command's output is kept for the document, up to this many bytes each.
CAPTURE_LIMIT = 1 << 20


def _parse_env(spec: str) -> tuple[str, str]:
    """``NAME=VALUE`` of --env (the name is checked where the command is built)."""
    name, sep, value = spec.partition("=")
    if not sep:
        raise BadInputError(f"--env {spec}: give NAME=VALUE")
    return name, value


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
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Set NAME to VALUE in COMMAND's environment (init's otherwise: PATH=/bin). "
                   "Repeatable.")
@click.option("--cwd", default="/", show_default=True, metavar="DIR",
              help="The guest directory COMMAND runs in (an absolute path; a missing one ends "
                   "the run with cd's status and message).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after SECONDS and exit 124.")
@click.option("--console-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the kernel log (the serial console) to this file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document; the command's output is in it, not streamed.")
@click.option("-v", "--verbose", is_flag=True, help="Show the kernel log on stderr.")
@click.option("--no-snapshot", is_flag=True,
              help="Boot a fresh guest with the command in its initramfs, instead of restoring "
                   "the cached snapshot of one booted to its init (the emulate backend's "
                   "default; docs/snapshots.md).")
@options.gdb_option
@click.pass_context
def run_command(ctx: click.Context, /, command: tuple[str, ...], busybox: Path | None,
                adds: tuple[str, ...], env: tuple[str, ...], cwd: str, as_json: bool,
                verbose: bool, console_log: Path | None, no_snapshot: bool,
                gdb_address: str | None, **kwargs: Any) -> None:
    """Boot KERNEL with a generated initramfs that runs COMMAND, and exit with its status.

    \b
    Example:  vmm-arch run vmlinux -- sh -c 'uname -a; exit 7'   (exits 7)

    COMMAND runs as PID 1's child under busybox sh with /proc, /sys and /dev mounted. Its
    stdout and stderr reach this process's stdout and stderr (through the guest's COM2 and
    COM3); the kernel log (COM1) is shown only with -v or written to --console-log. A kernel
    panic exits 255, a timeout 124, a guest fault 70.

    On the emulate backend the first run for a kernel and settings boots it to where its init
    waits, and saves that guest in the cache; every later run restores it and hands it the
    command, its --env and --cwd, the --add files and the host's time (--no-snapshot boots
    afresh).
    """
    from vmmarch_cli import initramfs
    from vmmarch_cli.assets import fetch_busybox

    if kwargs.get("initrd") is not None:
        raise BadInputError("run builds its own initramfs; use --add to put files in it")
    from vmmarch_cli.progress import status

    extra = [parse_add(spec) for spec in adds]
    what = initramfs.Command(command, tuple(_parse_env(e) for e in env), cwd)
    def job_now() -> Job:
        """The job, with the guest's clock set to the host's now (it is handed over late)."""
        return initramfs.job(what, extra, time.time())

    job = job_now()  # checks the command too
    # Piped, run's stderr is the command's alone: no status lines there.
    with status("building the initramfs", quiet=as_json or not sys.stderr.isatty()) as progress:
        box = busybox if busybox is not None else _static_busybox() or fetch_busybox(progress)
    out, err = _Capture(), _Capture()
    sinks = ((out.write, err.write) if as_json
             else (_stream(sys.stdout.buffer), _stream(sys.stderr.buffer)))
    console = sys.stderr.buffer if verbose and not as_json else None
    log = console_log.open("wb") if console_log is not None else None
    snapshot: dict[str, Any] | None = None
    try:
        runs = _Runs(console, log, sinks)
        if not no_snapshot and gdb_address is None:
            snapshot = runs.from_snapshot(kwargs, box, job, job_now)
        if snapshot is None:
            # Uncompressed, as for `stock`: no inflate in guest ring 0 (minutes on a PVM host).
            image = initramfs.busybox_initramfs(box, initramfs.command_init_script(what),
                                                extra, compress=False)
            with _initrd(image) as rd:
                config = options.boot_config({**kwargs, "initrd": rd})
                debugger = options.open_debugger(gdb_address)
                runs.result = machine.run(config, console, log, serial_sinks=sinks,
                                          on_ready=options.attach_debugger(debugger),
                                          debugger=debugger)
                if debugger is not None:
                    debugger.finish(runs.result.status)
    finally:
        if log is not None:
            # A write error was already reported (Console.warnings); closing retries it.
            with contextlib.suppress(OSError):
                log.close()
    result = runs.result
    assert result is not None
    if as_json:
        doc = result_json(result)
        if snapshot is not None:
            doc["snapshot"] = snapshot
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


@contextlib.contextmanager
def _initrd(image: bytes) -> Iterator[Path]:
    """``image`` in a temporary file, for as long as a boot reads it."""
    from vmmarch_cli.assets import AssetError

    with tempfile.NamedTemporaryFile(prefix="vmm-arch-run-", suffix=".cpio") as rd:
        try:
            rd.write(image)
            rd.flush()
        except OSError as exc:
            raise AssetError(f"cannot write the initramfs in {tempfile.gettempdir()}: "
                             f"{exc.strerror}; {files.advice(exc)} (set TMPDIR)") from None
        yield Path(rd.name)


class _Runs:
    """The boots of one ``run``: with a snapshot, maybe one that saves it, then the one that
    restores it and runs the job; ``result`` is the last one's."""

    def __init__(self, console: BinaryIO | None, log: BinaryIO | None,
                 sinks: Sequence[Callable[[bytes], None]]) -> None:
        self.console, self.log, self.sinks = console, log, sinks
        self.result: machine.BootResult | None = None

    def from_snapshot(self, kwargs: dict[str, Any], box: Path, job: Job,
                      job_now: Callable[[], Job]) -> dict[str, Any] | None:
        """Run ``job`` in the cached snapshot; None when this backend cannot, or the job is too
        large for the UART. Without a snapshot (or with one that does not fit this engine) the
        guest boots, is saved, and goes on with the job in the same VM (``job_now``: made when
        it is handed over, so that the guest's clock is the host's then)."""
        from vmmarch_cli import backends, initramfs, runjob
        from vmmarch_cli.errors import BackendUnavailableError
        from vmmarch_cli.snapshot.fileformat import SnapshotError

        if backends.resolve(kwargs["backend"]).name != "emulate" or not runjob.fits(job):
            return None
        base = options.boot_config({**kwargs, "initrd": None})
        init = initramfs.job_init_script()
        settings = [repr(v) for v in (base.backend, base.mem_size, base.cpus, base.cmdline,
                                      base.append, base.cpu_mask, base.boot_protocol,
                                      base.decompress)]
        try:
            path = runjob.snapshot_path(base.kernel, box, init, settings)
        except OSError:
            return None  # no such kernel or busybox: the fresh boot says so, in one line
        if not path.is_file():  # it may be on its way: a writer finishes it in ~0.1 s
            from vmmarch_cli.snapshot.writer import last_failure, wait_for_writer

            wait_for_writer(path)
            # A writer that failed after its run had ended left why (writer.py): say it once.
            failure = None if path.is_file() else last_failure(path)
            if failure is not None:
                click.echo("vmm-arch: warning: the snapshot an earlier run took was not saved: "
                           f"{failure}", err=True)
        for attempt in range(2):
            if attempt or not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                image = initramfs.busybox_initramfs(box, init, compress=False)
                with _initrd(image) as rd:
                    boot = replace(base, initrd=rd, expect=(initramfs.JOB_READY,),
                                   snapshot=path, snapshot_cached=True,
                                   snapshot_refs=(box,))
                    try:
                        self.result = machine.run(
                            boot, self.console, self.log, serial_sinks=self.sinks, quiet=True,
                            after_snapshot=lambda bus: runjob.hand_over(job_now())(bus))
                    except BackendUnavailableError:
                        return None  # the wheel: no snapshots here, boot afresh
                # Saved, then the job ran in this VM; or the boot itself failed.
                return {"path": str(path), "taken": self.result.snapshot is not None}
            restore = BootConfig(kernel=base.kernel, backend=base.backend,
                                 mem_size=base.mem_size, cpus=base.cpus, timeout=base.timeout,
                                 restore=path)
            try:
                self.result = machine.run(restore, self.console, self.log,
                                          serial_sinks=self.sinks, quiet=True,
                                          before_start=runjob.hand_over(job_now()))
            except BackendUnavailableError:
                return None  # the wheel, with another process's snapshot cached: boot afresh
            except SnapshotError:
                if attempt:
                    raise
                path.unlink(missing_ok=True)  # another engine's, or damaged: take it again
                continue
            return {"path": str(path), "taken": False}
        return None  # not reached: the second attempt returns or raises


def _static_busybox() -> Path | None:
    """busybox on PATH, if it is statically linked (a dynamic one cannot run in the guest)."""
    found = shutil.which("busybox")
    if found is None:
        return None
    with open(found, "rb") as f:
        head = f.read(4096)
    # A dynamically linked ELF names its interpreter (PT_INTERP) near the start.
    return None if b"ld-linux" in head else Path(found)
