"""The snapshot file (snapshot/fileformat.py, image.py): what is written reads back, guest RAM
is a sparse image mapped copy-on-write, and every kind of damage is refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.snapshot import fileformat, image
from vmmarch_cli.snapshot.fileformat import Header, SnapshotError

MIB = 1 << 20
REGIONS = [(0, 8 * MIB), (16 * MIB, 4 * MIB)]


@pytest.fixture()
def memory() -> MmapGuestMemory:
    m = MmapGuestMemory(REGIONS)
    for address in range(0, 8 * MIB, 3 * image.PAGE):  # every third page of the first region
        m.write(address + 100, address.to_bytes(8, "little"))
    m.write(16 * MIB + 5, b"second region")
    return m


def save(memory: MmapGuestMemory, path: Path) -> Path:
    source = image.MemorySource([(host, length) for _, length, host in memory.host_regions()])
    fileformat.write(path, {"backend": "test", "machine": {"mem": 12}},
                     {"cpu0": b"\x01" * 300, "empty": b"", "vm": b"{}"}, source)
    return path


def test_what_is_written_reads_back(memory: MmapGuestMemory, tmp_path: Path) -> None:
    snap = fileformat.read(save(memory, tmp_path / "s"))
    assert snap.description == {"backend": "test", "machine": {"mem": 12}}
    assert snap.sections == {"cpu0": b"\x01" * 300, "empty": b"", "vm": b"{}"}
    assert snap.memory_length == 12 * MIB and snap.memory_offset % image.PAGE == 0


def test_zero_pages_are_holes_and_the_image_maps_copy_on_write(
        memory: MmapGuestMemory, tmp_path: Path) -> None:
    path = save(memory, tmp_path / "s")
    written = (8 * MIB // image.PAGE + 2) // 3 + 1  # pages that are not all zeros
    assert os.stat(path).st_blocks * 512 < (written + 8) * image.PAGE
    snap = fileformat.read(path)
    restored = MmapGuestMemory(REGIONS)
    fd = os.open(path, os.O_RDONLY)
    try:
        restored.map_private(fd, snap.memory_offset)
    finally:
        os.close(fd)
    for start, length in REGIONS:
        assert restored.read(start, length) == memory.read(start, length)
    restored.write(100, b"changed")  # private: the file stays as it was
    assert fileformat.read(path).sections == snap.sections
    again = MmapGuestMemory(REGIONS)
    with open(path, "rb") as f:
        again.map_private(f.fileno(), snap.memory_offset)
    assert again.read(100, 8) == memory.read(100, 8)


def test_a_failed_write_leaves_no_file(memory: MmapGuestMemory, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image, "write", full)
    with pytest.raises(OSError):
        save(memory, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def damaged(path: Path, at: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[at : at + len(data)] = data
    out = path.with_name("damaged")
    out.write_bytes(raw)
    return out


@pytest.mark.parametrize("how, message", [
    ("foreign", "not a vmm-arch snapshot"),
    ("short header", "truncated snapshot"),
    ("cut", "truncated snapshot"),
    ("version", "format version 7; this vmm-arch reads version 3"),
    ("header", "its header fails the CRC"),
    ("description", "its state fails the CRC"),
    ("section", "its state fails the CRC"),
    ("memory", "its memory fails the CRC"),
    ("outside", "its memory fails the CRC"),  # a page the runs leave out (zeros) written
])
def test_damage_is_refused_in_one_line(memory: MmapGuestMemory, tmp_path: Path, how: str,
                                       message: str) -> None:
    path = save(memory, tmp_path / "s")
    header = Header.read(path.read_bytes())
    raw = path.read_bytes()
    if how == "foreign":
        bad = damaged(path, 0, b"\x7fELF")
    elif how == "short header":
        bad = path.with_name("damaged")
        bad.write_bytes(raw[: Header.sizeof() - 1])
    elif how == "cut":
        bad = path.with_name("damaged")
        bad.write_bytes(raw[: header.memory_offset + 3 * image.PAGE])
    elif how == "version":
        bad = damaged(path, Header.version.offset, (7).to_bytes(4, "little"))
    elif how == "header":
        bad = damaged(path, Header.memory_length.offset, (1 << 20).to_bytes(8, "little"))
    elif how == "description":  # a hand edit: "test" -> "kvm!"
        at = raw.index(b'"test"', header.description_offset)
        bad = damaged(path, at + 1, b"kvm!")
    elif how == "section":
        bad = damaged(path, header.description_offset + header.state_length - 5, b"\x02")
    elif how == "memory":
        bad = damaged(path, header.memory_offset + 3 * image.PAGE + 100, b"\xff")
    else:
        bad = damaged(path, header.memory_offset + 1 * image.PAGE + 100, b"\xff")
    with pytest.raises(SnapshotError) as raised:
        fileformat.read(bad)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert str(bad) in str(raised.value)


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="No such file"):
        fileformat.read(tmp_path / "nothing")


def test_a_run_across_two_regions_sums_the_same_from_ram_and_from_the_file(
        tmp_path: Path) -> None:
    """The image puts regions one after another, so non-zero pages at the end of one and the
    start of the next are one run in the file: the writer (from guest RAM, region by region)
    and the reader (from the file) must sum it alike."""
    memory = MmapGuestMemory([(0, MIB), (4 * MIB, MIB)])
    memory.write(MIB - 16, b"end of the first")
    memory.write(4 * MIB, b"start of the second")
    snap = fileformat.read(save(memory, tmp_path / "s"))  # raises on a CRC mismatch
    assert snap.memory_length == 2 * MIB


def test_a_snapshot_written_in_the_background(memory: MmapGuestMemory, tmp_path: Path) -> None:
    """writer.Writing: a child process writes guest RAM as it was at the fork while the parent
    changes it."""
    from vmmarch_cli.snapshot.writer import Writing, wait_for_writer

    before = memory.read(0, 8 * MIB)
    writing = Writing.start(tmp_path / "bg", lambda: save(memory, tmp_path / "bg"))
    assert writing is not None
    memory.write(0, b"after the fork")  # the child's copy keeps what was there
    wait_for_writer(tmp_path / "bg")
    snap = fileformat.read(tmp_path / "bg")
    restored = MmapGuestMemory(REGIONS)
    with open(snap.path, "rb") as f:
        restored.map_private(f.fileno(), snap.memory_offset)
    assert restored.read(0, 8 * MIB) == before
