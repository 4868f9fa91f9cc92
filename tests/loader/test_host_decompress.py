"""A bzImage decompressed on the host (``--decompress``): every compression Linux builds a payload
with, made by the real tools; the boot of the vmlinux inside with the bzImage's own setup header;
the fallback to the guest's decompressor; the cache; bad input; what ``inspect`` says.

The bzImages are shells around the project's boot-check guest (tests/kernel_payloads.py): their
protected-mode code is a stand-in decompressor that exits with STUB_STATUS, so the exit status
tells which side decompressed. Debian's own bzImage is booted both ways in
tests/stock/test_stock_emulate.py.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from vmmarch_cli import backends, loader, machine
from vmmarch_cli.arch.x86_64 import boot_params, layout
from vmmarch_cli.config import BootConfig
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.loader.decompress import decompress, detect
from vmmarch_cli.loader.host_decompress import Decompress, cache_path
from vmmarch_cli.memory import MmapGuestMemory

from conftest import ROOT, needs_unicorn, run_cli
from kernel_payloads import (
    KERNEL_COMMANDS,
    PREF_ADDRESS,
    STUB_STATUS,
    bzimage_around,
    kernel_payload,
    write,
)

FORMATS = sorted(KERNEL_COMMANDS)
SCHEMA = json.loads((ROOT / "docs" / "result.schema.json").read_text())
#: The boot-check guest's ELF: PT_LOAD at 0x1000000, entry there (examples/build.py).
VMLINUX_ENTRY = 0x100_0000
#: The shells' own 64-bit entry: code32_start 0x100000 + 0x200.
BZIMAGE_ENTRY = 0x10_0200


def sample(size: int, seed: int = 1) -> bytes:
    """Compressible, not trivial: words from a small vocabulary, with long runs of zeros as in a
    kernel's .bss-adjacent data and page padding (LZO's extended lengths, overlapping copies)."""
    rng = random.Random(seed)
    words = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))) for _ in range(64)]
    out = bytearray(b"\x7fELF")
    while len(out) < size:
        out += bytes(rng.randrange(5000)) if rng.random() < 0.01 else rng.choice(words)
    return bytes(out[:size])


def boot(kernel: Path, *args: str, env: dict[str, str] | None = None
         ) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    """``boot --backend emulate --json KERNEL ARGS``: (status, document, stderr)."""
    p = run_cli("boot", "--backend", "emulate", "--json", "--timeout", "60", *args,
                str(kernel), env=env)
    doc = json.loads(p.stdout) if p.stdout.strip() else {}
    return p.returncode, doc, p.stderr


def uncached(image: bytes) -> bytes:
    """``image`` with a nonce in the boot sector's unused bytes (before the header at 0x1F1,
    nothing reads them): a hash no cache has seen."""
    return image[:0x10] + os.urandom(32) + image[0x30:]


def vmm_lines(stderr: str) -> list[str]:
    """vmm-arch's own lines on stderr (with --json the guest console goes there too)."""
    return [line for line in stderr.splitlines() if line.startswith("vmm-arch:")]


# --- the payload formats, as Linux builds them --------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_every_linux_compression_decodes(name: str) -> None:
    """Made by the real tool with the kernel build's options (more than one lzop block of
    256 KiB), decoded to the same bytes; the size trailer is ignored."""
    data = sample(700_000)
    payload = kernel_payload(name, data)
    assert detect(payload) == name
    assert decompress(payload) == data


@pytest.mark.stock
def test_debians_vmlinux_through_lzop(stock: dict[str, Path]) -> None:
    """The Python LZO1X decoder on a whole kernel (lzop -9 of Debian's 53 MB vmlinux, ~200
    blocks; about 6 s to compress and 2 s to decode here)."""
    vmlinux = stock["vmlinux"].read_bytes()
    assert decompress(kernel_payload("lzo", vmlinux)) == vmlinux


