"""Property-based fuzzing of every input parser: only the named errors may come out.

Each target mutates a real input (the project's guests, a bzImage header, real payloads) a
bounded number of times, so the suite stays fast; fuzz/README.md has the longer campaigns.
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import bzimage

from vmmarch_cli import loader
from vmmarch_cli.arch.x86_64 import cpuid
from vmmarch_cli.config import parse_mem_size
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.loader import elf
from vmmarch_cli.loader.decompress import decompress
from vmmarch_cli.memory import MmapGuestMemory

EXAMPLES = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
ROOT = Path(__file__).resolve().parent.parent


def _guest_bytes(name: str) -> bytes:
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    import build

    out = Path(tempfile.gettempdir()) / "vmmarch-fuzz-guests"
    return build.build_guest(name, out).read_bytes()


BOOTCHECK = _guest_bytes("bootcheck")
PVHCHECK = _guest_bytes("pvhcheck")
BZIMAGE = bzimage()


def mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Flip bytes in the headers, truncate, or splice random data into a real image."""
    flips = st.lists(st.tuples(st.integers(0, min(len(seed), 4096) - 1), st.integers(0, 255)),
                     min_size=1, max_size=8)

    def flip(changes: list[tuple[int, int]]) -> bytes:
        data = bytearray(seed)
        for pos, value in changes:
            data[pos] = value
        return bytes(data)

    return st.one_of(
        flips.map(flip),
        st.integers(0, len(seed)).map(lambda n: seed[:n]),
        st.binary(max_size=512).map(lambda b: seed[:64] + b),
    )


def load_or_refuse(data: bytes) -> None:
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        memory = MmapGuestMemory([(0, 64 << 20)])
        try:
            loader.load_kernel(Path(f.name), memory)
        except BadInputError:
            pass
        finally:
            memory.close()


@EXAMPLES
@given(mutations(BOOTCHECK))
def test_elf_loader(data: bytes) -> None:
    load_or_refuse(data)


@EXAMPLES
@given(mutations(PVHCHECK))
def test_elf_with_pvh_note(data: bytes) -> None:
    load_or_refuse(data)


@EXAMPLES
@given(mutations(BZIMAGE))
def test_bzimage_header(data: bytes) -> None:
    load_or_refuse(data)


@EXAMPLES
@given(st.binary(max_size=256))
def test_pvh_note_walker(data: bytes) -> None:
    with contextlib.suppress(BadInputError):
        elf.find_pvh_entry(data, "fuzz")


@EXAMPLES
@given(st.lists(st.tuples(st.binary(max_size=8), st.integers(0, 2**32 - 1),
                          st.binary(max_size=12)), max_size=4))
def test_pvh_note_walker_structured(notes: list[tuple[bytes, int, bytes]]) -> None:
    blob = b"".join(struct.pack("<III", len(n), len(d), t) + n.ljust(-(-len(n) // 4) * 4, b"\0")
                    + d.ljust(-(-len(d) // 4) * 4, b"\0") for n, t, d in notes)
    try:
        entry = elf.find_pvh_entry(blob, "fuzz")
    except BadInputError:
        return
    if entry is not None:
        assert any(n == b"Xen\0" and t == 18 and len(d) >= 4 for n, t, d in notes)


@EXAMPLES
@given(st.text(max_size=40))
def test_memory_size_parser(text: str) -> None:
    try:
        size = parse_mem_size(text)
    except BadInputError:
        return
    assert size % 4096 == 0 and size >= 16 << 20


@EXAMPLES
@given(st.text(max_size=60))
def test_cpu_mask_parser(text: str) -> None:
    try:
        mask = cpuid.parse_mask(text)
    except BadInputError:
        return
    assert mask <= set(cpuid.FEATURES)


@EXAMPLES
@given(st.text(max_size=3000))
def test_cmdline_checks(text: str) -> None:
    k = loader.KernelImage(path="k", format="elf", entry=0, load_start=0, load_end=0)
    try:
        raw = loader.check_cmdline(text, k)
    except BadInputError:
        return
    assert len(raw) < k.cmdline_max and b"\0" not in raw


def test_regression_cmdline_with_undecodable_argv_bytes() -> None:
    k = loader.KernelImage(path="k", format="elf", entry=0, load_start=0, load_end=0)
    assert loader.check_cmdline("quiet \udcff", k) == b"quiet \xff"


@EXAMPLES
@given(st.sampled_from([b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x5d\x00\x00", b"BZh",
                        b"\x02\x21\x4c\x18", b"\x89LZO", b"\x7fELF", b""]),
       st.binary(max_size=300))
def test_payload_decompressors(magic: bytes, body: bytes) -> None:
    with contextlib.suppress(BadInputError):
        decompress(magic + body)


@EXAMPLES
@given(st.lists(st.text(max_size=20), min_size=1, max_size=4))
def test_initramfs_command_inputs(argv: list[str]) -> None:
    from vmmarch_cli import initramfs

    try:
        script = initramfs.command_init_script(argv)
    except BadInputError:
        return
    assert script.startswith("#!/bin/busybox sh\n")
