"""One test per entry of the bad-input catalogue (docs/errors.md): a real image with a single
defect injected, and the exact named error it must raise."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from vmmarch_cli import loader
from vmmarch_cli.config import parse_mem_size
from vmmarch_cli.loader import errors
from vmmarch_cli.memory import MmapGuestMemory

from kernel_payloads import bzimage

MiB = 1 << 20
Edit = Callable[[bytearray], None]


def phdr(d: bytearray, i: int) -> int:
    return struct.unpack_from("<Q", d, 0x20)[0] + 56 * i  # e_phoff + i * e_phentsize


def note_phdr(d: bytearray) -> int:
    for i in range(struct.unpack_from("<H", d, 0x38)[0]):
        if struct.unpack_from("<I", d, phdr(d, i))[0] == 4:  # PT_NOTE
            return phdr(d, i)
    raise AssertionError("no PT_NOTE")


def set_pvh_descsz(d: bytearray, size: int) -> None:
    offset = struct.unpack_from("<Q", d, note_phdr(d) + 8)[0]
    struct.pack_into("<I", d, offset + 4, size)  # descsz of the first (Xen) note


ELF_CASES: dict[type[Exception], tuple[str, Edit]] = {
    errors.UnknownKernelFormat: ("bootcheck", lambda d: d.__setitem__(slice(0, 4), b"\0ELF")),
    errors.InvalidElfClass: ("bootcheck", lambda d: d.__setitem__(4, 1)),
    errors.BigEndianElfOnLittle: ("bootcheck", lambda d: d.__setitem__(5, 2)),
    errors.InvalidElfMachine: ("bootcheck",
                               lambda d: struct.pack_into("<H", d, 0x12, 183)),
    errors.InvalidProgramHeaderSize: ("bootcheck",
                                      lambda d: struct.pack_into("<H", d, 0x36, 32)),
    errors.ElfReadError: ("bootcheck", lambda d: struct.pack_into("<Q", d, 0x20, 1 << 40)),
    errors.NoLoadableSegments: ("bootcheck", lambda d: [
        struct.pack_into("<I", d, phdr(d, i), 6)  # every phdr becomes PT_PHDR
        for i in range(struct.unpack_from("<H", d, 0x38)[0])]),
    errors.SegmentSizeMismatch: ("bootcheck",
                                 lambda d: struct.pack_into("<Q", d, phdr(d, 0) + 0x28, 1)),
    errors.SegmentOutsideFile: ("bootcheck",
                                lambda d: struct.pack_into("<Q", d, phdr(d, 0) + 8, 1 << 30)),
    errors.InvalidEntryAddress: ("bootcheck",
                                 lambda d: struct.pack_into("<Q", d, 0x18, 0x5000000)),
    errors.SegmentOverlapsBootData: ("bootcheck", lambda d: (
        struct.pack_into("<Q", d, phdr(d, 0) + 0x18, 0x7000),
        struct.pack_into("<Q", d, 0x18, 0x7000))),
    errors.SegmentOutsideMemory: ("bootcheck", lambda d: (
        struct.pack_into("<Q", d, phdr(d, 0) + 0x18, 0x7000_0000),
        struct.pack_into("<Q", d, 0x18, 0x7000_0000))),
    errors.InvalidPvhNote: ("pvhcheck", lambda d: set_pvh_descsz(d, 2)),
}


@pytest.mark.parametrize("error", list(ELF_CASES), ids=lambda e: e.__name__)
def test_elf_catalogue(guests: dict[str, Path], tmp_path: Path, error: type[Exception]) -> None:
    guest, edit = ELF_CASES[error]
    data = bytearray(guests[guest].read_bytes())
    edit(data)
    path = tmp_path / "kernel"
    path.write_bytes(bytes(data))
    memory = MmapGuestMemory([(0, 64 * MiB)])
    try:
        with pytest.raises(error) as caught:
            loader.load_kernel(path, memory)
    finally:
        memory.close()
    assert type(caught.value) is error
    assert str(path) in str(caught.value)


BZ_CASES: dict[type[Exception], dict[str, int]] = {
    errors.InvalidBzImage: {"boot_flag": 0},
    errors.BzImageProtocolTooOld: {"version": 0x0206},
    errors.BzImageMissing64BitEntry: {"xloadflags": 0},
    errors.BzImageNotLoadableHigh: {"loadflags": 0},
    errors.BzImageTruncated: {"size": 2048},
}


@pytest.mark.parametrize("error", list(BZ_CASES), ids=lambda e: e.__name__)
def test_bzimage_catalogue(tmp_path: Path, error: type[Exception]) -> None:
    (tmp_path / "bz").write_bytes(bzimage(**BZ_CASES[error]))
    with pytest.raises(error):
        loader.parse_kernel(tmp_path / "bz")


def test_kernel_does_not_fit(tmp_path: Path) -> None:
    d = bytearray(bzimage())
    struct.pack_into("<I", d, 0x260, 0x800_0000)  # init_size 128 MiB
    (tmp_path / "bz").write_bytes(bytes(d))
    memory = MmapGuestMemory([(0, 64 * MiB)])
    try:
        with pytest.raises(errors.KernelDoesNotFit):
            loader.load_kernel(tmp_path / "bz", memory)
    finally:
        memory.close()


def test_kernel_not_found(tmp_path: Path) -> None:
    with pytest.raises(errors.KernelNotFound):
        loader.parse_kernel(tmp_path / "missing")


def test_cmdline_errors() -> None:
    k = loader.KernelImage(path="k", format="elf", entry=0, load_start=0, load_end=0,
                           cmdline_max=16)
    with pytest.raises(errors.InvalidCommandLine):
        loader.check_cmdline("a\0b", k)
    with pytest.raises(errors.CommandLineTooLong):
        loader.check_cmdline("x" * 16, k)
    assert loader.check_cmdline("x" * 15, k) == b"x" * 15


def test_initrd_errors(tmp_path: Path) -> None:
    k = loader.KernelImage(path="k", format="elf", entry=0, load_start=16 * MiB,
                           load_end=48 * MiB)
    memory = MmapGuestMemory([(0, 64 * MiB)])
    try:
        with pytest.raises(errors.InitrdNotFound):
            loader.load_initrd(tmp_path / "none", memory, k)
        (tmp_path / "big").write_bytes(bytes(20 * MiB))
        with pytest.raises(errors.InitrdTooLarge):
            loader.load_initrd(tmp_path / "big", memory, k)
        (tmp_path / "empty").write_bytes(b"")
        with pytest.raises(errors.InitrdTooLarge):
            loader.load_initrd(tmp_path / "empty", memory, k)
    finally:
        memory.close()


def test_memory_size_error() -> None:
    with pytest.raises(errors.InvalidMemorySize):
        parse_mem_size("8M")


def test_every_catalogue_entry_is_tested() -> None:
    import inspect

    tested = set(ELF_CASES) | set(BZ_CASES) | {
        errors.KernelDoesNotFit, errors.KernelNotFound, errors.InvalidCommandLine,
        errors.CommandLineTooLong, errors.InitrdNotFound, errors.InitrdTooLarge,
        errors.InvalidMemorySize,
    }
    declared = {cls for _, cls in inspect.getmembers(errors, inspect.isclass)
                if cls.__module__ == errors.__name__}
    assert declared == tested
