"""Payload decompression (every kernel format) and the bzImage payload locator."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import random
import struct
import sys
from collections.abc import Callable

import lz4.block
import pytest

from vmmarch_cli.errors import BadInputError
from vmmarch_cli.loader.bzimage_payload import extract_vmlinux, payload_of
from vmmarch_cli.loader.decompress import (
    COMPRESSIONS,
    Compression,
    _lzo1x_block,
    decompress,
    detect,
)

LZ4_MAGIC = b"\x02\x21\x4c\x18"
BLOCK = 8 << 20


def sample(size: int = 200_000, seed: int = 1) -> bytes:
    """Compressible but not trivial: an ELF magic then words drawn from a small vocabulary."""
    rng = random.Random(seed)
    words = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))) for _ in range(64)]
    out = bytearray(b"\x7fELF")
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def size_append(data: bytes, compressed: bytes) -> bytes:
    """What scripts/Makefile.lib's size_append adds after the stream: the size, u32 LE."""
    return compressed + struct.pack("<I", len(data) & 0xFFFF_FFFF)


def lz4_legacy(data: bytes, block: int = BLOCK) -> bytes:
    """An lz4 -l stream: the magic, then (u32 LE size, block) per 8 MiB of input."""
    out = bytearray(LZ4_MAGIC)
    for start in range(0, len(data), block):
        chunk = lz4.block.compress(data[start : start + block], store_size=False)
        out += struct.pack("<I", len(chunk)) + chunk
    return bytes(out)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "bzip2": bz2.compress,
    "lz4": lz4_legacy,
}


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_round_trip_with_size_trailer(name: str) -> None:
    data = sample()
    payload = size_append(data, COMPRESSORS[name](data))
    assert detect(payload) == name
    assert decompress(payload) == data


@pytest.mark.parametrize("name", ["gzip", "xz", "lzma", "bzip2"])
def test_round_trip_without_trailer(name: str) -> None:
    data = sample(5000)
    assert decompress(COMPRESSORS[name](data)) == data


def test_lz4_multi_block() -> None:
    # More than one 8 MiB block, the last one short, as in a real kernel payload.
    data = sample(BLOCK + 123_457, seed=2)
    payload = size_append(data, lz4_legacy(data))
    assert struct.unpack_from("<I", payload, 4)[0] < BLOCK
    assert decompress(payload) == data


def test_lz4_repeated_magic() -> None:
    # lib/decompress_unlz4.c accepts concatenated legacy frames.
    first, second = sample(1000, 3), sample(2000, 4)
    assert decompress(lz4_legacy(first) + lz4_legacy(second) + b"\0\0\0\0") == first + second


def test_table_is_data() -> None:
    names = [c.name for c in COMPRESSIONS]
    assert names == ["gzip", "xz", "lzma", "bzip2", "lz4", "zstd", "lzo"]
    magics = {c.name: c.magic for c in COMPRESSIONS}
    assert magics["lz4"] == LZ4_MAGIC
    assert magics["zstd"] == bytes.fromhex("28b52ffd")
    assert magics["xz"] == bytes.fromhex("fd377a585a00")


def test_detect_none_and_unknown() -> None:
    assert detect(b"\x7fELF\x02\x01") == "none"
    assert decompress(b"\x7fELF rest") == b"\x7fELF rest"
    for junk in (b"", b"MZ\x90\x00", b"\x00" * 16):
        with pytest.raises(BadInputError, match="not gzip"):
            detect(junk)


# LZO1X instructions by hand (Documentation/staging/lzo.rst); real lzop output is decoded in
# tests/loader/test_host_decompress.py.
LZO_END = b"\x11\x00\x00"  # M4 with distance 16384: end of stream


def test_lzo1x_instructions() -> None:
    stream = (
        bytes([17 + 4]) + b"abcd"  # first byte 18..255: copy (byte - 17) literals; state 4
        + bytes([0b01_1_011_00, 0])  # M2: length 3 + 1, distance (0 << 3) + 3 + 1 = 4
        + bytes([0b001_00110, 3 << 2 | 1, 0])  # M3: length 2 + 6 from distance 4 (overlapping),
        + b"X"  # then S = 1 literal
        + LZO_END
    )
    assert _lzo1x_block(stream, 17) == b"abcd" * 4 + b"X"


def test_lzo1x_extended_literal_run() -> None:
    # 0000LLLL with L = 0 in state 0: 3 + 15 + 255 per zero byte + the first non-zero byte.
    literals = bytes(range(256)) + bytes(22)
    stream = b"\x00\x00\x05" + literals + LZO_END
    assert _lzo1x_block(stream, 278) == literals


