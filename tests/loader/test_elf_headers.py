"""The vmlinux header cache (loader/elf_headers.py): a file booted before is not parsed again, and
nothing but that very file, unchanged, gets its record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmmarch_cli.errors import BadInputError
from vmmarch_cli.loader import parse_kernel
from vmmarch_cli.loader.elf64 import Elf64Header

from conftest import ROOT

#: Parses argv[1] in a fresh interpreter: the kernel image as JSON, and whether pyelftools got
#: imported to do it.
PROBE = ("import dataclasses, json, sys; from pathlib import Path; "
         "from vmmarch_cli.loader import parse_kernel; "
         "image = dataclasses.asdict(parse_kernel(Path(sys.argv[1])).image); "
         "print(json.dumps([image, 'elftools' in sys.modules], default=bytes.hex))")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("VMMARCH_CACHE", str(directory))
    return directory


@pytest.fixture
def kernel(tmp_path: Path, guests: dict[str, Path]) -> Path:
    """A copy of an example guest (an ELF with a PVH note) of the test's own."""
    path = tmp_path / "vmlinux"
    shutil.copyfile(guests["pvhcheck"], path)
    return path


def probe(kernel: Path) -> tuple[dict[str, object], bool]:
    p = subprocess.run([sys.executable, "-c", PROBE, str(kernel)], capture_output=True,
                       text=True, cwd=ROOT, env=os.environ.copy(), timeout=60, check=True)
    image, imported = json.loads(p.stdout)
    return image, imported


def records(cache: Path) -> list[Path]:
    return sorted((cache / "elf-headers").glob("*.json"))


def test_a_second_parse_takes_the_record_and_not_pyelftools(cache: Path, kernel: Path) -> None:
    first, imported = probe(kernel)
    assert imported and len(records(cache)) == 1
    second, imported = probe(kernel)
    assert not imported, "the headers were parsed again"
    assert second == first


def test_a_file_written_again_is_parsed_again(cache: Path, kernel: Path) -> None:
    """Another entry point written in place, with the old modification time put back: the
    change time and the headers still differ."""
    before = parse_kernel(kernel).image
    stat = kernel.stat()
    data = bytearray(kernel.read_bytes())
    header = Elf64Header.read(data)
    header.e_entry += 2
    data[: Elf64Header.sizeof()] = bytes(header)
    kernel.write_bytes(data)
    os.utime(kernel, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after, imported = probe(kernel)
    assert imported
    assert after["entry"] == before.entry + 2


def test_a_file_written_again_elsewhere_is_parsed_again(cache: Path, kernel: Path) -> None:
    """A byte changed past the headers and notes, in place, with the old modification time put
    back: the headers are the same, the file's identity (its change time) is not."""
    parse_kernel(kernel)
    stat = kernel.stat()
    with kernel.open("r+b") as f:
        f.seek(stat.st_size - 1)
        last = f.read(1)
        f.seek(stat.st_size - 1)
        f.write(bytes([last[0] ^ 0xFF]))
    os.utime(kernel, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _, imported = probe(kernel)
    assert imported, "the record was taken for a file written since"
    _, imported = probe(kernel)
    assert not imported


def test_a_damaged_record_is_parsed_again_and_replaced(cache: Path, kernel: Path) -> None:
    before = parse_kernel(kernel).image
    (record,) = records(cache)
    for damage in ("{", json.dumps({"identity": 1}), "[]", "[" * 100_000, " " * (1 << 20)):
        record.write_text(damage)
        image, imported = probe(kernel)
        assert imported and image["entry"] == before.entry
        assert json.loads(record.read_text())["entry"] == before.entry


def test_a_cache_that_cannot_be_written_costs_nothing(tmp_path: Path, kernel: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("VMMARCH_CACHE", str(blocked))
    assert parse_kernel(kernel).image.pvh_entry is not None
    assert parse_kernel(kernel).image.pvh_entry is not None


def test_a_kernel_that_fails_to_parse_leaves_no_record(cache: Path, kernel: Path) -> None:
    data = kernel.read_bytes()
    kernel.write_bytes(data[:100])  # the program headers cut off
    with pytest.raises(BadInputError):
        parse_kernel(kernel)
    assert records(cache) == []
