"""Kernel payloads made as Linux makes them, and bzImage shells around them, for the tests.

``kernel_payload(name, data)`` runs the real compressor with the options of the kernel's build
(scripts/Makefile.lib, the ``cmd_*_with_size`` rules the x86 payload uses; xz through
scripts/xz_wrap.sh) and appends the uncompressed size as ``size_append`` does (gzip's own
trailer ends with it). A tool missing from PATH is fetched from Debian with ``apt-get
download`` into vmm-arch's cache (never installed), as the stock kernel is.

``bzimage_around(payload)`` builds a bzImage from the boot protocol's declared header fields
(vmmarch_cli.arch.x86_64.boot_params.FIELDS): the protected-mode code is a three-instruction
stand-in for the kernel's decompressor at the 64-bit entry (load + 0x200) that exits with
``STUB_STATUS``, so a test can tell which side decompressed: the real vmlinux inside exits
with its own status.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from functools import cache
from pathlib import Path

from vmmarch_cli.arch.x86_64 import boot_params

#: Format -> the compressor's argv in Linux's build (stdin to stdout).
KERNEL_COMMANDS: dict[str, tuple[str, ...]] = {
    "gzip": ("gzip", "-n", "-f", "-9"),  # cmd_gzip
    "bzip2": ("bzip2", "-9"),  # cmd_bzip2_with_size
    "lzma": ("lzma", "-9"),  # cmd_lzma_with_size
    # cmd_xzkern_with_size: scripts/xz_wrap.sh, with the x86 BCJ filter.
    "xz": ("xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB"),
    "lzo": ("lzop", "-9"),  # cmd_lzo_with_size
    "lz4": ("lz4", "-l", "-9", "-", "-"),  # cmd_lz4_with_size (6.1 spelled the level -c1)
    "zstd": ("zstd", "-22", "--ultra"),  # cmd_zstd22_with_size
}
#: Tool -> the Debian packages that hold it and the libraries it needs beyond a base system.
TOOL_PACKAGES: dict[str, tuple[str, ...]] = {
    "gzip": ("gzip",), "bzip2": ("bzip2",), "lzma": ("xz-utils",), "xz": ("xz-utils",),
    "lzop": ("lzop", "liblzo2-2"), "lz4": ("lz4",), "zstd": ("zstd",),
}
#: gzip's trailer already ends with the size (RFC 1952 ISIZE); the others get size_append.
OWN_SIZE_TRAILER = frozenset({"gzip"})

#: The stand-in decompressor: ``mov al, STUB_STATUS; out 0xf4, al; hlt``.
STUB_STATUS = 42
STUB = bytes([0xB0, STUB_STATUS, 0xE6, 0xF4, 0xF4])
ENTRY_64BIT_OFFSET = 0x200  # boot.rst: "the 64-bit entry point is at the load address + 0x200"
PAYLOAD_OFFSET = 0x400  # where the payload starts in the protected-mode code
SETUP_SECTS = 1
LOAD_ADDRESS = 0x10_0000  # code32_start: LOADED_HIGH
PREF_ADDRESS = 0x100_0000  # LOAD_PHYSICAL_ADDR of a default x86_64 build
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1


@cache
def tool(name: str) -> tuple[str, dict[str, str]]:
    """(path, extra environment) of compressor ``name``: on PATH, else unpacked from Debian."""
    found = shutil.which(name)
    if found is not None:
        return found, {}
    from vmmarch_cli import assets

    roots = [assets._unpacked(package, None) for package in TOOL_PACKAGES[name]]
    path = next(root / "usr" / "bin" / name for root in roots
                if (root / "usr" / "bin" / name).is_file())
    libs = [str(d) for root in roots for d in (root / "lib" / "x86_64-linux-gnu",
                                               root / "usr" / "lib" / "x86_64-linux-gnu")
            if d.is_dir()]
    return str(path), {"LD_LIBRARY_PATH": os.pathsep.join(libs)}


def compress(name: str, data: bytes) -> bytes:
    """``data`` through format ``name``'s compressor, as the kernel's build runs it."""
    path, env = tool(KERNEL_COMMANDS[name][0])
    done = subprocess.run([path, *KERNEL_COMMANDS[name][1:]], input=data, capture_output=True,
                          check=True, env={**os.environ, **env})
    return done.stdout


def kernel_payload(name: str, data: bytes) -> bytes:
    """A bzImage payload of ``data`` in format ``name``, with the size trailer."""
    stream = compress(name, data)
    if name in OWN_SIZE_TRAILER:
        return stream
    return stream + struct.pack("<I", len(data) & 0xFFFF_FFFF)  # size_append: u32 LE


def bzimage_around(payload: bytes, init_size: int = 0x40_0000) -> bytes:
    """A 64-bit bzImage (protocol 2.15) whose payload is ``payload``; its 'decompressor' at
    load + 0x200 exits with STUB_STATUS."""
    real_mode = bytearray((SETUP_SECTS + 1) * 512)  # boot sector + setup sectors
    # The jump at 0x200 gives the header's end: 0x202 + its high byte (boot.rst).
    header_end = boot_params.FIELDS["kernel_info_offset"][0] + 4
    fields = {
        "setup_sects": SETUP_SECTS,
        "boot_flag": boot_params.BOOT_FLAG_MAGIC,
        "jump": 0xEB | (header_end - 0x202) << 8,
        "header": boot_params.HDRS_MAGIC,
        "version": 0x020F,
        "loadflags": boot_params.LOADFLAGS_LOADED_HIGH,
        "code32_start": LOAD_ADDRESS,
        "initrd_addr_max": 0x7FFF_FFFF,
        "kernel_alignment": 0x20_0000,
        "relocatable_kernel": 1,
        "xloadflags": XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
        "cmdline_size": 2047,
        "payload_offset": PAYLOAD_OFFSET,
        "payload_length": len(payload),
        "pref_address": PREF_ADDRESS,
        "init_size": init_size,
    }
    for field, value in fields.items():
        boot_params.put(real_mode, field, value)
    protected = bytearray(PAYLOAD_OFFSET)
    protected[ENTRY_64BIT_OFFSET : ENTRY_64BIT_OFFSET + len(STUB)] = STUB
    return bytes(real_mode + protected + payload)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bzimage(version: int = 0x020F, xloadflags: int = 1, loadflags: int = 1,
            boot_flag: int = 0xAA55, size: int = 8192) -> bytes:
    """A bzImage-shaped file: 4 setup sectors, the header fields the loader reads, code."""
    d = bytearray(size)
    d[0x1F1] = 3  # setup_sects: 4 sectors with the boot sector
    struct.pack_into("<H", d, 0x1FE, boot_flag)
    struct.pack_into("<H", d, 0x200, 0x6AEB)  # jump: header ends at 0x202 + 0x6a
    d[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", d, 0x206, version)
    d[0x211] = loadflags
    struct.pack_into("<I", d, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", d, 0x230, 0x200000)  # kernel_alignment
    d[0x234] = 1
    struct.pack_into("<H", d, 0x236, xloadflags)
    struct.pack_into("<I", d, 0x238, 2047)  # cmdline_size
    struct.pack_into("<II", d, 0x248, 0, 16)  # payload_offset, payload_length
    struct.pack_into("<I", d, 0x260, 0x400000)  # init_size
    return bytes(d)
