"""Fetching the Debian test inputs: against fake apt tools (fast), and for real (``stock``)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmmarch_cli import assets
from vmmarch_cli.assets import (
    AssetError,
    cache_dir,
    fetch_busybox,
    fetch_debian_kernel,
    stock_initramfs,
)
from vmmarch_cli.commands.fetch import fetch_command
from vmmarch_cli.errors import EX_UNAVAILABLE, BadInputError, VmmArchError

RELEASE = "9.9.0-1-cloud-amd64"
VMLINUX = b"\x7fELF" + bytes(range(256)) * 64


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VMMARCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home/.cache/vmm-arch"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_dir() == tmp_path / "home/.cache/vmm-arch"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg/vmm-arch"
    monkeypatch.setenv("VMMARCH_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_asset_error_kind() -> None:
    assert issubclass(AssetError, VmmArchError)
    assert AssetError.exit_status == EX_UNAVAILABLE == 69


def _bzimage(payload: bytes) -> bytes:
    """A bzImage shell around ``payload`` (boot.rst: setup_sects, HdrS, 2.15, payload fields)."""
    header = bytearray(4 * 512)
    header[0x1F1] = 3
    header[0x202:0x206] = b"HdrS"
    struct.pack_into("<HII", header, 0x206, 0x020F, 0, 0)
    struct.pack_into("<II", header, 0x248, 0, len(payload))
    return bytes(header) + payload


FAKE_APT_CACHE = """#!/bin/sh
echo "apt-cache $*" >> "$FAKE_LOG"
if [ -e "$FAKE_STATE/no-lists" ] && [ ! -e "$FAKE_STATE/updated" ]; then
    echo "E: No packages found" >&2
    exit 100
fi
case "$1" in
depends)
    echo "$2"
    echo "  Depends: linux-image-9.9.0-1-cloud-amd64-dbg"
    echo "  Depends: linux-image-9.9.0-1-cloud-amd64"
    echo "  Recommends: firmware-linux-free"
    ;;
policy)
    printf '%s:\\n  Installed: (none)\\n  Candidate: 1.0-1\\n' "$2"
    ;;
esac
"""

FAKE_APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$FAKE_LOG"
case "$1" in
update)
    [ -e "$FAKE_STATE/update-brings-nothing" ] || touch "$FAKE_STATE/updated"
    ;;
download)
    if [ "$2" = --print-uris ]; then
        echo "'http://deb.example/$3.deb' $3_1.0-1_amd64.deb 123 SHA256:00"
        exit 0
    fi
    if [ -e "$FAKE_STATE/offline" ]; then
        echo "W: some warning" >&2
        echo "E: Failed to fetch http://deb.example/$2.deb  Could not resolve host" >&2
        exit 100
    fi
    echo "Get:1 http://deb.example $2 1.0-1 [123 B]"
    cp "$FAKE_FIXTURES/$2.deb" "./$2_1.0-1_amd64.deb"
    ;;
esac
"""

FAKE_DPKG_DEB = """#!/bin/sh
echo "dpkg-deb $*" >> "$FAKE_LOG"
[ "$1" = -x ] || exit 2
package=$(basename "$2" | cut -d_ -f1)
cp -R "$FAKE_FIXTURES/$package.tree/." "$3/"
"""


class FakeApt:
    def __init__(self, root: Path) -> None:
        self.log = root / "log"
        self.state = root / "state"
        self.fixtures = root / "fixtures"

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def set(self, flag: str) -> None:
        (self.state / flag).touch()


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeApt:
    """apt-cache, apt-get and dpkg-deb stand-ins that serve a fake kernel and busybox."""
    fake = FakeApt(tmp_path / "fake")
    bindir = tmp_path / "fake/bin"
    for directory in (bindir, fake.state, fake.fixtures):
        directory.mkdir(parents=True)
    for name, text in (
        ("apt-cache", FAKE_APT_CACHE),
        ("apt-get", FAKE_APT_GET),
        ("dpkg-deb", FAKE_DPKG_DEB),
    ):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    kernel = fake.fixtures / f"linux-image-{RELEASE}.tree/boot"
    kernel.mkdir(parents=True)
    (kernel / f"vmlinuz-{RELEASE}").write_bytes(_bzimage(gzip.compress(VMLINUX, mtime=0)))
    (kernel / f"config-{RELEASE}").write_text("CONFIG_PVH=y\n")
    busybox = fake.fixtures / "busybox-static.tree/bin"
    busybox.mkdir(parents=True)
    (busybox / "busybox").write_bytes(b"\x7fELF busybox")
    for package in (f"linux-image-{RELEASE}", "busybox-static"):
        (fake.fixtures / f"{package}.deb").write_bytes(b"!<arch>\n")
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_LOG", str(fake.log))
    monkeypatch.setenv("FAKE_STATE", str(fake.state))
    monkeypatch.setenv("FAKE_FIXTURES", str(fake.fixtures))
    monkeypatch.setenv("VMMARCH_CACHE", str(tmp_path / "cache"))
    return fake


