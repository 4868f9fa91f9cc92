"""Fetch the real test inputs (a Debian kernel, a static busybox) with apt, into a private cache.

Nothing is installed: packages are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` under ``cache_dir()``, never into /boot. Every step checks whether its result is
already in the cache, so a second call only asks apt-cache which version is current. Results
appear atomically (written under a temporary name, then renamed), so an interrupted or concurrent
run never leaves a half-written file where a later run would trust it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmmarch_cli import files
from vmmarch_cli.errors import EX_UNAVAILABLE, BadInputError, VmmArchError
from vmmarch_cli.files import cache_dir
from vmmarch_cli.initramfs import busybox_initramfs, marker_init_script

Progress = Callable[[str], None]

# The flavours of Debian's linux-image-<abi>[-<flavour>]-amd64 packages we know how to boot.
# "generic" is Debian's unnamed default flavour: linux-image-amd64 / linux-image-<abi>-amd64.
FLAVOURS = ("cloud", "generic")
# Package of the statically linked busybox, and where it puts the binary.
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATH = Path("bin/busybox")
DEFAULT_MARKER = "VMM-INIT-REACHED"
# Hex digits of the SHA-256 kept in a cached initramfs's name: 64 bits, plenty to tell apart the
# handful of variants one cache holds.
_HASH_DIGITS = 16

# apt's messages are translated; the parsers below read the C locale's.
_C_LOCALE = {"LC_ALL": "C"}


class AssetError(VmmArchError):
    """A test input could not be fetched or stored (no apt, no network, cache not writable)."""

    exit_status = EX_UNAVAILABLE


@dataclass(frozen=True)
class KernelAssets:
    """A Debian kernel unpacked in the cache; ``version`` is its release (``uname -r``)."""

    bzimage: Path
    vmlinux: Path
    config: Path
    version: str


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


#: strerror(ENOSPC) as apt-get and dpkg-deb print it (they run in the C locale, below).
NO_SPACE = os.strerror(errno.ENOSPC)


def _run(argv: Sequence[str], *, cwd: Path | None = None, hint: str) -> str:
    """Run ``argv`` (no shell) and return its stdout; failures become one-line AssetErrors."""
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **_C_LOCALE},
        )
    except FileNotFoundError:
        raise AssetError(
            f"{argv[0]} not found: fetching test kernels needs a Debian-like host with apt and dpkg"
        ) from None
    except subprocess.CalledProcessError as exc:
        output = exc.stderr or exc.stdout or ""
        if NO_SPACE in output:
            # The tool's own advice ("damaged .deb", "network") would mislead: say what to do.
            raise AssetError(
                f"{argv[0]} ran out of space: {_last_line(output)}; free some space (the cache "
                f"is {cache_dir()}, set VMMARCH_CACHE to move it; temporary files go to "
                f"{tempfile.gettempdir()}, set TMPDIR)"
            ) from None
        raise AssetError(f"{' '.join(argv)} failed: {_last_line(output)}; {hint}") from None
    except OSError as exc:
        raise AssetError(f"cannot run {argv[0]}: {exc.strerror}") from None
    return done.stdout


def _cache_error(path: Path, exc: OSError) -> AssetError:
    return AssetError(f"cannot write {path}: {exc.strerror}; {files.advice(exc)} "
                      "(the cache is $VMMARCH_CACHE)")


def _subdir(name: str) -> Path:
    path = cache_dir() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_error(path, exc) from None
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        files.write_atomic(path, data)
    except OSError as exc:
        raise _cache_error(path, exc) from None


#: What apt's answers to a query depend on: its package lists (rewritten by apt-get update) and
#: its configuration (sources, pinning).
APT_STATE = (Path("/var/lib/apt/lists"), Path("/etc/apt"))
_APT_ANSWERS = "apt-answers.json"


def _apt_state() -> str:
    """A digest of every file under APT_STATE (name, size, mtime) and of the apt programs on
    PATH: equal digests, equal answers. Walking ~30 files takes about a millisecond."""
    digest = hashlib.sha256()
    for tool in ("apt-cache", "apt-get"):
        digest.update(f"{shutil.which(tool)}\n".encode())
    for top in APT_STATE:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d != "partial")
            for name in sorted(filenames):
                if name == "lock":
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _apt_query(argv: Sequence[str], hint: str) -> str:
    """``_run`` for a read-only apt query, answered from the cache while apt's lists and
    configuration are as they were when apt answered (each query costs 0.3-0.5 s here, and a
    ``stock`` run makes four: half the README's first command, measured)."""
    path = cache_dir() / _APT_ANSWERS
    state = _apt_state()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    if not isinstance(doc, dict) or doc.get("state") != state:
        doc = {"state": state, "answers": {}}
    key = " ".join(argv)
    answer = doc["answers"].get(key)
    if isinstance(answer, str):
        return answer
    answer = _run(argv, hint=hint)
    doc["answers"][key] = answer
    # An unwritable cache costs the next run the query again, nothing else.
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, json.dumps(doc).encode())
    return answer