@pytest.mark.parametrize(("stream", "error"), [
    (b"\x10\x01\x04\x00" + LZO_END, ValueError),  # first byte 16: an M4 with nothing before
    (bytes([17 + 4]) + b"ab", IndexError),  # cut inside the literals
    (b"\x11\x01", ValueError),  # bitstream version 1 (lzo-rle)
])
def test_lzo1x_refuses(stream: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        _lzo1x_block(stream, 100)


def test_lzo_header_only() -> None:
    with pytest.raises(BadInputError, match="lzo payload"):
        decompress(b"\x89LZO\x00\r\n\x1a\n" + b"\0" * 32)


def test_zstd_without_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail, whether or not zstandard is installed.
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "compression.zstd", None)
    with pytest.raises(BadInputError, match="pip install zstandard"):
        decompress(b"\x28\xb5\x2f\xfd" + b"\0" * 16)


def test_zstd_round_trip() -> None:
    zstandard = pytest.importorskip("zstandard")
    data = sample()
    payload = size_append(data, zstandard.ZstdCompressor(level=19).compress(data))
    assert decompress(payload) == data
    with pytest.raises(BadInputError, match="zstd"):
        decompress(payload[: len(payload) // 2])


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_truncated(name: str) -> None:
    data = sample()
    compressed = COMPRESSORS[name](data)
    with pytest.raises(BadInputError, match=name):
        decompress(compressed[: len(compressed) // 2])


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_corrupt_middle(name: str) -> None:
    data = sample()
    compressed = COMPRESSORS[name](data)
    damaged = compressed
    for offset in range(len(compressed) // 3, len(compressed) // 3 + 64, 7):
        damaged = flip(damaged, offset)
    try:
        out = decompress(damaged)
    except BadInputError as exc:
        assert name in str(exc)
        assert "\n" not in str(exc)
    else:
        # lz4 blocks carry no checksum: the damage may decode, but never to the original.
        assert name == "lz4" and out != data


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=lambda c: c.name)
def test_garbage_after_magic_only_bad_input(compression: Compression) -> None:
    magic = compression.magic
    rng = random.Random(7)
    for length in (0, 1, 3, 4, 5, 17, 300):
        payload = magic + bytes(rng.randrange(256) for _ in range(length))
        with contextlib.suppress(BadInputError):
            decompress(payload)


def test_lz4_short_block_is_truncation() -> None:
    data = sample(10_000)
    stream = lz4_legacy(data)
    with pytest.raises(BadInputError, match="lz4 payload is truncated"):
        decompress(stream[:-10] + b"\0" * 4)
    with pytest.raises(BadInputError, match="no block"):
        decompress(LZ4_MAGIC + b"\0\0\0\0")
    with pytest.raises(BadInputError, match="lz4 block at offset 4 is corrupt"):
        decompress(LZ4_MAGIC + struct.pack("<I", 4) + b"\xff\xff\xff\xff")


# bzImage payload location (Documentation/arch/x86/boot.rst).


def make_bzimage(
    payload: bytes,
    setup_sects: int = 3,
    version: int = 0x020F,
    magic: bytes = b"HdrS",
    pad_before: int = 0x30,
) -> bytes:
    """A minimal bzImage: boot sector + setup sectors, then protected-mode code with the payload."""
    real_sects = setup_sects or 4
    header = bytearray((real_sects + 1) * 512)
    header[0x1F1] = setup_sects
    header[0x202:0x206] = magic
    struct.pack_into("<H", header, 0x206, version)
    struct.pack_into("<II", header, 0x248, pad_before, len(payload))
    return bytes(header) + b"\x90" * pad_before + payload + b"\xcc" * 100


@pytest.mark.parametrize("setup_sects", [0, 1, 39])
def test_payload_of(setup_sects: int) -> None:
    payload = b"payload bytes"
    assert payload_of(make_bzimage(payload, setup_sects=setup_sects)) == payload


def test_extract_vmlinux() -> None:
    data = sample()
    image = make_bzimage(size_append(data, lz4_legacy(data)))
    assert extract_vmlinux(image) == data
    assert extract_vmlinux(make_bzimage(gzip.compress(data, mtime=0))) == data


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (b"\0" * 100, "shorter than its setup header"),
        (make_bzimage(b"x", magic=b"HdrX"), "no 'HdrS'"),
        (make_bzimage(b"x", version=0x0207), "older than 2.08"),
        (make_bzimage(b""), "empty or runs past"),
    ],
)
def test_payload_of_refuses(image: bytes, match: str) -> None:
    with pytest.raises(BadInputError, match=match):
        payload_of(image)


def test_payload_out_of_range() -> None:
    image = bytearray(make_bzimage(b"payload"))
    struct.pack_into("<I", image, 0x24C, len(image))
    with pytest.raises(BadInputError, match="runs past the end"):
        payload_of(bytes(image))


def test_extract_refuses_non_elf_and_bad_trailer() -> None:
    not_elf = b"MZ" + sample()[2:]
    with pytest.raises(BadInputError, match="not an ELF image"):
        extract_vmlinux(make_bzimage(size_append(not_elf, lz4_legacy(not_elf))))
    data = sample()
    wrong_size = lz4_legacy(data) + struct.pack("<I", len(data) + 1)
    with pytest.raises(BadInputError, match="trailer says"):
        extract_vmlinux(make_bzimage(wrong_size))
