"""One fuzz target per input parser: bytes in; only the named errors (``BadInputError`` and its
subclasses, docs/errors.md) may come out. Anything else is a bug.

The same targets run in the test suite under hypothesis (tests/loader/test_fuzz_parsers.py, a
bounded number of examples) and under atheris for long coverage-guided campaigns
(``python -m fuzz``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from vmmarch_cli import loader
from vmmarch_cli.arch.x86_64 import acpi, aml, cpuid, mptable, tables
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.config import parse_mem_size
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.loader import elf
from vmmarch_cli.loader.decompress import decompress
from vmmarch_cli.memory import MmapGuestMemory

ROOT = Path(__file__).resolve().parent.parent
#: Guest RAM for the loader targets: enough for the project's guests and a bzImage's init_size.
LOADER_MEM = 64 << 20

Target = Callable[[bytes], None]


def _text(data: bytes) -> str:
    # surrogateescape: what Python gives a program for undecodable argv bytes
    return data.decode("utf-8", "surrogateescape")


@cache
def _kernel_file() -> Path:
    fd, name = tempfile.mkstemp(prefix="vmmarch-fuzz-", suffix=".img")
    os.close(fd)
    return Path(name)


@cache
def _memory() -> MmapGuestMemory:
    # One mapping reused by every input: a loader may leave bytes behind, which is harmless,
    # and a fresh 64 MiB mapping per input would dominate the campaign's time.
    return MmapGuestMemory([(0, LOADER_MEM)])


def kernel_image(data: bytes) -> None:
    """Format detection and the ELF / PVH / bzImage loaders, from a file, into guest memory."""
    path = _kernel_file()
    path.write_bytes(data)
    with contextlib.suppress(BadInputError):
        loader.load_kernel(path, _memory())


def pvh_note(data: bytes) -> None:
    """The ELF note walker that finds XEN_ELFNOTE_PHYS32_ENTRY."""
    with contextlib.suppress(BadInputError):
        elf.find_pvh_entry(data, "fuzz")


def payload(data: bytes) -> None:
    """The bzImage payload decompressors (magic picked by the first bytes)."""
    with contextlib.suppress(BadInputError):
        decompress(data)


def memory_size(data: bytes) -> None:
    """``--mem``: a number with a K/M/G/T suffix, page-aligned, within the allowed range."""
    try:
        size = parse_mem_size(_text(data))
    except BadInputError:
        return
    assert size % 4096 == 0 and size >= 16 << 20


def cpu_mask(data: bytes) -> None:
    """``--cpu-mask``: feature names, closed over their dependents, never a required one."""
    try:
        mask = cpuid.parse_mask(_text(data))
    except BadInputError:
        return
    assert mask <= set(cpuid.FEATURES)


def cmdline(data: bytes) -> None:
    """The kernel command line: length against the image's limit, no NUL, bytes from argv."""
    k = loader.KernelImage(path="k", format=loader.KernelFormat.ELF, entry=0, load_start=0,
                           load_end=0)
    try:
        raw = loader.check_cmdline(_text(data), k)
    except BadInputError:
        return
    assert len(raw) < k.cmdline_max and b"\0" not in raw


def initramfs_command(data: bytes) -> None:
    """``vmm-arch run KERNEL -- ARGV``: the argv made into the initramfs's /init script."""
    from vmmarch_cli import initramfs

    argv = _text(data).split("\x00") or [""]
    try:
        script = initramfs.command_init_script(initramfs.Command(tuple(argv)))
    except BadInputError:
        return
    assert script.startswith("#!/bin/busybox sh\n")


@cache
def _tables_memory() -> MmapGuestMemory:
    return MmapGuestMemory([(0, 2 << 20)])


def boot_tables(data: bytes) -> None:
    """``dump-regs --tables`` on whatever guest memory holds where the tables should be.

    The readers must report a bad table, never raise or read outside guest memory."""
    mem = _tables_memory()
    blob = data[: 0x1000]
    mem.write(0xE0000, blob.ljust(0x1000, b"\0"))
    mem.write(0x9FC00, blob[::-1].ljust(0x400, b"\0")[:0x400])
    for protocol in BootProtocol:
        with contextlib.suppress(BadInputError):  # a memmap pointer outside guest memory
            tables.read_boot_tables(mem, protocol)
    for read in (lambda: acpi.read_all(mem.read, 0xE0000),
                 lambda: mptable.read(mem.read, 0x9FC00)):
        with contextlib.suppress(ValueError, BadInputError):
            read()


def aml_devices(data: bytes) -> None:
    """The DSDT device reader (``dump-regs --tables``) on any table body."""
    with contextlib.suppress(aml.AmlError):
        aml.decode_devices(data)


TARGETS: dict[str, Target] = {
    "kernel_image": kernel_image,
    "pvh_note": pvh_note,
    "payload": payload,
    "memory_size": memory_size,
    "cpu_mask": cpu_mask,
    "cmdline": cmdline,
    "initramfs_command": initramfs_command,
    "boot_tables": boot_tables,
    "aml_devices": aml_devices,
}


def seeds(name: str) -> list[bytes]:
    """Real inputs to start each campaign from (mutating a valid image finds deep paths)."""
    if name == "kernel_image":
        return [guest_bytes("bootcheck"), guest_bytes("pvhcheck"), bzimage_header()]
    if name == "pvh_note":
        return [struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x100000)]
    if name == "payload":
        return [b"\x1f\x8b\x08\x00" + bytes(16), b"\xfd7zXZ\x00" + bytes(16), b"BZh9"]
    if name == "memory_size":
        return [b"256M", b"4G", b"1048576K", b"512"]
    if name == "cpu_mask":
        return [b"cx16,xsave", b"none", b"avx512f"]
    if name == "cmdline":
        return [b"console=ttyS0 quiet", b"init=/bin/sh \xff"]
    if name == "initramfs_command":
        return [b"sh\x00-c\x00exit 7", b"true"]
    if name == "aml_devices":
        return [acpi.dsdt()[acpi.SDT_HEADER_SIZE:]]
    if name == "boot_tables":
        return [b"".join(data for _, data in acpi.build(2).blobs)]
    return []


def _module(path: Path) -> Any:
    """A helper script of this repository that is not a package (examples/, tests/)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def guest_bytes(name: str) -> bytes:
    """A guest of examples/guests, assembled by examples/build.py."""
    out = Path(tempfile.gettempdir()) / "vmmarch-fuzz-guests"
    data: bytes = _module(ROOT / "examples" / "build.py").build_guest(name, out).read_bytes()
    return data


def bzimage_header() -> bytes:
    """The smallest bzImage the loader accepts (tests/kernel_payloads.py's, as the bad-input
    tests use)."""
    data: bytes = _module(ROOT / "tests" / "kernel_payloads.py").bzimage()
    return data
