"""The newc cpio writer, the busybox initramfs layout and the marker /init script."""

from __future__ import annotations

import gzip
import os
import platform
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmmarch_cli.errors import BadInputError
from vmmarch_cli.initramfs import (
    EXIT_PORT,
    OUTB_HELPER,
    CpioEntry,
    _outb_helper,
    build_cpio,
    busybox_initramfs,
    marker_init_script,
)

HEADER = 110


@dataclass(frozen=True)
class Member:
    offset: int
    name: str
    ino: int
    mode: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    check: int
    data: bytes


def parse_newc(archive: bytes) -> list[Member]:
    """An independent reader of buffer-format.rst, strict about magic and alignment."""
    members: list[Member] = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"member at {pos} is not 4-byte aligned"
        header = archive[pos : pos + HEADER]
        assert header[:6] == b"070701", f"bad magic at {pos}: {header[:6]!r}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, _uid, _gid, nlink, mtime, filesize = fields[:7]
        rmaj, rmin, namesize, check = fields[9:13]
        name_raw = archive[pos + HEADER : pos + HEADER + namesize]
        assert name_raw.endswith(b"\0") and b"\0" not in name_raw[:-1]
        name = name_raw[:-1].decode()
        data_start = pos + HEADER + namesize
        data_start += -data_start % 4
        assert archive[pos + HEADER + namesize : data_start] == b"\0" * (
            data_start - pos - HEADER - namesize
        )
        data = archive[data_start : data_start + filesize]
        assert len(data) == filesize
        end = data_start + filesize
        padded = end + (-end % 4)
        assert archive[end:padded] == b"\0" * (padded - end)
        members.append(Member(pos, name, ino, mode, nlink, mtime, (rmaj, rmin), check, data))
        pos = padded
        if name == "TRAILER!!!":
            assert pos == len(archive), "bytes after the trailer"
            return members


def by_name(members: list[Member]) -> dict[str, Member]:
    return {m.name: m for m in members}