def test_fetch_kernel(fake_apt: FakeApt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt_lists = tmp_path / "apt-lists"  # stands for /var/lib/apt/lists in the answers' key
    apt_lists.mkdir()
    (apt_lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("1")
    monkeypatch.setattr(assets, "APT_STATE", (apt_lists,))
    messages: list[str] = []
    kernel = fetch_debian_kernel(progress=messages.append)
    assert kernel.version == RELEASE
    assert kernel.bzimage.name == f"vmlinuz-{RELEASE}"
    assert kernel.vmlinux == kernel.bzimage.parent / f"vmlinux-{RELEASE}"
    assert kernel.vmlinux.read_bytes() == VMLINUX
    assert kernel.config.read_text() == "CONFIG_PVH=y\n"
    assert kernel.vmlinux.is_relative_to(tmp_path / "cache")
    assert stat.S_IMODE(kernel.vmlinux.stat().st_mode) == 0o644
    assert fake_apt.calls() == [
        "apt-cache depends linux-image-cloud-amd64",
        f"apt-get download --print-uris linux-image-{RELEASE}",
        f"apt-get download linux-image-{RELEASE}",
        f"dpkg-deb -x {tmp_path}/cache/debs/linux-image-{RELEASE}_1.0-1_amd64.deb "
        + fake_apt.calls()[3].split()[-1],
    ]
    assert any("downloading" in m for m in messages)
    # Nothing half-done is left behind: no temporary download or unpack directories.
    leftovers = [p.name for p in (tmp_path / "cache").rglob(".*")]
    assert leftovers == []

    before = {p: p.stat().st_mtime_ns for p in (kernel.vmlinux, kernel.bzimage)}
    again = fetch_debian_kernel()
    assert again == kernel
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # The second call asks apt nothing: its lists are as they were when it answered.
    assert fake_apt.calls()[4:] == []
    # New lists (apt-get update rewrote them): apt is asked which version is current again.
    (apt_lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("22")
    assert fetch_debian_kernel() == kernel
    assert fake_apt.calls()[4:] == [
        "apt-cache depends linux-image-cloud-amd64",
        f"apt-get download --print-uris linux-image-{RELEASE}",
    ]


def test_update_only_without_candidate(fake_apt: FakeApt) -> None:
    fake_apt.set("no-lists")
    assert fetch_debian_kernel().version == RELEASE
    assert fake_apt.calls().count("apt-get update") == 1
    fetch_debian_kernel()
    assert fake_apt.calls().count("apt-get update") == 1


def test_no_candidate_after_update(fake_apt: FakeApt) -> None:
    fake_apt.set("no-lists")
    fake_apt.set("update-brings-nothing")
    with pytest.raises(AssetError, match="apt knows no package linux-image-cloud-amd64"):
        fetch_debian_kernel()
    assert fake_apt.calls().count("apt-get update") == 1


def test_download_failure(fake_apt: FakeApt, tmp_path: Path) -> None:
    fake_apt.set("offline")
    with pytest.raises(AssetError) as caught:
        fetch_debian_kernel()
    message = str(caught.value)
    assert "\n" not in message
    assert f"apt-get download linux-image-{RELEASE} failed" in message
    assert "Could not resolve host" in message
    assert "check network access to the Debian mirror" in message
    assert caught.value.exit_status == EX_UNAVAILABLE
    debs = tmp_path / "cache/debs"
    assert list(debs.iterdir()) == []


def test_no_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("VMMARCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError, match="apt-cache not found"):
        fetch_debian_kernel()


def test_cache_not_writable(
    fake_apt: FakeApt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VMMARCH_CACHE", str(blocker / "cache"))
    with pytest.raises(AssetError, match=r"cannot write .*VMMARCH_CACHE"):
        fetch_debian_kernel()


def test_bad_flavour() -> None:
    with pytest.raises(BadInputError, match="flavour"):
        fetch_debian_kernel("rt; rm -rf /")


def test_generic_flavour_names() -> None:
    meta, wanted = assets._kernel_packages("generic")
    assert meta == "linux-image-amd64"
    assert wanted.fullmatch("linux-image-6.1.0-56-amd64")
    assert not wanted.fullmatch("linux-image-6.1.0-56-cloud-amd64")
    meta, wanted = assets._kernel_packages("cloud")
    assert meta == "linux-image-cloud-amd64"
    assert wanted.fullmatch("linux-image-6.1.0-56-cloud-amd64")
    assert not wanted.fullmatch("linux-image-6.1.0-56-cloud-amd64-unsigned")


def test_busybox_and_initramfs(fake_apt: FakeApt) -> None:
    busybox = fetch_busybox()
    assert busybox.read_bytes() == b"\x7fELF busybox"
    first = stock_initramfs()
    assert first.name.startswith("initramfs-") and first.name.endswith(".cpio")
    mtime = first.stat().st_mtime_ns
    archive = first.read_bytes()
    assert archive.startswith(b"070701")  # plain newc: no inflate in guest ring 0
    assert b"\necho VMM-INIT-REACHED\n" in archive
    assert stock_initramfs() == first and first.stat().st_mtime_ns == mtime
    other = stock_initramfs("OTHER-MARKER", busybox=busybox)
    assert other != first and other.parent == first.parent
    assert fake_apt.calls().count("apt-get download busybox-static") == 1


def test_fetch_command(fake_apt: FakeApt, tmp_path: Path) -> None:
    runner = CliRunner()
    plain = runner.invoke(fetch_command, [])
    assert plain.exit_code == 0, plain.output
    lines = dict(line.split(": ", 1) for line in plain.stdout.splitlines() if ": " in line)
    assert list(lines) == ["bzimage", "vmlinux", "busybox", "initramfs", "version"]
    assert lines["version"] == RELEASE
    as_json = runner.invoke(fetch_command, ["--json"])
    assert as_json.exit_code == 0
    result = json.loads(as_json.stdout)
    assert result == lines
    assert all(Path(result[key]).is_file() for key in ("bzimage", "vmlinux", "initramfs"))
    shown = runner.invoke(fetch_command, ["--help"])
    assert str(tmp_path / "cache") in shown.output and "/boot" in shown.output
    bad = runner.invoke(fetch_command, ["--flavour", "rt"])
    assert bad.exit_code == 2


# The real thing: Debian's cloud kernel and busybox-static from the mirror.

XEN_ELFNOTE_PHYS32_ENTRY = 18  # include/xen/interface/elfnote.h
PT_NOTE = 4


def _elf_notes(elf: bytes) -> list[tuple[bytes, int, bytes]]:
    (e_phoff,) = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    notes = []
    for index in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, e_phoff + index * e_phentsize
        )
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name_start = pos + 12
            desc_start = name_start + (namesz + 3) // 4 * 4
            name = elf[name_start : name_start + namesz].rstrip(b"\0")
            notes.append((name, note_type, elf[desc_start : desc_start + descsz]))
            pos = desc_start + (descsz + 3) // 4 * 4
    return notes


@pytest.mark.stock
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (a Debian host)")
def test_stock_debian_kernel_and_busybox() -> None:
    kernel = fetch_debian_kernel()
    busybox = fetch_busybox()
    vmlinux = kernel.vmlinux.read_bytes()
    assert vmlinux[:4] == b"\x7fELF"
    assert vmlinux[4] == 2 and vmlinux[5] == 1  # ELFCLASS64, ELFDATA2LSB
    e_type, e_machine, _version, e_entry = struct.unpack_from("<HHIQ", vmlinux, 16)
    assert (e_type, e_machine) == (2, 62)  # ET_EXEC, EM_X86_64
    # The physical load address Debian links at (CONFIG_PHYSICAL_START=0x1000000).
    assert e_entry == 0x1000000
    pvh = [
        d for name, t, d in _elf_notes(vmlinux) if (name, t) == (b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)
    ]
    assert len(pvh) == 1 and len(pvh[0]) in (4, 8)
    assert kernel.version.endswith("-cloud-amd64")
    assert kernel.config.read_text().count("CONFIG_PVH=y") == 1
    assert busybox.read_bytes()[:4] == b"\x7fELF" and os.access(busybox, os.X_OK)

    debs = sorted((cache_dir() / "debs").glob("*.deb"))
    watched = [kernel.vmlinux, kernel.bzimage, busybox, *debs]
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert fetch_debian_kernel() == kernel
    assert fetch_busybox() == busybox
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert sorted((cache_dir() / "debs").glob("*.deb")) == debs
