"""Kernel, initrd and command-line loading; the format is detected from the bytes, not the name."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from enum import StrEnum
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from vmmarch_cli.arch.x86_64 import layout
from vmmarch_cli.files import NotRegularFile, open_regular
from vmmarch_cli.loader import elf64, errors
from vmmarch_cli.loader.host_decompress import (
    Decompress,
    Decompression,
    HostCannotDecompress,
    HostVmlinux,
    VmlinuxFile,
    host_vmlinux,
)
from vmmarch_cli.vcpu import GuestMemory

if TYPE_CHECKING:
    from vmmarch_cli.loader import bzimage, elf

# ``elf`` (pyelftools: ~10 ms of imports) and ``bzimage`` (with boot_params: ~4 ms) are
# imported where a kernel is parsed or loaded (on a boot, by its loading thread: machine.py):
# a snapshot's restore, --help and the commands that load no kernel never pay for them.

#: boot.rst: without a header saying otherwise the initrd must end below 0x37FFFFFF + 1.
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF


class KernelFormat(StrEnum):
    ELF = "elf"  # a vmlinux: entered at e_entry (64-bit protocol) or its Xen PVH note
    BZIMAGE = "bzimage"  # a bzImage: the boot protocol's setup header and a compressed payload


@dataclass(frozen=True)
class KernelImage:
    """What the loader put in guest memory, and what the boot protocol needs to know of it."""

    path: str
    format: KernelFormat
    entry: int
    load_start: int
    load_end: int
    pvh_entry: int | None = None
    setup_header: bytes = b""
    cmdline_max: int = layout.CMDLINE_MAX_SIZE  # bytes including the NUL
    initrd_addr_max: int = DEFAULT_INITRD_ADDR_MAX
    #: boot_params.kernel_alignment to report; 0 keeps the image's own (bzImage).
    kernel_alignment: int = 0x100_0000
    #: A bzImage: who decompressed its payload, and why (None for an ELF).
    decompression: Decompression | None = None


@dataclass(frozen=True)
class ParsedKernel:
    """A validated kernel image, before anything is written to guest memory. ``elf`` with
    ``bzimage`` is the bzImage's vmlinux, decompressed on the host and held in ``vmlinux``."""

    path: Path
    size: int
    image: KernelImage
    elf: elf.ElfInfo | None = None
    bzimage: bzimage.BzImageInfo | None = None
    vmlinux: HostVmlinux | None = None


def _open(path: Path) -> BufferedReader:
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise errors.KernelNotFound(f"{path}: no such file") from None
    except NotRegularFile as e:
        raise errors.KernelNotFound(f"{path}: {e}") from None
    except OSError as e:
        raise errors.KernelNotFound(f"{path}: cannot read: {e.strerror}") from None


#: What a bzImage gets when the caller plans nothing: the kernel decompresses itself.
GUEST_DECOMPRESSES = Decompression(Decompress.GUEST, Decompress.GUEST, "--decompress guest")


def parse_kernel(path: Path, plan: Decompression = GUEST_DECOMPRESSES,
                 describe_only: bool = False) -> ParsedKernel:
    """Detect the format from the bytes and validate every header; reads headers only, except
    for a bzImage whose ``plan`` says HOST: its payload is decompressed then (or its vmlinux
    taken from the cache), and the image describes that vmlinux. When the host cannot decode
    the payload, the bzImage stays as it is and ``image.decompression.fallback`` says why.
    An ELF that cannot boot (``ElfInfo.unbootable``) is an error unless ``describe_only``."""
    name = str(path)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(1024)
        f.seek(0)
        if size == 0:
            raise errors.UnknownKernelFormat(f"{name}: empty file")
        from vmmarch_cli.loader import bzimage

        if bzimage.is_bzimage(head):
            bz = bzimage.parse(head, size, name)
            image = KernelImage(
                path=name,
                format=KernelFormat.BZIMAGE,
                entry=bz.entry,
                load_start=bz.load_address,
                load_end=bz.end,
                setup_header=bzimage.zero_page_header(bz),
                cmdline_max=bzimage.cmdline_max(bz),
                initrd_addr_max=bzimage.initrd_addr_max(bz, DEFAULT_INITRD_ADDR_MAX),
                kernel_alignment=0,
                decompression=plan,
            )
            parsed = ParsedKernel(path, size, image, bzimage=bz)
            if plan.where is not Decompress.HOST:
                return parsed
            try:
                return _decompressed(parsed, bz, f.read(), plan)
            except HostCannotDecompress as exc:
                fallback = replace(plan, where=Decompress.GUEST, fallback=str(exc))
                return replace(parsed, image=replace(image, decompression=fallback))
        if head[:4] != elf64.ELF_MAGIC:
            raise errors.UnknownKernelFormat(
                f"{name}: neither an ELF vmlinux nor a bzImage (starts with "
                f"{head[:4].hex(' ')})"
            )
        from vmmarch_cli.loader import elf

        info = _elf_headers(f, size, name)
        if not describe_only:
            elf.require_bootable(info, name)
    image = KernelImage(
        path=name,
        format=KernelFormat.ELF,
        entry=info.entry,
        load_start=info.load_start,
        load_end=info.load_end,
        pvh_entry=info.pvh_entry,
    )
    return ParsedKernel(path, size, image, elf=info)


