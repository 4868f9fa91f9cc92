"""Property-based fuzzing of every input parser: only the named errors may come out.

The targets are fuzz/targets.py's, shared with the long atheris campaigns (fuzz/README.md);
here each mutates a real input (the project's guests, a bzImage header, our own ACPI tables) a
bounded number of times, so the suite stays fast.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import targets
from vmmarch_cli import loader
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.loader import elf

ROOT = Path(__file__).resolve().parents[2]

EXAMPLES = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

BOOTCHECK = targets.guest_bytes("bootcheck")
PVHCHECK = targets.guest_bytes("pvhcheck")
BZIMAGE = targets.bzimage_header()
ACPI_TABLES = targets.seeds("boot_tables")[0]


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


@EXAMPLES
@given(mutations(BOOTCHECK))
def test_elf_loader(data: bytes) -> None:
    targets.kernel_image(data)


@EXAMPLES
@given(mutations(PVHCHECK))
def test_elf_with_pvh_note(data: bytes) -> None:
    targets.kernel_image(data)


@EXAMPLES
@given(mutations(BZIMAGE))
def test_bzimage_header(data: bytes) -> None:
    targets.kernel_image(data)


@EXAMPLES
@given(st.binary(max_size=256))
def test_pvh_note_walker(data: bytes) -> None:
    targets.pvh_note(data)


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
    targets.memory_size(text.encode("utf-8", "surrogateescape"))


@EXAMPLES
@given(st.text(max_size=60))
def test_cpu_mask_parser(text: str) -> None:
    targets.cpu_mask(text.encode("utf-8", "surrogateescape"))


@EXAMPLES
@given(st.text(max_size=3000))
def test_cmdline_checks(text: str) -> None:
    targets.cmdline(text.encode("utf-8", "surrogateescape"))


def test_regression_cmdline_with_undecodable_argv_bytes() -> None:
    k = loader.KernelImage(path="k", format="elf", entry=0, load_start=0, load_end=0)
    assert loader.check_cmdline("quiet \udcff", k) == b"quiet \xff"


@EXAMPLES
@given(st.sampled_from([b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x5d\x00\x00", b"BZh",
                        b"\x02\x21\x4c\x18", b"\x89LZO", b"\x7fELF", b""]),
       st.binary(max_size=300))
def test_payload_decompressors(magic: bytes, body: bytes) -> None:
    targets.payload(magic + body)


@EXAMPLES
@given(st.lists(st.text(max_size=20), min_size=1, max_size=4))
def test_initramfs_command_inputs(argv: list[str]) -> None:
    targets.initramfs_command("\0".join(argv).encode("utf-8", "surrogateescape"))


@EXAMPLES
@given(st.one_of(mutations(ACPI_TABLES), st.binary(max_size=4096)))
def test_boot_table_readers(data: bytes) -> None:
    targets.boot_tables(data)


def test_atheris_campaign_runs(tmp_path: Path) -> None:
    """``python -m fuzz`` (the long campaigns, fuzz/README.md) runs a short campaign cleanly."""
    pytest.importorskip("atheris")
    p = subprocess.run([sys.executable, "-m", "fuzz", "cmdline", "--runs", "300"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "stat::number_of_executed_units: 300" in p.stderr