def test_lzo_damage_is_bad_input() -> None:
    """lzop's per-block Adler-32 catches damage the LZO1X stream itself does not."""
    data = sample(300_000, seed=5)
    payload = bytearray(kernel_payload("lzo", data))
    cut = bytes(payload[: len(payload) // 2])
    with pytest.raises(BadInputError, match="lzo payload is truncated"):
        decompress(cut)
    for offset in range(len(payload) // 3, len(payload) // 3 + 40, 8):
        payload[offset] ^= 0x55
    with pytest.raises(BadInputError, match="lzo"):
        decompress(bytes(payload))


# --- booting the vmlinux inside -------------------------------------------------------------


@pytest.fixture(scope="module")
def bootcheck_elf(guests: dict[str, Path]) -> bytes:
    return guests["bootcheck"].read_bytes()


@needs_unicorn
@pytest.mark.parametrize("name", FORMATS)
def test_every_compression_boots_on_the_host(name: str, bootcheck_elf: bytes,
                                             tmp_path: Path) -> None:
    """The vmlinux inside each format boots through the 64-bit protocol at its own entry and
    passes every boot-state check: the stand-in decompressor never runs."""
    kernel = write(tmp_path / f"bz-{name}", bzimage_around(kernel_payload(name, bootcheck_elf)))
    status, doc, stderr = boot(kernel, "--decompress", "host")
    assert status == 0, stderr[-2000:]
    assert "BOOTCHECK DONE 0" in stderr
    k = doc["kernel"]
    assert (k["format"], k["entry"], k["boot_protocol"]) == ("bzimage", "0x1000000", "linux64")
    d = k["decompress"]
    assert (d["requested"], d["where"], d["compression"], d["fallback"]) == \
        ("host", "host", name, None)
    assert Path(d["vmlinux"]).read_bytes() == bootcheck_elf
    jsonschema.validate(doc, SCHEMA)


@needs_unicorn
def test_guest_path_runs_the_images_own_code(bootcheck_elf: bytes, tmp_path: Path) -> None:
    kernel = write(tmp_path / "bz", bzimage_around(kernel_payload("gzip", bootcheck_elf)))
    status, doc, _ = boot(kernel, "--decompress", "guest")
    assert status == STUB_STATUS
    jsonschema.validate(doc, SCHEMA)
    assert doc["kernel"]["entry"] == f"{BZIMAGE_ENTRY:#x}"
    assert doc["kernel"]["decompress"]["where"] == "guest"
    assert doc["kernel"]["decompress"]["why"] == "--decompress guest"


@needs_unicorn
def test_auto_is_host_on_the_emulate_backend(bootcheck_elf: bytes, tmp_path: Path) -> None:
    kernel = write(tmp_path / "bz", bzimage_around(kernel_payload("lz4", bootcheck_elf)))
    p = run_cli("boot", "--backend", "emulate", "--timeout", "60", str(kernel))
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(x for x in vmm_lines(p.stderr) if "via the 64-bit Linux boot protocol" in x)
    assert "(entry 0x1000000) on emulate, lz4 payload decompressed on the host (auto: " \
           "emulate runs the guest's ring 0 in software" in line


def _zero_page(config: BootConfig) -> tuple[bytes, int]:
    with machine.prepare(config, quiet=True) as prepared:
        page = prepared.vm.memory.read(layout.ZERO_PAGE_START, boot_params.ZERO_PAGE_SIZE)
        return page, prepared.vcpus[0].get_regs().rip


#: Header fields the kernel's build writes and the loader must pass on unchanged (boot.rst,
#: "Details of header fields"); code32_start is the loader's, cmdline_size is the length
#: vmm-arch gives for every kernel (boot_params.build).
KERNELS_OWN_FIELDS = ("setup_sects", "boot_flag", "version", "loadflags", "initrd_addr_max",
                      "kernel_alignment", "relocatable_kernel", "xloadflags", "payload_offset",
                      "payload_length", "pref_address", "init_size")


@needs_unicorn
@pytest.mark.parametrize("where", [Decompress.HOST, Decompress.GUEST])
def test_boot_params_carry_the_bzimages_header(where: Decompress, bootcheck_elf: bytes,
                                               tmp_path: Path) -> None:
    """Either way the guest finds the bzImage's own setup header in boot_params; on the host
    path code32_start says where the kernel is, and the vCPU starts at the vmlinux's entry."""
    image = bzimage_around(kernel_payload("xz", bootcheck_elf))
    kernel = write(tmp_path / "bz", image)
    page, rip = _zero_page(BootConfig(kernel=kernel, backend="emulate", decompress=where))
    header = image.ljust(boot_params.ZERO_PAGE_SIZE, b"\0")
    for name in KERNELS_OWN_FIELDS:
        assert boot_params.get(page, name) == boot_params.get(header, name), name
    assert boot_params.get(page, "type_of_loader") == boot_params.LOADER_TYPE_UNDEFINED
    if where is Decompress.HOST:
        assert (rip, boot_params.get(page, "code32_start")) == (VMLINUX_ENTRY, VMLINUX_ENTRY)
    else:
        assert (rip, boot_params.get(page, "code32_start")) == (BZIMAGE_ENTRY, 0x10_0000)


# --- falling back to the guest ---------------------------------------------------------------


def _flip_middle(payload: bytes) -> bytes:
    damaged = bytearray(payload)
    for offset in range(len(payload) // 3, len(payload) // 3 + 48, 6):
        damaged[offset] ^= 0xFF
    return bytes(damaged)


@needs_unicorn
@pytest.mark.parametrize("case", ["unknown", "corrupt", "not-elf"])
def test_host_cannot_so_the_guest_decompresses(case: str, bootcheck_elf: bytes,
                                               tmp_path: Path) -> None:
    """One line says why, and the bzImage's own code runs (its exit status)."""
    payload = {
        "unknown": b"\x42\x5a\x00garbage" * 40,
        "corrupt": _flip_middle(kernel_payload("gzip", bootcheck_elf)),
        "not-elf": kernel_payload("zstd", b"MZ" + bootcheck_elf[2:]),
    }[case]
    image = bzimage_around(payload)
    kernel = write(tmp_path / "bz", image)
    status, doc, stderr = boot(kernel, "--decompress", "host")
    assert status == STUB_STATUS, stderr[-2000:]
    notices = [x for x in vmm_lines(stderr) if "cannot decompress" in x]
    assert len(notices) == 1 and "the kernel's own decompressor runs in the guest" in notices[0]
    d = doc["kernel"]["decompress"]
    assert (d["requested"], d["where"]) == ("host", "guest")
    assert d["fallback"] and d["fallback"] in notices[0]
    assert "Traceback" not in stderr
    jsonschema.validate(doc, SCHEMA)
    assert not cache_path(image).exists()  # only a bootable vmlinux is kept


@needs_unicorn
def test_missing_decoder_package_is_named(bootcheck_elf: bytes, tmp_path: Path) -> None:
    """zstd needs the zstandard package (Python 3.11 has no compression.zstd): without it the
    guest decompresses, and the notice names the package to install."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "zstandard.py").write_text('raise ImportError("hidden by the test")\n')
    kernel = write(tmp_path / "bz",
                   uncached(bzimage_around(kernel_payload("zstd", bootcheck_elf))))
    path = os.pathsep.join(p for p in (str(hide), os.environ.get("PYTHONPATH", "")) if p)
    status, doc, stderr = boot(kernel, "--decompress", "host", env={"PYTHONPATH": path})
    assert status == STUB_STATUS, stderr[-2000:]
    notices = [x for x in vmm_lines(stderr) if "cannot decompress" in x]
    assert len(notices) == 1 and "pip install zstandard" in notices[0], notices
    assert "pip install zstandard" in doc["kernel"]["decompress"]["fallback"]


@needs_unicorn
def test_quiet_prints_no_notice(tmp_path: Path) -> None:
    kernel = write(tmp_path / "bz", bzimage_around(b"\x42\x5a\x00garbage" * 40))
    p = run_cli("boot", "--backend", "emulate", "--quiet", "--decompress", "host", str(kernel))
    assert p.returncode == STUB_STATUS
    assert "cannot decompress" not in p.stderr


# --- the cache ---------------------------------------------------------------------------------


@pytest.fixture
def unique_bzimage(bootcheck_elf: bytes, tmp_path: Path) -> Iterator[Path]:
    """A bzImage no cache has seen, whose cache entry is removed afterwards. The real cache is
    used: pointing VMMARCH_CACHE elsewhere would make the emulate backend build its CPU engine
    again."""
    image = uncached(bzimage_around(kernel_payload("bzip2", bootcheck_elf)))
    kernel = write(tmp_path / "bz", image)
    yield kernel
    cache_path(image).unlink(missing_ok=True)


@needs_unicorn
def test_second_boot_does_not_decompress(unique_bzimage: Path) -> None:
    status, first, _ = boot(unique_bzimage, "--decompress", "host")
    assert status == 0
    cached = Path(first["kernel"]["decompress"]["vmlinux"])
    assert cached == cache_path(unique_bzimage.read_bytes())
    assert first["kernel"]["decompress"]["cached"] is False
    before = cached.stat().st_mtime_ns
    status, second, _ = boot(unique_bzimage, "--decompress", "host")
    assert status == 0
    assert second["kernel"]["decompress"]["cached"] is True
    assert second["kernel"]["decompress"]["seconds"] == 0
    assert cached.stat().st_mtime_ns == before
    # A damaged cache file is decompressed again, not booted and not an error.
    cached.write_bytes(cached.read_bytes()[:100])
    status, third, _ = boot(unique_bzimage, "--decompress", "host")
    assert status == 0
    assert third["kernel"]["decompress"]["cached"] is False
    assert cached.stat().st_size > 100


def test_unwritable_cache_boots_from_memory(bootcheck_elf: bytes, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    monkeypatch.setenv("VMMARCH_CACHE", str(blocker))
    kernel = write(tmp_path / "bz", bzimage_around(kernel_payload("lzma", bootcheck_elf)))
    memory = MmapGuestMemory([(0, 64 << 20)])
    try:
        image = loader.load_kernel(kernel, memory, machine.choose_decompression(
            Decompress.HOST, "emulate", lambda: False))
        d = image.decompression
        assert d is not None and d.where is Decompress.HOST and not d.vmlinux
        assert "cannot write" in d.note and "VMMARCH_CACHE" in d.note
        # The first PT_LOAD of the guest is in guest memory at its p_paddr.
        (phoff,) = struct.unpack_from("<Q", bootcheck_elf, 0x20)  # e_phoff
        (offset,) = struct.unpack_from("<Q", bootcheck_elf, phoff + 8)  # phdr[0].p_offset
        assert memory.read(VMLINUX_ENTRY, 64) == bootcheck_elf[offset : offset + 64]
    finally:
        memory.close()


# --- the policy ----------------------------------------------------------------------------


def test_auto_policy() -> None:
    def never() -> bool:
        raise AssertionError("the host's ring 0 was asked about although it did not matter")

    choose = machine.choose_decompression
    assert choose(Decompress.AUTO, "emulate", lambda: False).where is Decompress.HOST
    assert choose(Decompress.AUTO, "kvm", lambda: False).where is Decompress.HOST
    assert choose(Decompress.AUTO, "kvm", lambda: True).where is Decompress.GUEST
    for given in (Decompress.HOST, Decompress.GUEST):
        for backend in ("kvm", "emulate"):
            plan = choose(given, backend, never)
            assert (plan.where, plan.why) == (given, f"--decompress {given}")
    assert "ring 0 in software" in choose(Decompress.AUTO, "kvm", lambda: False).why
    assert "on hardware" in choose(Decompress.AUTO, "kvm", lambda: True).why
    # What prepare asks: the registry, without opening a backend.
    assert backends.runs_ring0_in_hardware("emulate") is False


# --- bad input ---------------------------------------------------------------------------------


@needs_unicorn
@pytest.mark.parametrize("keep", [600, 1024 + 0x300, -100])
def test_truncated_bzimage_is_one_line_65(keep: int, bootcheck_elf: bytes,
                                          tmp_path: Path) -> None:
    """Cut inside the setup sectors, inside the protected-mode code, inside the payload."""
    image = bzimage_around(kernel_payload("xz", bootcheck_elf))
    kernel = write(tmp_path / "cut", image[:keep])
    p = run_cli("boot", "--backend", "emulate", "--decompress", "host", str(kernel))
    assert p.returncode == 65, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("vmm-arch: error: "), p.stderr
    assert "truncated" in lines[0]


@needs_unicorn
def test_host_path_needs_only_the_vmlinuxs_memory(bootcheck_elf: bytes, tmp_path: Path) -> None:
    """The guest's decompressor needs pref_address + init_size (here 16 + 64 MiB); the host path
    only the vmlinux's segments."""
    image = bzimage_around(kernel_payload("gzip", bootcheck_elf), init_size=64 << 20)
    kernel = write(tmp_path / "bz", image)
    p = run_cli("boot", "--backend", "emulate", "--mem", "48M", "--decompress", "guest",
                str(kernel))
    assert p.returncode == 65 and f"needs RAM up to {PREF_ADDRESS + (64 << 20):#x}" in p.stderr
    status, _, stderr = boot(kernel, "--mem", "48M", "--decompress", "host")
    assert status == 0, stderr[-2000:]


# --- inspect -------------------------------------------------------------------------------


@needs_unicorn
def test_inspect_says_what_boot_would_do(bootcheck_elf: bytes, tmp_path: Path) -> None:
    kernel = write(tmp_path / "bz", bzimage_around(kernel_payload("lzo", bootcheck_elf)))

    def inspect(*args: str) -> dict:  # type: ignore[type-arg]
        p = run_cli("inspect", str(kernel), "--json", "--backend", "emulate", *args)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)  # type: ignore[no-any-return]

    host = inspect()
    assert (host["entry_64bit"], host["picked_entry"]) == (f"{BZIMAGE_ENTRY:#x}", "0x1000000")
    assert host["payload_compression"] == "lzo"
    assert host["decompress"]["where"] == "host" and host["decompress"]["vmlinux"]
    assert "lzo payload decompressed on the host (auto: " in host["decompress"]["summary"]
    guest = inspect("--decompress", "guest")
    assert guest["picked_entry"] == f"{BZIMAGE_ENTRY:#x}"
    assert guest["decompress"]["where"] == "guest"
    write(kernel, bzimage_around(b"\x42\x5a\x00garbage" * 40))
    fallback = inspect()
    assert fallback["decompress"]["where"] == "guest" and fallback["decompress"]["fallback"]
    text = run_cli("inspect", str(kernel), "--backend", "emulate").stdout
    assert "decompression (--backend emulate --decompress auto)" in text


@needs_unicorn
def test_an_image_without_a_payload_boots_its_own_code(tmp_path: Path) -> None:
    """Issue 17: payload_offset and payload_length 0 make a valid 64-bit boot-protocol image
    that is simply not a compressed Linux. Only extracting a vmlinux needs them: inspect says
    the host cannot, and boot runs the image's own entry (the stub's status)."""
    image = bytearray(bzimage_around(b""))
    boot_params.put(image, "payload_offset", 0)
    boot_params.put(image, "payload_length", 0)
    kernel = write(tmp_path / "bz", bytes(image))
    status, doc, err = boot(kernel)
    assert status == STUB_STATUS, err
    assert doc["kernel"]["decompress"]["where"] == "guest"
    p = run_cli("inspect", "--json", "--backend", "emulate", str(kernel))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["format"] == "bzimage"
