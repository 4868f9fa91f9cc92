"""A bzImage's vmlinux decompressed by vmm-arch instead of by the kernel's own decompressor.

A bzImage's protected-mode code is the kernel's decompressor (arch/x86/boot/compressed): entered
at load + 0x200, it inflates the payload, applies the relocations of a randomized placement and
jumps to the vmlinux's startup_64. On a CPU that emulates the guest's ring 0 (the emulate
backend, a KVM without VMX/SVM) every instruction of that costs what a whole boot phase costs
on hardware, so vmm-arch can do the inflating itself: it extracts the ELF vmlinux from the
payload (``bzimage_payload.extract_vmlinux``), keeps it in the cache under the bzImage's SHA-256
(a second boot of the same bytes decompresses nothing), and boots it through the 64-bit Linux
boot protocol with the bzImage's own setup header in boot_params. What the guest then sees
differently (no KASLR, the load address) is in docs/decompression.md.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from vmmarch_cli import files
from vmmarch_cli.errors import BadInputError

# Every boot imports this module (the Decompress setting); only a bzImage needs the
# decompressors (bz2, lzma, zlib, lz4) and hashlib: they are imported where they are used.

#: Under ``files.cache_dir()``: one ``<sha256 of the bzImage>.elf`` per image.
CACHE_SUBDIR = "vmlinux"

#: A vmlinux opened for reading: the cache file, or the bytes just decompressed.
VmlinuxFile = io.BufferedReader | io.BytesIO
T = TypeVar("T")


class Decompress(StrEnum):
    """Where a bzImage's payload is decompressed (``--decompress``)."""

    HOST = "host"  # by vmm-arch before the boot; the guest starts in the vmlinux
    GUEST = "guest"  # by the kernel's own decompressor, at the bzImage's 64-bit entry
    AUTO = "auto"  # host where the guest's ring 0 is emulated, guest where it runs on hardware


@dataclass(frozen=True)
class Decompression:
    """Where one boot's bzImage payload was decompressed, and why: the plan a boot starts with
    (``requested``, ``where``, ``why``), completed by the loader with what happened."""

    requested: Decompress
    where: Decompress  # HOST or GUEST
    why: str  # the reason for ``where`` before loading ("--decompress host", "auto: ...")
    compression: str = ""  # the payload's format, where the loader read it
    cached: bool = False  # host: the vmlinux came from the cache (nothing was decompressed)
    seconds: float = 0.0  # host: time spent decompressing now
    vmlinux: str = ""  # host: the cached ELF ("" when the cache could not take it)
    note: str = ""  # host: why the cache could not take it
    fallback: str = ""  # where == GUEST although HOST was planned: why the host could not

    def describe(self) -> str:
        """For the line ``boot`` prints: which side decompressed the payload, and why."""
        if self.where is Decompress.HOST:
            how = "from the cache" if self.cached else f"in {self.seconds:.2f} s"
            if self.note:
                how += f", not cached: {self.note}"
            return f"{self.compression} payload decompressed on the host ({self.why}; {how})"
        if self.fallback:
            return "payload decompressed by the guest's own decompressor (the host could not)"
        return f"payload decompressed by the guest's own decompressor ({self.why})"

    def as_json(self) -> dict[str, object]:
        return {"requested": str(self.requested), "where": str(self.where), "why": self.why,
                "compression": self.compression or None, "cached": self.cached,
                "seconds": round(self.seconds, 6), "vmlinux": self.vmlinux or None,
                "note": self.note or None, "fallback": self.fallback or None}


@dataclass(frozen=True)
class HostVmlinux:
    """The ELF vmlinux of a bzImage: a file in the cache, and its bytes when it was decompressed
    now (loaded from memory, not read back; the only copy when the cache refused it)."""

    compression: str
    cached: bool  # found in the cache
    seconds: float  # decompressing it took this long now (0.0 when cached)
    path: Path | None  # the cache file
    data: bytes = b""  # decompressed now
    note: str = ""  # why path is None

    def open(self) -> VmlinuxFile:
        if self.data or self.path is None:
            return io.BytesIO(self.data)
        return self.path.open("rb")


class HostCannotDecompress(BadInputError):
    """The payload is in no format decoded here, a decoder's package is missing, or the stream
    is damaged: the guest's own decompressor gets its turn instead."""


def cache_path(image: bytes) -> Path:
    """Where the vmlinux of ``image`` (the whole bzImage file) is cached."""
    import hashlib

    return files.cache_dir() / CACHE_SUBDIR / f"{hashlib.sha256(image).hexdigest()}.elf"


def host_vmlinux(image: bytes, parse: Callable[[VmlinuxFile], T]) -> tuple[HostVmlinux, T]:
    """The vmlinux of ``image`` (the bytes of a bzImage whose header the loader validated) and
    what ``parse`` makes of it, from the cache, else decompressed now and cached. ``parse``
    raises BadInputError for bytes that are no bootable ELF: a cache file it refuses (damaged)
    is decompressed again, and a fresh vmlinux it refuses is never cached. Raises
    HostCannotDecompress when the payload cannot be decoded here, or not to such an ELF.
    """
    from vmmarch_cli.loader.bzimage_payload import extract_vmlinux, payload_of
    from vmmarch_cli.loader.decompress import detect

    try:
        compression = detect(payload_of(image))
    except BadInputError as exc:
        raise HostCannotDecompress(str(exc)) from None
    path = cache_path(image)
    if path.is_file():
        try:
            with path.open("rb") as f:
                return HostVmlinux(compression, cached=True, seconds=0.0, path=path), parse(f)
        except (BadInputError, OSError):
            with contextlib.suppress(OSError):  # a damaged cache file: decompress again
                path.unlink()
    start = time.monotonic()
    try:
        data = extract_vmlinux(image)
        parsed = parse(io.BytesIO(data))
    except BadInputError as exc:
        raise HostCannotDecompress(str(exc)) from None
    seconds = time.monotonic() - start
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, data)
    except OSError as exc:
        # The boot goes on from memory; the next one decompresses again.
        note = f"cannot write {path}: {exc.strerror}; {files.advice(exc)} (set VMMARCH_CACHE)"
        return HostVmlinux(compression, cached=False, seconds=seconds, path=None, data=data,
                           note=note), parsed
    return HostVmlinux(compression, cached=False, seconds=seconds, path=path, data=data), parsed
