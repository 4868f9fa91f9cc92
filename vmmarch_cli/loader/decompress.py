"""Recognise and decompress the payload of a bzImage (the compressed vmlinux).

The kernel builds the payload in arch/x86/boot/compressed/Makefile with one of the ``*_with_size``
commands of scripts/Makefile.lib, so after the compressed stream come 4 bytes holding the
uncompressed size (``size_append``; gzip's own trailer ends with the same ISIZE field). Every
decoder here therefore stops at the end of its stream and ignores what follows.

The magic numbers are the ones lib/decompress.c matches (its ``compressed_formats`` table), with
more bytes of each format's own signature where the format defines them.
"""

from __future__ import annotations

import bz2
import importlib
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmmarch_cli.errors import BadInputError

# The ELF identification (System V gABI, e_ident[EI_MAG0..EI_MAG3]); an uncompressed payload.
ELF_MAGIC = b"\x7fELF"

# lib/decompress_unlz4.c: "ARCHIVE_MAGICNUMBER 0x184C2102", the LZ4 legacy frame, stored
# little-endian, followed by blocks of (u32 LE compressed size, data).
LZ4_LEGACY_MAGIC = 0x184C2102
# lib/decompress_unlz4.c: "uncomp_chunksize = LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE" (8 << 20), the
# block size lz4's legacy format (lz4 -l) compresses with.
LZ4_LEGACY_BLOCK_MAX = 8 << 20
# A block size field plus at least one byte of block.
_LZ4_MIN_BLOCK = 4 + 1

# zlib.h inflateInit2: windowBits 16 + 15 = 31 expects a gzip (RFC 1952) header and trailer
# around a stream with a 32 KiB window.
_GZIP_WBITS = 16 + zlib.MAX_WBITS


@dataclass(frozen=True)
class Compression:
    """One payload format: its name (as CONFIG_KERNEL_<NAME>) and the bytes it starts with."""

    name: str
    magic: bytes


COMPRESSIONS: tuple[Compression, ...] = (
    # RFC 1952 ID1 ID2.
    Compression("gzip", b"\x1f\x8b"),
    # xz-file-format.txt: Header Magic Bytes 0xFD '7' 'z' 'X' 'Z' 0x00.
    Compression("xz", b"\xfd7zXZ\x00"),
    # The .lzma ("alone") header: properties byte 0x5d (lc=3 lp=0 pb=2, what lzma -9 writes) and the
    # low bytes of a little-endian dictionary size; lib/decompress.c matches 5d 00.
    Compression("lzma", b"\x5d\x00\x00"),
    # bzip2: "BZ" and the 'h' (Huffman) version byte.
    Compression("bzip2", b"BZh"),
    Compression("lz4", struct.pack("<I", LZ4_LEGACY_MAGIC)),
    # RFC 8878 section 3.1.1: Magic_Number 0xFD2FB528, little-endian.
    Compression("zstd", b"\x28\xb5\x2f\xfd"),
    # lzop's magic starts 0x89 'L' 'Z' 'O' (lib/decompress_unlzo.c lzop_magic).
    Compression("lzo", b"\x89LZO"),
)


def detect(payload: bytes) -> str:
    """The name of ``payload``'s compression, or "none" when it is already an ELF image."""
    for compression in COMPRESSIONS:
        if payload.startswith(compression.magic):
            return compression.name
    if payload.startswith(ELF_MAGIC):
        return "none"
    raise BadInputError(
        f"kernel payload starts with {payload[:8].hex(' ') or 'nothing'}: not gzip, xz, lzma, "
        "bzip2, lz4, zstd, lzo or an ELF image"
    )


def _gzip(payload: bytes) -> bytes:
    decoder = zlib.decompressobj(wbits=_GZIP_WBITS)
    try:
        out = decoder.decompress(payload)
    except zlib.error as exc:
        raise BadInputError(f"gzip payload is corrupt: {exc}") from None
    if not decoder.eof:
        raise BadInputError("gzip payload is truncated: the stream ends before its trailer")
    return out


