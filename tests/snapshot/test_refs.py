"""Pages a snapshot keeps by reference to a file (snapshot/refs.py): left out of the image,
mapped from the file on restore, and refused in one line when the file no longer holds them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.snapshot import fileformat, image, refs
from vmmarch_cli.snapshot.fileformat import SnapshotError

PAGE = image.PAGE
MIB = 1 << 20
REGIONS = [(0, 4 * MIB), (8 * MIB, 4 * MIB)]


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    """A file of 10 distinct pages and a short tail, as a binary would be."""
    path = tmp_path / "base.bin"
    path.write_bytes(b"".join(bytes([k + 1]) * PAGE for k in range(10)) + b"tail")
    return path


def guest_with(base: Path) -> MmapGuestMemory:
    """Guest RAM holding the file's pages 2..9 and its tail page at page 100 on (across the
    two regions' boundary), and some other data."""
    memory = MmapGuestMemory(REGIONS)
    data = base.read_bytes()
    at = 4 * MIB - 3 * PAGE  # three pages in the first region, the rest in the second
    memory.write(at, data[2 * PAGE : 5 * PAGE])
    memory.write(8 * MIB, data[5 * PAGE :])
    memory.write(100, b"not from the file")
    return memory


def save(memory: MmapGuestMemory, path: Path, ref_files: list[Path]) -> fileformat.Snapshot:
    source = image.MemorySource([(host, length) for _, length, host in memory.host_regions()])
    runs = image.runs(source)
    kept = [r for r in (refs.find(source, runs, f) for f in ref_files) if r is not None]
    description = {"backend": "test", refs.MEMORY_REFS: [r.as_json() for r in kept]}
    fileformat.write(path, description, {}, source, memory_runs=refs.without(runs, kept))
    return fileformat.read(path)


def restored(snap: fileformat.Snapshot) -> MmapGuestMemory:
    memory = MmapGuestMemory(REGIONS)
    with open(snap.path, "rb") as f:
        memory.map_private(f.fileno(), snap.memory_offset)
        refs.map_refs(refs.parse(snap.description, str(snap.path)), memory, str(snap.path))
    return memory


def test_pages_of_a_file_are_kept_by_reference(base: Path, tmp_path: Path) -> None:
    memory = guest_with(base)
    with_refs = save(memory, tmp_path / "refs.snap", [base])
    without = save(memory, tmp_path / "plain.snap", [])
    (ref,) = refs.parse(with_refs.description, "x")
    assert ref.file == base.resolve() and sum(n for _, n, _ in ref.runs) == 9  # pages 2..10
    blocks = os.stat(with_refs.path).st_blocks * 512
    assert blocks <= os.stat(without.path).st_blocks * 512 - 8 * PAGE
    back = restored(with_refs)
    for start, length in REGIONS:
        assert back.read(start, length) == memory.read(start, length)
    back.write(8 * MIB, b"x")  # copy-on-write: the file stays as it was
    assert base.read_bytes()[5 * PAGE] == 6


@pytest.mark.parametrize("change", ["rewritten", "cut", "missing"])
def test_a_changed_file_is_refused_in_one_line(base: Path, tmp_path: Path, change: str) -> None:
    snap = save(guest_with(base), tmp_path / "refs.snap", [base])
    if change == "rewritten":
        data = bytearray(base.read_bytes())
        data[3 * PAGE + 7] ^= 1
        base.write_bytes(bytes(data))
    elif change == "cut":
        base.write_bytes(base.read_bytes()[: 6 * PAGE])
    else:
        base.unlink()
    with pytest.raises(SnapshotError) as raised:
        restored(snap)
    assert "whose pages it keeps, cannot be used" in str(raised.value)
    assert "\n" not in str(raised.value)
