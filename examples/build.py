"""Build the example guest kernels in ``examples/guests/`` into ELF64 executables.

Each guest is one GNU ``as`` source file, ``examples/guests/<name>.S``. It is
assembled with ``as --64`` and linked with ``ld -m elf_x86_64`` using its own
linker script ``examples/guests/<name>.ld`` if there is one (``pvhcheck`` needs
a PT_NOTE), else the shared ``examples/guests/bootcheck.ld``. The result is
``<out_dir>/<name>.elf``: loaded by PT_LOAD at physical 0x1000000, entry
0x1000000. No binary is committed; build them when needed.

Library use::

    from examples.build import build_guest
    elf = build_guest("bootcheck", Path("build/guests"))

Command line::

    python examples/build.py [--out DIR] [NAME ...]

With no NAME, every guest is built. The default output directory is
``build/guests/`` at the repository root. A guest is rebuilt only when its
source or the linker script is newer than the existing ELF.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
GUESTS_DIR = EXAMPLES_DIR / "guests"
LINKER_SCRIPT = GUESTS_DIR / "bootcheck.ld"
DEFAULT_OUT_DIR = EXAMPLES_DIR.parent / "build" / "guests"

AS_FLAGS = ("--64", "--fatal-warnings", "--noexecstack")
LD_FLAGS = (
    "-m",
    "elf_x86_64",
    "-nostdlib",
    "-static",
    "--build-id=none",
    "-z",
    "max-page-size=0x1000",
    "-z",
    "noexecstack",
    "--fatal-warnings",
)


def board_include() -> str:
    """``board.inc``: the ports of the VMM's board (vmmarch_cli/arch/x86_64/board.py, the one
    home of those facts, the POST port too) and the registers and bits of its UART
    (vmmarch_cli/devices/serial.py) as assembler symbols for the guests."""
    from vmmarch_cli.arch.x86_64 import board
    from vmmarch_cli.devices import serial

    return "\n".join((
        "/* board.inc - written by examples/build.py from vmmarch_cli/arch/x86_64/board.py,",
        " * and vmmarch_cli/devices/serial.py (TI PC16550D datasheet, SNLS378, tables 2-4). */",
        f"        .set EXIT_PORT, {board.EXIT_PORT:#x}",
        f"        .set POST_PORT, {board.POST_PORT:#x}  /* no device: an exit, no effect */",
        f"        .set COM1, {board.CONSOLE.base:#x}",
        f"        .set COM1_THR, COM1 + {serial.UART_TX}",
        f"        .set COM1_DLM, COM1 + {serial.UART_DLM}",
        f"        .set COM1_LCR, COM1 + {serial.UART_LCR}",
        f"        .set COM1_MCR, COM1 + {serial.UART_MCR}",
        f"        .set COM1_LSR, COM1 + {serial.UART_LSR}",
        f"        .set LCR_DLAB, {serial.UART_LCR_DLAB:#x}",
        f"        .set MCR_OUT2, {serial.UART_MCR_OUT2:#x}",
        f"        .set MCR_LOOP, {serial.UART_MCR_LOOP:#x}",
        f"        .set LSR_DR, {serial.UART_LSR_DR:#x}",
        f"        .set LSR_THRE, {serial.UART_LSR_THRE:#x}",
        "",
    ))


def write_board_include(out_dir: Path) -> Path:
    """``out_dir``/board.inc, rewritten only when its text changes (so its age says when the
    board last changed, for the up-to-date check)."""
    path = out_dir / "board.inc"
    text = board_include()
    if not path.is_file() or path.read_text() != text:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def available_guests() -> list[str]:
    """Return the names of all guests (the stems of ``examples/guests/*.S``), sorted."""
    return sorted(p.stem for p in GUESTS_DIR.glob("*.S"))


def linker_script_for(name: str) -> Path:
    """Return guest ``name``'s linker script: ``<name>.ld`` if present, else the shared one."""
    own = GUESTS_DIR / f"{name}.ld"
    return own if own.is_file() else LINKER_SCRIPT


def _require_tool(tool: str) -> str:
    """Return the full path of ``tool``, or raise RuntimeError naming it."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(
            f"cannot build guests: the GNU binutils tool {tool!r} was not found on PATH "
            "(install binutils)"
        )
    return path


def _run(argv: Sequence[str]) -> None:
    """Run one build command; raise RuntimeError with its output if it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise RuntimeError(
            f"command failed with exit status {proc.returncode}: {' '.join(argv)}\n{output}"
        )


def _is_up_to_date(output: Path, inputs: Sequence[Path]) -> bool:
    """True if ``output`` exists and is at least as new as every input."""
    try:
        out_mtime = output.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(p.stat().st_mtime_ns <= out_mtime for p in inputs)


def build_guest(name: str, out_dir: Path) -> Path:
    """Assemble and link ``examples/guests/<name>.S`` into ``<out_dir>/<name>.elf``.

    The ELF is rebuilt only if the source or the guest's linker script (see
    :func:`linker_script_for`) is newer than an existing output. ``out_dir``
    is created if needed.

    Args:
        name: guest name, e.g. ``"bootcheck"``.
        out_dir: directory for the object file and the ELF.

    Returns:
        The path of the ELF executable.

    Raises:
        FileNotFoundError: if there is no source for ``name``.
        RuntimeError: if ``as`` or ``ld`` is missing, or assembling/linking fails.
    """
    known = available_guests()
    if name not in known:
        raise FileNotFoundError(
            f"no guest named {name!r} in {GUESTS_DIR} (known guests: {', '.join(known) or 'none'})"
        )
    source = GUESTS_DIR / f"{name}.S"

    out_dir = Path(out_dir)
    elf = out_dir / f"{name}.elf"
    script = linker_script_for(name)
    board = write_board_include(Path(out_dir))
    includes = tuple(sorted(GUESTS_DIR.glob("*.inc")))  # what `.include` may pull in
    if _is_up_to_date(elf, (source, script, board, *includes)):
        return elf

    assembler = _require_tool("as")
    linker = _require_tool("ld")
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / f"{name}.o"
    tmp_elf = out_dir / f"{name}.elf.tmp"

    _run([assembler, *AS_FLAGS, "-I", str(out_dir), "-I", str(GUESTS_DIR), "-o", str(obj),
          str(source)])
    _run([linker, *LD_FLAGS, "-T", str(script), "-o", str(tmp_elf), str(obj)])
    # Rename into place so a failed link never leaves a fresh-looking ELF behind.
    os.replace(tmp_elf, elf)
    return elf


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: build the named guests (default: all)."""
    parser = argparse.ArgumentParser(
        description="Build the example guest kernels (examples/guests/*.S) into ELF64 files."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_DIR,
        metavar="DIR",
        help=f"output directory (default: {DEFAULT_OUT_DIR})",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"guests to build (default: all of {', '.join(available_guests())})",
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out
    names: list[str] = args.names or available_guests()

    try:
        for name in names:
            print(build_guest(name, out_dir))
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