def _lzma_family(name: str, fmt: int) -> Callable[[bytes], bytes]:
    def run(payload: bytes) -> bytes:
        decoder = lzma.LZMADecompressor(format=fmt)
        try:
            out = decoder.decompress(payload)
        except lzma.LZMAError as exc:
            raise BadInputError(f"{name} payload is corrupt: {exc}") from None
        if not decoder.eof:
            raise BadInputError(f"{name} payload is truncated: the stream has no end marker")
        return out

    return run


def _bzip2(payload: bytes) -> bytes:
    decoder = bz2.BZ2Decompressor()
    try:
        out = decoder.decompress(payload)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"bzip2 payload is corrupt: {exc}") from None
    if not decoder.eof:
        raise BadInputError("bzip2 payload is truncated: the stream has no end marker")
    return out


def _lz4(payload: bytes) -> bytes:
    try:
        import lz4.block  # imported here: only LZ4 kernels need it, and it is a C extension
    except ImportError:
        raise BadInputError("lz4 payload needs the lz4 module: pip install lz4") from None

    out: list[bytes] = []
    pos = len(struct.pack("<I", LZ4_LEGACY_MAGIC))
    while len(payload) - pos >= _LZ4_MIN_BLOCK:
        (size,) = struct.unpack_from("<I", payload, pos)
        if size == LZ4_LEGACY_MAGIC:
            # lib/decompress_unlz4.c skips a repeated magic: concatenated legacy frames.
            pos += 4
            continue
        remaining = len(payload) - pos - 4
        if size == 0 or size > remaining:
            # What is left is not a block. With exactly the 4-byte size_append left, the loop
            # condition already stopped us; more than that means the stream was cut short.
            raise BadInputError(
                f"lz4 payload is truncated or corrupt: block at offset {pos} claims {size} bytes, "
                f"{remaining} remain"
            )
        block = payload[pos + 4 : pos + 4 + size]
        try:
            # uncompressed_size is the output buffer's capacity, not the exact size: python-lz4
            # calls LZ4_decompress_safe and returns what it produced (checked on the Debian
            # 6.1.0-56-cloud payload, whose last block is 2,911,796 bytes).
            out.append(lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK_MAX))
        except (lz4.block.LZ4BlockError, ValueError) as exc:
            raise BadInputError(f"lz4 block at offset {pos} is corrupt: {exc}") from None
        pos += 4 + size
    if not out:
        raise BadInputError("lz4 payload holds no block after its magic")
    return b"".join(out)


def _zstd_module() -> Any:
    # Python 3.14 ships compression.zstd; before that, the zstandard package provides the codec.
    for name in ("compression.zstd", "zstandard"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BadInputError("zstd payload needs the zstandard module: pip install zstandard")


def _zstd(payload: bytes) -> bytes:
    module = _zstd_module()
    # Both bindings offer a streaming decoder that stops at the end of the frame, leaving the
    # size_append bytes in unused_data; zstandard reaches it through decompressobj().
    if module.__name__ == "zstandard":
        decoder = module.ZstdDecompressor().decompressobj()
    else:
        decoder = module.ZstdDecompressor()
    try:
        out: bytes = decoder.decompress(payload)
    except module.ZstdError as exc:
        raise BadInputError(f"zstd payload is corrupt: {exc}") from None
    if not getattr(decoder, "eof", True):
        raise BadInputError("zstd payload is truncated: the frame does not end")
    return out


def _lzo(payload: bytes) -> bytes:
    raise BadInputError("lzo kernel payloads are unsupported (no lzo codec in Python's stdlib)")


def _none(payload: bytes) -> bytes:
    return payload


_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _gzip,
    "xz": _lzma_family("xz", lzma.FORMAT_XZ),
    "lzma": _lzma_family("lzma", lzma.FORMAT_ALONE),
    "bzip2": _bzip2,
    "lz4": _lz4,
    "zstd": _zstd,
    "lzo": _lzo,
    "none": _none,
}


def decompress(payload: bytes) -> bytes:
    """Decompress a bzImage payload of any format ``detect`` knows; trailing bytes are ignored."""
    try:
        return _DECODERS[detect(payload)](payload)
    except MemoryError:
        raise BadInputError("kernel payload does not fit in memory once decompressed") from None