def _forget_apt_answers() -> None:
    """After our own apt-get update (whose lists may keep their mtimes when nothing changed)."""
    with contextlib.suppress(OSError):
        (cache_dir() / _APT_ANSWERS).unlink(missing_ok=True)


def _depends(meta: str) -> list[str]:
    """The packages ``meta`` depends on, per apt-cache; empty when apt knows no candidate."""
    try:
        out = _apt_query(["apt-cache", "depends", meta], hint="is apt configured?")
    except AssetError as exc:
        # "E: No packages found" (status 100) means the package lists are empty or stale.
        if "No packages found" in str(exc):
            return []
        raise
    return re.findall(r"^\s*\|?Depends:\s*(\S+)\s*$", out, flags=re.MULTILINE)


def _has_candidate(package: str) -> bool:
    """Whether apt-cache knows a version of ``package`` that apt-get could download."""
    out = _apt_query(["apt-cache", "policy", package], hint="is apt configured?")
    # apt-cache policy prints "  Candidate: 1:1.35.0-4+deb12u1+b1", or "(none)", or nothing at
    # all for a package missing from the lists.
    match = re.search(r"^\s*Candidate:\s*(\S+)", out, flags=re.MULTILINE)
    return match is not None and match.group(1) != "(none)"


def _apt_get_update(package: str, progress: Progress | None) -> None:
    _say(progress, f"apt-cache knows no candidate for {package}: running apt-get update")
    _forget_apt_answers()
    _run(
        ["apt-get", "update"],
        hint="run it as root (sudo apt-get update) and check network access to the mirror",
    )
    _forget_apt_answers()


def _no_package(package: str) -> AssetError:
    return AssetError(
        f"apt knows no package {package} even after apt-get update; add a Debian bookworm (main) "
        "source to the apt sources"
    )


def _resolve(meta: str, wanted: re.Pattern[str], progress: Progress | None) -> str:
    """The package ``meta`` currently depends on that matches ``wanted``; apt-get update once."""
    for attempt in range(2):
        found = [name for name in _depends(meta) if wanted.fullmatch(name)]
        if found:
            return found[0]
        if attempt == 0:
            _apt_get_update(meta, progress)
    raise _no_package(meta)


def _ensure_candidate(package: str, progress: Progress | None) -> None:
    """Run apt-get update once if apt-cache has no downloadable version of ``package``."""
    if not _has_candidate(package):
        _apt_get_update(package, progress)
        if not _has_candidate(package):
            raise _no_package(package)


def _deb_filename(package: str) -> str:
    """The file name ``apt-get download`` would write (name_version_arch.deb), without fetching."""
    out = _apt_query(
        ["apt-get", "download", "--print-uris", package],
        hint="run apt-get update and check the apt sources",
    )
    # Each line is: 'URI' FILENAME SIZE HASH (apt-get(8), --print-uris).
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].endswith(".deb"):
            return fields[1]
    raise AssetError(f"apt-get download --print-uris {package} named no .deb; run apt-get update")