def _elf_headers(f: BinaryIO, size: int, name: str) -> elf.ElfInfo:
    """``elf.parse``, or what it read from this file before (elf_headers.py)."""
    from vmmarch_cli.loader import elf, elf_headers

    info, seen = elf_headers.recall(f)
    if info is None:
        info = elf.parse(f, size, name)
        elf_headers.keep(seen, info)
    return info


def _decompressed(parsed: ParsedKernel, bz: bzimage.BzImageInfo, data: bytes,
                  plan: Decompression) -> ParsedKernel:
    """The bzImage's vmlinux (decompressed now, or cached) as the kernel to load: an ELF entered
    through the 64-bit protocol at its own entry, with the bzImage's setup header for
    boot_params (code32_start saying where the kernel is)."""
    from vmmarch_cli.loader import bzimage, elf

    name = _vmlinux_name(parsed.path)

    def parse(f: VmlinuxFile) -> elf.ElfInfo:
        size = f.seek(0, 2)
        f.seek(0)
        info = _elf_headers(f, size, name)
        elf.require_bootable(info, name)
        return info

    vmlinux, info = host_vmlinux(data, parse)
    done = replace(plan, compression=vmlinux.compression, cached=vmlinux.cached,
                   seconds=vmlinux.seconds, note=vmlinux.note,
                   vmlinux=str(vmlinux.path) if vmlinux.path is not None else "")
    image = replace(
        parsed.image,
        entry=info.entry,
        load_start=info.load_start,
        load_end=info.load_end,
        setup_header=bzimage.zero_page_header(bz, kernel_address=info.load_start),
        decompression=done,
    )
    return replace(parsed, image=image, elf=info, vmlinux=vmlinux)


def _vmlinux_name(path: Path) -> str:
    """How errors name the vmlinux of a bzImage decompressed on the host."""
    return f"{path} (its vmlinux, decompressed on the host)"


def load_kernel(path: Path, memory: GuestMemory,
                plan: Decompression = GUEST_DECOMPRESSES) -> KernelImage:
    """Parse (decompressing a bzImage on the host if ``plan`` says so, see ``parse_kernel``),
    check against guest RAM, then copy the image in."""
    from vmmarch_cli.loader import bzimage, elf

    parsed = parse_kernel(path, plan)
    name = str(path)
    if parsed.vmlinux is not None and parsed.elf is not None:
        with parsed.vmlinux.open() as v:
            elf.load(v, parsed.elf, memory, _vmlinux_name(path))
        return parsed.image
    with _open(path) as f:
        if parsed.bzimage is not None:
            bzimage.load(f, parsed.bzimage, memory, name)
        elif parsed.elf is not None:
            elf.load(f, parsed.elf, memory, name)
    return parsed.image


def load_initrd(path: Path, memory: GuestMemory, kernel: KernelImage) -> tuple[int, int]:
    """Place the initrd at the top of low RAM (below the MMIO gap and initrd_addr_max).

    Returns (address, size). Like Firecracker and Cloud Hypervisor, the top of the first region
    keeps it far from the kernel's own decompression and early allocations.
    """
    from vmmarch_cli.arch.x86_64 import paging

    try:
        f = open_regular(path)
        data_size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise errors.InitrdNotFound(f"{path}: no such initrd file") from None
    except NotRegularFile as e:
        raise errors.InitrdNotFound(f"{path}: initrd {e}") from None
    except OSError as e:
        raise errors.InitrdNotFound(f"{path}: cannot read initrd: {e.strerror}") from None
    with f:
        low_start, low_len = memory.regions()[0]
        top = min(low_start + low_len, kernel.initrd_addr_max + 1, layout.MMIO32_START)
        address = (top - data_size) & ~(paging.PAGE_SIZE - 1)
        if data_size == 0 or address < kernel.load_end:
            raise errors.InitrdTooLarge(
                f"{path}: initrd of {data_size} bytes does not fit between the kernel's end "
                f"({kernel.load_end:#x}) and {top:#x}; raise --mem"
            )
        got = f.readinto(memory.view(address, data_size))
        if got != data_size:
            raise errors.InitrdNotFound(f"{path}: short read ({got} of {data_size} bytes)")
    return address, data_size


def check_cmdline(cmdline: str, kernel: KernelImage) -> bytes:
    """The command line as the bytes to write, refused if the kernel could not take it."""
    # surrogateescape: bytes from the command line that are not UTF-8 reach the kernel as given
    # (found by tests/loader/test_fuzz_parsers.py: a lone surrogate made encode() raise).
    raw = cmdline.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise errors.InvalidCommandLine("the kernel command line contains a NUL byte")
    if len(raw) + 1 > kernel.cmdline_max:
        raise errors.CommandLineTooLong(
            f"kernel command line is {len(raw)} bytes; this kernel accepts at most "
            f"{kernel.cmdline_max - 1}"
        )
    return raw
