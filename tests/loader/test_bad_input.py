"""Bad input: one line on stderr, exit status 65, no traceback, for every kind of defect.

Each defective image is a real one (the project's boot-check guest, or a bzImage header built
from the boot protocol's fields) with a single defect injected.
"""

from __future__ import annotations

import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from kernel_payloads import bzimage

pytestmark = pytest.mark.usefixtures("kvm")


def assert_one_line_error(p, status: int = 65, match: str = "") -> None:  # type: ignore[no-untyped-def]
    assert p.returncode == status, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("vmm-arch: error: ")
    assert "Traceback" not in p.stderr
    assert match in lines[0], lines[0]


def _mutated(src: Path, tmp_path: Path, name: str, edit) -> Path:  # type: ignore[no-untyped-def]
    data = bytearray(src.read_bytes())
    edit(data)
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return out


def test_missing_kernel(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("boot", str(tmp_path / "nope")), match="no such file")


def test_directory_as_kernel(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("boot", str(tmp_path)), match="is a directory")


@pytest.mark.parametrize("command", ["boot", "inspect", "dump-regs"])
def test_fifo_as_kernel_is_refused_not_waited_on(command: str, tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo")  # no writer: an open or a read would block forever
    p = run_cli(command, str(tmp_path / "fifo"), timeout=30)
    assert_one_line_error(p, match="is a FIFO, not a regular file")


def test_device_as_kernel_or_initrd(guests: dict[str, Path]) -> None:
    # /dev/zero has size 0 and never ends: neither "empty" nor a read until memory runs out.
    assert_one_line_error(run_cli("boot", "/dev/zero"), match="is a device, not a regular file")
    p = run_cli("boot", str(guests["bootcheck"]), "--initrd", "/dev/null")
    assert_one_line_error(p, match="initrd is a device, not a regular file")


def test_fifo_as_initrd(guests: dict[str, Path], tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo")
    p = run_cli("boot", str(guests["bootcheck"]), "--initrd", str(tmp_path / "fifo"), timeout=30)
    assert_one_line_error(p, match="initrd is a FIFO, not a regular file")


def test_memory_the_host_cannot_map(guests: dict[str, Path]) -> None:
    # Within the accepted range (up to 1 TiB) but beyond what this process may map: guest RAM
    # is MAP_NORESERVE, so only an address-space limit (ulimit -v, as CI runners set) refuses it.
    def limit_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    p = subprocess.run([sys.executable, "-m", "vmmarch_cli", "boot", str(guests["bootcheck"]),
                        "--mem", "32G"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       preexec_fn=limit_address_space)
    assert_one_line_error(p, match="MiB of guest RAM at 0x100000000: Cannot allocate memory")


def test_expect_that_is_not_a_regex(guests: dict[str, Path]) -> None:
    p = run_cli("boot", str(guests["bootcheck"]), "--expect", "(")
    assert p.returncode == 64 and "Traceback" not in p.stderr
    assert "Invalid value for '--expect': '(' is not a regular expression" in p.stderr


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert_one_line_error(run_cli("boot", str(tmp_path / "empty")), match="empty file")


@pytest.mark.parametrize("blob", [b"\x1f\x8b\x08\x00" + bytes(100), b"MZ" + bytes(200),
                                  b"#!/bin/sh\necho hi\n"])
def test_not_a_kernel(tmp_path: Path, blob: bytes) -> None:
    (tmp_path / "blob").write_bytes(blob)
    assert_one_line_error(run_cli("boot", str(tmp_path / "blob")), match="neither an ELF")


def test_elf32(guests: dict[str, Path], tmp_path: Path) -> None:
    def edit(d: bytearray) -> None:
        d[4] = 1  # EI_CLASS = ELFCLASS32

    k = _mutated(guests["bootcheck"], tmp_path, "elf32", edit)
    assert_one_line_error(run_cli("boot", str(k)), match="not ELF64")


def test_big_endian(guests: dict[str, Path], tmp_path: Path) -> None:
    k = _mutated(guests["bootcheck"], tmp_path, "be", lambda d: d.__setitem__(5, 2))
    assert_one_line_error(run_cli("boot", str(k)), match="big-endian")


def test_aarch64_elf(guests: dict[str, Path], tmp_path: Path) -> None:
    k = _mutated(guests["bootcheck"], tmp_path, "arm",
                 lambda d: d.__setitem__(slice(18, 20), struct.pack("<H", 183)))
    assert_one_line_error(run_cli("boot", str(k)), match="not x86_64")


def test_truncated_elf(guests: dict[str, Path], tmp_path: Path) -> None:
    data = guests["bootcheck"].read_bytes()
    for cut in (40, 100, len(data) // 2):
        (tmp_path / "cut").write_bytes(data[:cut])
        p = run_cli("boot", str(tmp_path / "cut"))
        assert_one_line_error(p)


def test_segment_outside_guest_memory(guests: dict[str, Path], tmp_path: Path) -> None:
    def edit(d: bytearray) -> None:
        phoff = struct.unpack_from("<Q", d, 0x20)[0]
        struct.pack_into("<Q", d, phoff + 0x18, 0x7FFF_0000_0000)  # p_paddr of segment 0
        struct.pack_into("<Q", d, 0x18, 0x7FFF_0000_0000)  # e_entry follows it

    k = _mutated(guests["bootcheck"], tmp_path, "far", edit)
    assert_one_line_error(run_cli("boot", str(k)), match="does not fit in guest RAM")


def test_segment_over_boot_structures(guests: dict[str, Path], tmp_path: Path) -> None:
    def edit(d: bytearray) -> None:
        phoff = struct.unpack_from("<Q", d, 0x20)[0]
        struct.pack_into("<Q", d, phoff + 0x18, 0x7000)
        struct.pack_into("<Q", d, 0x18, 0x7000)

    k = _mutated(guests["bootcheck"], tmp_path, "low", edit)
    assert_one_line_error(run_cli("boot", str(k)), match="below 1 MiB")


def test_entry_outside_segments(guests: dict[str, Path], tmp_path: Path) -> None:
    k = _mutated(guests["bootcheck"], tmp_path, "entry",
                 lambda d: struct.pack_into("<Q", d, 0x18, 0x5000000))
    assert_one_line_error(run_cli("boot", str(k)), match="entry point")


def test_cmdline_too_long(guests: dict[str, Path]) -> None:
    p = run_cli("boot", str(guests["bootcheck"]), "--cmdline", "x" * 2048)
    assert_one_line_error(p, match="at most 2047")


def test_memory_too_small_for_the_kernel(guests: dict[str, Path]) -> None:
    # The guest loads at 16 MiB; 16 MiB of RAM cannot hold it.
    p = run_cli("boot", str(guests["bootcheck"]), "--mem", "16M")
    assert_one_line_error(p, match="--mem")


@pytest.mark.parametrize("size", ["lots", "12Q", "1K", "4097K", "2T"])
def test_bad_memory_size(guests: dict[str, Path], size: str) -> None:
    assert_one_line_error(run_cli("boot", str(guests["bootcheck"]), "--mem", size),
                          match="memory size")


def test_unknown_cpu_feature(guests: dict[str, Path]) -> None:
    p = run_cli("boot", str(guests["bootcheck"]), "--cpu-mask", "cx16,warpdrive")
    assert_one_line_error(p, match="warpdrive")


def test_missing_initrd(guests: dict[str, Path], tmp_path: Path) -> None:
    p = run_cli("boot", str(guests["bootcheck"]), "--initrd", str(tmp_path / "none.cpio"))
    assert_one_line_error(p, match="initrd")


def test_unknown_backend(guests: dict[str, Path]) -> None:
    assert_one_line_error(run_cli("boot", str(guests["bootcheck"]), "--backend", "xen"),
                          match="unknown backend")


def test_usage_error_is_64(guests: dict[str, Path]) -> None:
    p = run_cli("boot", str(guests["bootcheck"]), "--no-such-option")
    assert p.returncode == 64
    assert "Traceback" not in p.stderr


def test_unusable_kvm_device_is_69(guests: dict[str, Path], tmp_path: Path) -> None:
    p = run_cli("boot", "--backend", "kvm", str(guests["bootcheck"]),
                env={"VMMARCH_KVM_DEVICE": str(tmp_path / "kvm")})
    assert_one_line_error(p, status=69, match="does not exist")
    (tmp_path / "notkvm").write_bytes(b"")
    p = run_cli("boot", "--backend", "kvm", str(guests["bootcheck"]),
                env={"VMMARCH_KVM_DEVICE": str(tmp_path / "notkvm")})
    assert p.returncode == 69 and "Traceback" not in p.stderr


# --- bzImage headers ---------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "match"), [
    ({"boot_flag": 0x1234}, "boot_flag"),
    ({"version": 0x020B}, "2.11"),
    ({"xloadflags": 0}, "XLF_KERNEL_64"),
    ({"loadflags": 0}, "LOADED_HIGH"),
    ({"size": 2048}, "truncated"),
])
def test_bzimage_header_defects(tmp_path: Path, fields: dict[str, int], match: str) -> None:
    (tmp_path / "bz").write_bytes(bzimage(**fields))
    assert_one_line_error(run_cli("boot", str(tmp_path / "bz")), match=match)


def test_bzimage_init_size_past_ram(tmp_path: Path) -> None:
    d = bytearray(bzimage())
    struct.pack_into("<I", d, 0x260, 0x2000_0000)  # init_size 512 MiB
    (tmp_path / "bz").write_bytes(bytes(d))
    assert_one_line_error(run_cli("boot", str(tmp_path / "bz")), match="init_size")


def test_bzimage_cmdline_limit_is_the_kernels(tmp_path: Path) -> None:
    d = bytearray(bzimage())
    struct.pack_into("<I", d, 0x238, 100)
    (tmp_path / "bz").write_bytes(bytes(d))
    p = run_cli("dump-regs", str(tmp_path / "bz"), "--cmdline", "y" * 101)
    assert_one_line_error(p, match="at most 100")