def _unpacked(package: str, progress: Progress | None) -> Path:
    """Download ``package``'s current .deb (once) and unpack it (once); the root of its files."""
    debs = _subdir("debs")
    roots = _subdir("pkgs")
    filename = _deb_filename(package)
    root = roots / filename.removesuffix(".deb")
    if root.is_dir():
        return root
    deb = debs / filename
    if not deb.is_file():
        _say(progress, f"downloading {package} with apt-get into {debs}")
        try:
            workdir = Path(tempfile.mkdtemp(dir=debs, prefix=".download-"))
        except OSError as exc:
            raise _cache_error(debs, exc) from None
        try:
            # apt-get download writes into its working directory. A private one, renamed from
            # afterwards, keeps a half-downloaded file out of the cache. As root apt warns that
            # the download runs unsandboxed (the _apt user cannot enter this 0700 directory).
            _run(
                ["apt-get", "download", package],
                cwd=workdir,
                hint="check network access to the Debian mirror",
            )
            fetched = workdir / filename
            if not fetched.is_file():
                raise AssetError(f"apt-get download {package} did not write {filename}")
            os.replace(fetched, deb)
        except OSError as exc:
            raise _cache_error(deb, exc) from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    _say(progress, f"unpacking {deb.name} into {roots}")
    try:
        staging = Path(tempfile.mkdtemp(dir=roots, prefix=".unpack-"))
    except OSError as exc:
        raise _cache_error(roots, exc) from None
    try:
        _run(
            ["dpkg-deb", "-x", str(deb), str(staging)],
            hint=f"the .deb may be damaged: delete {deb} and retry",
        )
        try:
            staging.rename(root)
        except OSError:
            # A concurrent run finished first; its copy is as good as ours.
            if not root.is_dir():
                raise
    except OSError as exc:
        raise _cache_error(root, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _kernel_packages(flavour: str) -> tuple[str, re.Pattern[str]]:
    if flavour not in FLAVOURS:
        raise BadInputError(
            f"unknown kernel flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}"
        )
    suffix = "-amd64" if flavour == "generic" else f"-{flavour}-amd64"
    # Debian's ABI names look like 6.1.0-56: linux-image-6.1.0-56-cloud-amd64.
    return f"linux-image{suffix}", re.compile(rf"linux-image-\d[\w.]*-\d+{re.escape(suffix)}")


def fetch_debian_kernel(flavour: str = "cloud", progress: Progress | None = None) -> KernelAssets:
    """Fetch Debian's current ``flavour`` kernel into the cache and extract its vmlinux."""
    meta, wanted = _kernel_packages(flavour)
    _say(progress, f"resolving {meta}")
    package = _resolve(meta, wanted, progress)
    release = package.removeprefix("linux-image-")
    root = _unpacked(package, progress)
    boot = root / "boot"
    bzimage = boot / f"vmlinuz-{release}"
    config = boot / f"config-{release}"
    for path in (bzimage, config):
        if not path.is_file():
            raise AssetError(f"{package} has no {path.relative_to(root)}; delete {root} and retry")
    vmlinux = boot / f"vmlinux-{release}"
    if not vmlinux.is_file():
        # Here, not at the top: ``run`` imports this module for busybox alone.
        from vmmarch_cli.loader.bzimage_payload import extract_vmlinux

        _say(progress, f"extracting {vmlinux.name} from {bzimage.name}")
        _write_atomic(vmlinux, extract_vmlinux(bzimage.read_bytes()))
    return KernelAssets(bzimage=bzimage, vmlinux=vmlinux, config=config, version=release)


def fetch_busybox(progress: Progress | None = None) -> Path:
    """Fetch Debian's busybox-static into the cache; the path of its static binary."""
    _say(progress, f"resolving {BUSYBOX_PACKAGE}")
    _ensure_candidate(BUSYBOX_PACKAGE, progress)
    busybox = _unpacked(BUSYBOX_PACKAGE, progress) / BUSYBOX_PATH
    if not busybox.is_file():
        root = busybox.parents[len(BUSYBOX_PATH.parts) - 1]
        raise AssetError(f"{BUSYBOX_PACKAGE} has no {BUSYBOX_PATH}; delete {root} and retry")
    return busybox


def stock_initramfs(
    marker: str = DEFAULT_MARKER,
    progress: Progress | None = None,
    busybox: Path | None = None,
) -> Path:
    """The busybox initramfs whose /init is ``marker_init_script(marker)``, cached by content.

    ``busybox`` defaults to ``fetch_busybox()``; pass its result when you already have it.
    """
    if busybox is None:
        busybox = fetch_busybox(progress)
    # Uncompressed: the kernel would inflate a gzip'ed archive in ring 0, which a KVM that
    # emulates ring 0 runs for minutes; 2 MiB of plain cpio costs a copy.
    image = busybox_initramfs(busybox, marker_init_script(marker), compress=False)
    # Equal inputs give equal bytes (the archive carries no timestamps), so the content hash
    # names the image and an existing file is never rewritten.
    digest = hashlib.sha256(image).hexdigest()[:_HASH_DIGITS]
    path = _subdir("initramfs") / f"initramfs-{digest}.cpio"
    if not path.is_file():
        _say(progress, f"writing {path}")
        _write_atomic(path, image)
    return path
