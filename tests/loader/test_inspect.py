"""``vmm-arch inspect`` on the project's own guests and a bzImage-shaped header."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from conftest import run_cli
from kernel_payloads import bzimage


def test_inspect_elf_with_pvh_note(guests: dict[str, Path]) -> None:
    p = run_cli("inspect", str(guests["pvhcheck"]), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["format"] == "elf"
    assert doc["boot_protocols"] == ["linux64", "pvh"] and doc["boot_picks"] == "pvh"
    assert doc["pvh_entry"] == "0x1000008"
    assert doc["segments"][0]["paddr"] == "0x1000000"
    assert "X" in doc["segments"][0]["flags"]


def test_inspect_elf_without_note(guests: dict[str, Path]) -> None:
    doc = json.loads(run_cli("inspect", str(guests["bootcheck"]), "--json").stdout)
    assert doc["boot_protocols"] == ["linux64"] and doc["pvh_entry"] is None
    assert doc["entry_64bit"] == "0x1000000"


def test_inspect_describes_what_boot_refuses(guests: dict[str, Path], tmp_path: Path) -> None:
    """Issue 17: an ELF whose PT_LOAD segments are all empty still has its PVH note. inspect
    shows it and says why boot would refuse the image; boot refuses it (65)."""
    data = bytearray(guests["pvhcheck"].read_bytes())
    # Elf64_Ehdr: e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38; Elf64_Phdr: p_type
    # at 0, p_filesz at 0x20, p_memsz at 0x28 (System V gABI, "Program Header").
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        if struct.unpack_from("<I", data, at)[0] == 1:  # PT_LOAD
            struct.pack_into("<QQ", data, at + 0x20, 0, 0)
    kernel = tmp_path / "empty-loads.elf"
    kernel.write_bytes(bytes(data))

    p = run_cli("inspect", "--json", str(kernel))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["pvh_entry"] == "0x1000008" and doc["segments"] == []
    assert doc["not_bootable"] == "no PT_LOAD segment to load"
    text = run_cli("inspect", str(kernel))
    assert text.returncode == 0 and "not bootable: no PT_LOAD segment to load" in text.stdout
    refused = run_cli("boot", str(kernel))
    assert refused.returncode == 65
    assert refused.stderr.strip() == f"vmm-arch: error: {kernel}: no PT_LOAD segment to load"
    fine = json.loads(run_cli("inspect", "--json", str(guests["pvhcheck"])).stdout)
    assert fine["not_bootable"] is None


def test_inspect_bzimage_and_extract(tmp_path: Path) -> None:
    # A bzImage whose payload is an (uncompressed) ELF, as CONFIG_KERNEL_UNCOMPRESSED builds.
    elf = b"\x7fELF" + bytes(60)
    d = bytearray(bzimage(size=2048 + len(elf)))
    struct.pack_into("<II", d, 0x248, 0, len(elf))
    d[2048:] = elf
    (tmp_path / "bz").write_bytes(bytes(d))
    p = run_cli("inspect", str(tmp_path / "bz"), "--json", "--extract-vmlinux",
                str(tmp_path / "out.elf"))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["format"] == "bzimage" and doc["boot_picks"] == "linux64"
    assert doc["entry_64bit"] == "0x100200"
    assert doc["setup_header"]["version"]["value"] == "0x20f"
    assert doc["payload_compression"] == "none"
    assert (tmp_path / "out.elf").read_bytes() == elf


def test_inspect_refuses_what_boot_refuses(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"\x1f\x8b" + bytes(100))
    p = run_cli("inspect", str(tmp_path / "x"))
    assert p.returncode == 65 and "neither an ELF" in p.stderr