SAMPLE = [
    CpioEntry("/etc", stat.S_IFDIR | 0o755),
    CpioEntry("/etc/hostname", stat.S_IFREG | 0o644, b"guest\n"),
    CpioEntry("/etc/link", stat.S_IFLNK | 0o777, target="hostname"),
    CpioEntry("/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
    CpioEntry("/empty", stat.S_IFREG | 0o600),
]


def test_round_trip() -> None:
    members = parse_newc(build_cpio(SAMPLE))
    assert [m.name for m in members] == [
        "etc",
        "etc/hostname",
        "etc/link",
        "console",
        "empty",
        "TRAILER!!!",
    ]
    got = by_name(members)
    assert got["etc"].mode == stat.S_IFDIR | 0o755 and got["etc"].nlink == 2
    assert got["etc/hostname"].data == b"guest\n" and got["etc/hostname"].nlink == 1
    assert got["etc/link"].mode == stat.S_IFLNK | 0o777 and got["etc/link"].data == b"hostname"
    assert got["console"].rdev == (5, 1) and got["console"].data == b""
    assert got["empty"].data == b""
    assert got["TRAILER!!!"].mode == 0 and got["TRAILER!!!"].data == b""
    # Reproducible: no timestamps, no checksum in 070701, distinct inode numbers.
    assert all(m.mtime == 0 and m.check == 0 for m in members)
    inos = [m.ino for m in members[:-1]]
    assert len(set(inos)) == len(inos)


@pytest.mark.parametrize("name_len", range(1, 9))
@pytest.mark.parametrize("data_len", range(8))
def test_padding(name_len: int, data_len: int) -> None:
    entry = CpioEntry("/" + "n" * name_len, stat.S_IFREG | 0o644, b"d" * data_len)
    archive = build_cpio([entry, entry.__class__("/z", stat.S_IFREG | 0o644, b"z")])
    members = parse_newc(archive)
    assert len(archive) % 4 == 0
    first = members[0]
    assert first.data == b"d" * data_len
    name_end = HEADER + name_len + 1
    assert members[1].offset == (name_end + 3) // 4 * 4 + (data_len + 3) // 4 * 4


def test_duplicate_rejected() -> None:
    with pytest.raises(BadInputError, match="twice"):
        build_cpio([SAMPLE[0], SAMPLE[0]])


@pytest.mark.parametrize(
    "path",
    ["relative/path", "", "/", "//", "/a/../b", "/..", "/a\0b", "/x/" + "a" * 5000],
)
def test_bad_guest_paths(path: str) -> None:
    with pytest.raises(BadInputError):
        CpioEntry(path, stat.S_IFREG | 0o644)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": stat.S_IFBLK | 0o600}, "file type"),
        ({"mode": stat.S_IFDIR | 0o755, "data": b"x"}, "only a regular file"),
        ({"mode": stat.S_IFLNK | 0o777}, "needs a non-empty target"),
        ({"mode": stat.S_IFREG | 0o644, "target": "x"}, "only a symlink"),
        ({"mode": 0o1000000}, "not a st_mode"),
        ({"mode": stat.S_IFCHR | 0o600, "rdev_major": -1}, "out of range"),
    ],
)
def test_bad_entries(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(BadInputError, match=match):
        CpioEntry("/x", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def fake_busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(b"\x7fELF fake busybox")
    path.chmod(0o755)
    return path


def test_busybox_layout(fake_busybox: Path, tmp_path: Path) -> None:
    extra = tmp_path / "tool"
    extra.write_bytes(b"#!/bin/sh\n")
    extra.chmod(0o750)
    image = busybox_initramfs(fake_busybox, "#!/bin/busybox sh\n", [(extra, "/usr/local/bin/t")])
    # A gzip member (RFC 1952) with MTIME zero, so the bytes do not depend on the build time.
    assert image[:2] == b"\x1f\x8b"
    assert struct.unpack_from("<I", image, 4)[0] == 0
    members = by_name(parse_newc(gzip.decompress(image)))
    assert members["bin/busybox"].data == fake_busybox.read_bytes()
    assert members["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert members["bin/sh"].mode == stat.S_IFLNK | 0o777 and members["bin/sh"].data == b"busybox"
    assert members["dev/console"].rdev == (5, 1)
    assert members["dev/null"].rdev == (1, 3)
    assert members["dev/port"].rdev == (1, 4)
    for dev in ("dev/console", "dev/null", "dev/port"):
        assert stat.S_ISCHR(members[dev].mode)
    for directory in ("bin", "dev", "proc", "sys", "tmp", "usr", "usr/local", "usr/local/bin"):
        assert stat.S_ISDIR(members[directory].mode), directory
    assert members["init"].mode == stat.S_IFREG | 0o755
    assert members["init"].data == b"#!/bin/busybox sh\n"
    assert members["usr/local/bin/t"].mode == stat.S_IFREG | 0o750
    assert OUTB_HELPER.lstrip("/") in members
    # Parents come before their children, as the kernel's unpacker needs.
    order = [m.name for m in parse_newc(gzip.decompress(image))]
    assert order.index("usr/local") < order.index("usr/local/bin/t")


def test_reproducible_and_uncompressed(fake_busybox: Path) -> None:
    first = busybox_initramfs(fake_busybox, "x")
    assert first == busybox_initramfs(fake_busybox, "x")
    raw = busybox_initramfs(fake_busybox, "x", compress=False)
    assert raw.startswith(b"070701") and gzip.decompress(first) == raw


def test_busybox_bad_inputs(fake_busybox: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        busybox_initramfs(tmp_path / "missing", "x")
    with pytest.raises(BadInputError, match="not a regular file"):
        busybox_initramfs(tmp_path, "x")
    with pytest.raises(BadInputError, match="absolute"):
        busybox_initramfs(fake_busybox, "x", [(fake_busybox, "bin/tool")])
    with pytest.raises(BadInputError, match=r"'\.\.'"):
        busybox_initramfs(fake_busybox, "x", [(fake_busybox, "/bin/../etc/x")])
    with pytest.raises(BadInputError, match="NUL"):
        busybox_initramfs(fake_busybox, "x", [(fake_busybox, "/bin/a\0b")])
    with pytest.raises(BadInputError, match="overwrite"):
        busybox_initramfs(fake_busybox, "x", [(fake_busybox, "/init")])
    with pytest.raises(BadInputError, match="does not exist"):
        busybox_initramfs(fake_busybox, "x", [(tmp_path / "nope", "/nope")])
    with pytest.raises(BadInputError, match="is a file, not a directory"):
        busybox_initramfs(fake_busybox, "x", [(fake_busybox, "/init/sub")])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio(1) on this host")
def test_system_cpio_extracts(tmp_path: Path) -> None:
    # Device nodes are left out: creating them needs CAP_MKNOD.
    entries = [e for e in SAMPLE if not stat.S_ISCHR(e.mode)]
    entries.append(CpioEntry("/etc/script", stat.S_IFREG | 0o755, b"#!/bin/sh\n"))
    out = tmp_path / "root"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=build_cpio(entries), cwd=out, check=True)
    assert (out / "etc/hostname").read_bytes() == b"guest\n"
    assert stat.S_IMODE((out / "etc/hostname").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "etc/script").stat().st_mode) == 0o755
    assert os.readlink(out / "etc/link") == "hostname"
    assert (out / "empty").read_bytes() == b""


def test_marker_script_text() -> None:
    script = marker_init_script("VMM-INIT-REACHED", ["echo one", "echo two"])
    assert script.startswith("#!/bin/busybox sh\n")
    for fact in ("cmdline", "nproc", "online", "memtotal_kb", "uptime"):
        assert f"fact {fact} " in script or f"file_fact {fact} " in script
    assert "vmm_exit() {" in script and "printf '%03o'" in script
    assert f"seek={EXIT_PORT} count=1" in script and EXIT_PORT == 244
    # Extra commands run after the facts and before the marker, which precedes the exit.
    order = [script.index(s) for s in ("fact uptime", "echo one", "echo two", "\necho VMM-INIT")]
    assert order == sorted(order)
    assert script.index("\necho VMM-INIT") < script.index("vmm_exit 0") < script.index("reboot -f")


def test_marker_quoted_and_validated() -> None:
    assert "\necho 'a b;c'\n" in marker_init_script("a b;c")
    for bad in ("", "two\nlines", "nul\0"):
        with pytest.raises(BadInputError):
            marker_init_script(bad)
    with pytest.raises(BadInputError):
        marker_init_script("ok", ["bad\0command"])


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX sh on this host")
def test_marker_script_runs(tmp_path: Path) -> None:
    """Run the script under the host's sh with the guest-only parts pointed at files."""
    port = tmp_path / "port"
    port.write_bytes(b"")
    helper_log = tmp_path / "helper.log"
    helper = tmp_path / "outb"
    helper.write_text(f"#!/bin/sh\ncat >> {helper_log}\n")
    helper.chmod(0o755)
    busybox_log = tmp_path / "busybox.log"
    script = marker_init_script("MARK ER", ["echo extra-ran", "vmm_exit 200"])
    script = (
        script.replace("[ -c /dev/port ]", f"[ -f {port} ]")
        .replace("/dev/port", str(port))
        .replace(OUTB_HELPER, str(helper))
        # Never mount or reboot the host: route busybox applets to a logging stub.
        .replace("/bin/busybox ", "stub_busybox ")
        .replace("export PATH=/bin", f'stub_busybox() {{ echo "$*" >> {busybox_log}; }}')
    )
    done = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    facts = dict(
        line.removeprefix("VMMARCH-FACT ").split(" ", 1)
        for line in done.stdout.splitlines()
        if line.startswith("VMMARCH-FACT ")
    )
    assert facts["cmdline"] == Path("/proc/cmdline").read_text().strip()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    assert facts["nproc"] == str(sum(line.startswith("processor") for line in cpuinfo))
    online = Path("/sys/devices/system/cpu/online")
    assert facts["online"] == (online.read_text().strip() if online.exists() else "unknown")
    meminfo = Path("/proc/meminfo").read_text().split()
    assert facts["memtotal_kb"] == meminfo[meminfo.index("MemTotal:") + 1]
    assert float(facts["uptime"]) > 0
    lines = done.stdout.splitlines()
    assert lines.index("extra-ran") < lines.index("MARK ER") == len(lines) - 1
    # vmm_exit 200 then vmm_exit 0: each sends its status as one raw byte.
    assert helper_log.read_bytes() == bytes([200, 0])
    assert port.read_bytes() == b"\0" * (EXIT_PORT + 1)
    # Each vmm_exit drains the console first (stty re-applies its settings with TCSADRAIN):
    # the stub prints nothing for -g, so the set is called with an empty argument.
    drain = ["stty -F /dev/console -g", "stty -F /dev/console "]
    assert busybox_log.read_text().splitlines() == [
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        *drain, *drain,
        "reboot -f",
    ]


def test_outb_helper_elf() -> None:
    elf = _outb_helper(EXIT_PORT)
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1  # ELFCLASS64, little-endian
    e_type, e_machine, _version, e_entry, e_phoff = struct.unpack_from("<HHIQQ", elf, 16)
    assert (e_type, e_machine, e_phoff) == (2, 62, 64)
    p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz = struct.unpack_from(
        "<IIQQQQQ", elf, 64
    )
    assert (p_type, p_offset, p_filesz, p_memsz) == (1, 0, len(elf), len(elf))
    assert p_vaddr <= e_entry < p_vaddr + p_filesz
    # Both port immediates (mov edi, imm32 and mov edx, imm32) carry the port.
    assert elf.count(b"\xbf" + struct.pack("<I", EXIT_PORT)) == 1
    assert elf.count(b"\xba" + struct.pack("<I", EXIT_PORT)) == 1
    with pytest.raises(BadInputError):
        _outb_helper(0x10000)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="runs x86_64 Linux code"
)
def test_outb_helper_runs(tmp_path: Path) -> None:
    # Port 0x80 is the POST diagnostic port Linux itself writes for I/O delays: safe to poke.
    helper = tmp_path / "outb"
    helper.write_bytes(_outb_helper(0x80))
    helper.chmod(0o755)
    no_input = subprocess.run([helper], input=b"", check=False, timeout=10)
    assert no_input.returncode == 1
    # 0: ioperm allowed the OUT; 2: ioperm refused (no CAP_SYS_RAWIO, or ENOSYS in a sandbox).
    one_byte = subprocess.run([helper], input=b"\x07", check=False, timeout=10)
    assert one_byte.returncode in (0, 2)
