"""Recognise and decompress the payload of a bzImage (the compressed vmlinux).

The kernel builds the payload in arch/x86/boot/compressed/Makefile with one of the ``*_with_size``
commands of scripts/Makefile.lib, so after the compressed stream come 4 bytes holding the
uncompressed size (``size_append``; gzip's own trailer ends with the same ISIZE field). Every
decoder here therefore stops at the end of its stream and ignores what follows.

The magic numbers are the ones lib/decompress.c matches (its ``compressed_formats`` table), with
more bytes of each format's own signature where the format defines them.

Every format Linux builds an x86 payload with decodes here: gzip, bzip2, lzma and xz with Python's
standard library, lz4 with the ``lz4`` package (a dependency), zstd with ``compression.zstd``
(Python 3.14) or the ``zstandard`` package (optional: a missing one is named in the error), and
lzo with the LZO1X decoder below, in Python: no package offers it that the project could require,
and the kernel's payload (lzop -9 output, 256 KiB blocks) takes 1.5-3 s here for a 53 MB vmlinux.
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
from vmmarch_cli.loader.elf64 import ELF_MAGIC

# The ELF identification (System V gABI, e_ident[EI_MAG0..EI_MAG3]); an uncompressed payload.

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
    # lib/decompress_unlzo.c lzop_magic: 0x89 'L' 'Z' 'O' 0 '\r' '\n' 0x1a '\n'.
    Compression("lzo", b"\x89LZO\x00\r\n\x1a\n"),
)


_MAGIC = {c.name: c.magic for c in COMPRESSIONS}


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


# The lzop container, as lib/decompress_unlzo.c reads it (and lzop 1.04 writes it, src/lzop.c):
# all integers big-endian. After the 9-byte magic: version, library version, version needed to
# extract (u16 each), method (u8), level (u8, from version 0x0940), flags (u32), filter (u32, with
# F_H_FILTER), mode and mtime_low (u32 each), mtime_high (u32, from version 0x0940), the file
# name (u8 length, bytes) and the header checksum (u32). The magic is in COMPRESSIONS.
_LZOP_VERSION_LEVEL = 0x0940  # lzop's header has the level and mtime_high from this version on
_LZOP_F_ADLER32_D = 0x0000_0001  # lzop.h: checksum of each block's uncompressed bytes
_LZOP_F_ADLER32_C = 0x0000_0002  # ... and of its compressed bytes (only when it is compressed)
_LZOP_F_H_FILTER = 0x0000_0800
_LZOP_F_CRC32_D = 0x0000_0100
_LZOP_F_CRC32_C = 0x0000_0200
# lzop.h: M_LZO1X_1, M_LZO1X_1_15, M_LZO1X_999, all read by lzo1x_decompress_safe.
_LZOP_LZO1X_METHODS = frozenset({1, 2, 3})
# lib/decompress_unlzo.c: "LZO_BLOCK_SIZE (256*1024l)"; a larger block is refused there too.
_LZOP_BLOCK_MAX = 256 * 1024
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")


def _lzop_header_end(payload: bytes) -> tuple[int, int]:
    """(offset of the first block, flags) of an lzop stream (its magic already matched)."""
    pos = len(_MAGIC["lzo"])
    (version,) = _BE16.unpack_from(payload, pos)
    method = payload[pos + 6]
    if method not in _LZOP_LZO1X_METHODS:
        raise BadInputError(f"lzo payload uses lzop method {method}, not LZO1X")
    pos += 7 + (version >= _LZOP_VERSION_LEVEL)
    (flags,) = _BE32.unpack_from(payload, pos)
    pos += 8 if flags & _LZOP_F_H_FILTER else 4
    pos += 8 + 4 * (version >= _LZOP_VERSION_LEVEL)  # mode, mtime_low, mtime_high
    pos += 1 + payload[pos] + 4  # file name, header checksum
    return pos, flags


def _lzo_long_count(src: bytes, ip: int, base: int) -> tuple[int, int]:
    """A count field of 0 extended by the bytes at ``ip``: ``base`` plus 255 for each zero
    byte, plus the first non-zero one (LZO1X's literal runs and M3/M4 match lengths). Returns
    (count, the index after it)."""
    while src[ip] == 0:
        base += 255
        ip += 1
    return base + src[ip], ip + 1


def _lzo1x_block(src: bytes, expected: int) -> bytes:
    """One LZO1X block, as lib/lzo/lzo1x_decompress_safe.c decodes it (bitstream version 0,
    what lzop writes). The instruction encoding is Documentation/staging/lzo.rst's; ``state`` is
    the number of literals the previous instruction copied (4: four or more).

    Raises IndexError on a stream cut short and ValueError on a copy from before the start.
    """
    out = bytearray()
    ip = 0
    state = 0
    t = src[0]
    if t == 17:
        raise ValueError("LZO1X bitstream version 1 (lzo-rle), which lzop never writes")
    if t > 17:  # lzo.rst: "18..255: copy (byte - 17) literals"
        t -= 17
        out += src[1 : 1 + t]
        ip = 1 + t
        state = 4 if t >= 4 else t
    while True:
        t = src[ip]
        ip += 1
        if t < 16:
            if state == 0:
                # 0000LLLL: a run of 4 or more literals; L == 0 is extended by zero bytes.
                if t == 0:
                    t, ip = _lzo_long_count(src, ip, 15)
                t += 3
                if ip + t > len(src):
                    raise IndexError("literal run past the end of the block")
                out += src[ip : ip + t]
                ip += t
                state = 4
                continue
            # 0000DDSS HHHHHHHH: 2 bytes from <= 1 KiB after 1-3 literals, 3 bytes from
            # 2-3 KiB after 4 or more.
            if state == 4:
                distance, length = (t >> 2) + (src[ip] << 2) + 2049, 3
            else:
                distance, length = (t >> 2) + (src[ip] << 2) + 1, 2
            ip += 1
            literals = t & 3
        elif t >= 64:
            # 01LDDDSS / 1LLDDDSS HHHHHHHH: 3-4 or 5-8 bytes from <= 2 KiB.
            length = 5 + ((t >> 5) & 3) if t >= 128 else 3 + ((t >> 5) & 1)
            distance = ((t >> 2) & 7) + (src[ip] << 3) + 1
            ip += 1
            literals = t & 3
        else:
            # 001LLLLL (M3, <= 16 KiB) or 0001HLLL (M4, 16-48 KiB), then DDDDDDSS DDDDDDDD.
            mask = 31 if t >= 32 else 7
            length = t & mask
            if length == 0:
                length, ip = _lzo_long_count(src, ip, mask)
            length += 2
            low, high = src[ip], src[ip + 1]
            ip += 2
            distance = (low >> 2) + (high << 6)
            if t >= 32:
                distance += 1
            else:
                distance += 16384 + ((t & 8) << 11)
                if distance == 16384:  # lzo.rst: "End of stream is reached if distance == 16384"
                    break
            literals = low & 3
        start = len(out) - distance
        if start < 0:
            raise ValueError(f"a match reaches {-start} bytes before the start of the block")
        if start + distance + length + literals > expected:
            raise ValueError(f"the block decodes to more than its {expected} bytes")
        if distance >= length:
            out += out[start : start + length]
        else:  # an overlapping copy repeats the last ``distance`` bytes
            out += (out[start:] * (length // distance + 1))[:length]
        if literals:
            out += src[ip : ip + literals]
            ip += literals
        state = literals
    return bytes(out)


def _lzo(payload: bytes) -> bytes:
    """An lzop stream (``lzop -9``, scripts/Makefile.lib cmd_lzo): blocks of (uncompressed size,
    compressed size, checksums, data) until an uncompressed size of 0."""
    out: list[bytes] = []
    try:
        pos, flags = _lzop_header_end(payload)
        while True:
            (dst_len,) = _BE32.unpack_from(payload, pos)
            pos += 4
            if dst_len == 0:
                break
            (src_len,) = _BE32.unpack_from(payload, pos)
            pos += 4
            if dst_len > _LZOP_BLOCK_MAX or not 0 < src_len <= dst_len:
                raise BadInputError(
                    f"lzo payload is corrupt: block at offset {pos - 8} has sizes {src_len} "
                    f"(compressed) and {dst_len} (at most {_LZOP_BLOCK_MAX})"
                )
            sums = []
            for flag, check in ((_LZOP_F_ADLER32_D, zlib.adler32), (_LZOP_F_CRC32_D, zlib.crc32)):
                if flags & flag:
                    sums.append((check, _BE32.unpack_from(payload, pos)[0]))
                    pos += 4
            if src_len < dst_len:
                pos += 4 * bool(flags & _LZOP_F_ADLER32_C) + 4 * bool(flags & _LZOP_F_CRC32_C)
            if pos + src_len > len(payload):
                raise BadInputError(f"lzo payload is truncated: block at offset {pos} needs "
                                    f"{src_len} bytes, {len(payload) - pos} remain")
            data = payload[pos : pos + src_len]
            block = data if src_len == dst_len else _lzo1x_block(data, dst_len)
            if len(block) != dst_len or any(check(block) != want for check, want in sums):
                raise BadInputError(f"lzo block at offset {pos} is corrupt: it decodes to "
                                    f"{len(block)} bytes, or fails its checksum")
            out.append(block)
            pos += src_len
    except (IndexError, struct.error):
        raise BadInputError("lzo payload is truncated: the stream ends inside a block") from None
    except ValueError as exc:
        raise BadInputError(f"lzo payload is corrupt: {exc}") from None
    if not out:
        raise BadInputError("lzo payload holds no block after its header")
    return b"".join(out)


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
