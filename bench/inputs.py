"""Inputs shared by every case, prepared once per ``python -m bench`` and cached here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import peers

REPO = Path(__file__).resolve().parents[1]
WORK_DIR = REPO / "build" / "bench"
GUEST_DIR = REPO / "build" / "guests"

Progress = Callable[[str], None]


def vmm_arch_argv(*args: str) -> list[str]:
    """vmm-arch as a fresh process (``python -m vmmarch_cli``, what the ``vmm-arch`` script
    runs), with this interpreter."""
    return [sys.executable, "-m", "vmmarch_cli", *args]


#: A unicorn library for vmm-arch's emulate backend to run on instead of its engine
#: (``--libunicorn``; None: the backend's own choice, docs/backends.md "The CPU engine").
#: The backend loads ``$LIBUNICORN_PATH/libunicorn.so.2`` when that is set.
LIBUNICORN: Path | None = None
LIBUNICORN_NAME = "libunicorn.so.2"


def libunicorn_env(lib_dir: Path | None) -> dict[str, str]:
    """This environment with unicorn's library set to ``lib_dir``'s (None: the backend's own
    choice), never inherited by accident."""
    env = {k: v for k, v in os.environ.items() if k != "LIBUNICORN_PATH"}
    if lib_dir is not None:
        env["LIBUNICORN_PATH"] = str(lib_dir)
    return env


def vmm_arch_env() -> dict[str, str]:
    """The environment for vmm-arch processes: this checkout first on the import path, and
    the unicorn library chosen with ``--libunicorn``."""
    path = os.environ.get("PYTHONPATH", "")
    env = libunicorn_env(LIBUNICORN)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    return env


def engine_choice() -> str:
    """Which unicorn library vmm-arch's emulate backend loads in the benchmarked processes
    (their environment: ``VMMARCH_ENGINE``, ``--libunicorn``). Loading it also builds the
    engine if it is not built yet, so no timed run pays for that build."""
    code = ("import json; from vmmarch_cli.backends.emulate import library; c = library.load(); "
            "print(json.dumps({'kind': str(c.kind), 'library': c.library, 'reason': c.reason}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=vmm_arch_env(), cwd=REPO, check=False)
    if done.returncode != 0:
        return f"unknown ({(done.stderr.strip().splitlines() or ['no output'])[-1]})"
    choice = json.loads(done.stdout.strip().splitlines()[-1])
    why = f", {choice['reason']}" if choice["reason"] else ""
    return f"{choice['kind']} ({choice['library']}{why})"


def byte_compile() -> None:
    """Byte-compile vmm-arch's modules, as pip does for a package it installs. An editable
    checkout under PYTHONDONTWRITEBYTECODE=1 (as on the development machines) never gets
    .pyc files, and every vmm-arch process then compiles its ~60 modules from source: 40 ms
    of each start, measured with cProfile. The .pyc files are read even with that set."""
    import compileall

    for package in ("vmmarch_cli", "backends"):
        compileall.compile_dir(REPO / package, quiet=1)


def guest(name: str) -> Path:
    """One of the project's guests (``examples/guests/<name>.S``), built if needed."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from examples.build import build_guest

    return build_guest(name, GUEST_DIR)


@dataclass(frozen=True)
class Stock:
    """Debian's cloud kernel (ELF and bzImage) and the marker initramfs."""

    vmlinux: Path
    bzimage: Path
    initrd: Path
    version: str


@dataclass(frozen=True)
class VmmArchPlan:
    """What vmm-arch would do by default for a kernel (``dump-regs --json``)."""

    cmdline: str
    cpu_mask: tuple[str, ...]
    protocol: str


def vmm_arch_plan(kernel: Path) -> VmmArchPlan:
    done = subprocess.run(vmm_arch_argv("dump-regs", str(kernel), "--json"),
                          capture_output=True, text=True, env=vmm_arch_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"vmm-arch dump-regs {kernel} failed: {done.stderr.strip()}")
    doc = json.loads(done.stdout)
    kernel_doc = doc.get("kernel", {})
    protocol = str(kernel_doc.get("boot_protocol", "")) if isinstance(kernel_doc, dict) else ""
    mask = doc.get("cpu_mask", [])
    if isinstance(mask, str):
        mask = [m for m in mask.split(",") if m]
    return VmmArchPlan(str(doc["cmdline"]), tuple(mask), protocol)


@dataclass
class Inputs:
    """Lazily prepared inputs; each is made at most once."""

    progress: Progress
    want_peer: bool = True
    install_peer: bool = True  # apt-get install qemu-system-x86 if missing (root only)
    _qemu: peers.Qemu | None = None
    _qemu_error: str = ""
    _stock: Stock | None = None
    _plans: dict[Path, VmmArchPlan] = field(default_factory=dict)

    def qemu(self) -> peers.Qemu | None:
        """QEMU, installed if needed; None (with ``qemu_error`` set) when unavailable."""
        if self._qemu is None and not self._qemu_error:
            if not self.want_peer:
                self._qemu_error = "the peer was turned off (--no-peer)"
                return None
            try:
                self._qemu = peers.find_qemu(install=self.install_peer)
            except peers.PeerUnavailable as e:
                self._qemu_error = str(e)
                self.progress(f"peer unavailable: {e}")
        return self._qemu

    @property
    def qemu_error(self) -> str:
        return self._qemu_error

    def tiny_bios(self) -> Path:
        return peers.write_tiny_bios(WORK_DIR / "tiny-bios.bin")

    def host_cpu(self, qemu: peers.Qemu, mask: tuple[str, ...] = ()) -> str:
        """``-cpu`` for QEMU under KVM: ``host`` minus ``mask``, plus what this KVM needs."""
        cpu, _missing = peers.cpu_option(qemu.path, mask)
        extras = peers.host_cpu_extras(qemu.path, self.tiny_bios())
        return ",".join([cpu, *extras])

    def stock(self) -> Stock:
        if self._stock is None:
            from vmmarch_cli import assets

            self.progress("preparing the Debian cloud kernel and the marker initramfs")
            kernel = assets.fetch_debian_kernel("cloud", progress=self.progress)
            initrd = assets.stock_initramfs(progress=self.progress)
            self._stock = Stock(kernel.vmlinux, kernel.bzimage, initrd, kernel.version)
        return self._stock

    def plan(self, kernel: Path) -> VmmArchPlan:
        if kernel not in self._plans:
            self._plans[kernel] = vmm_arch_plan(kernel)
        return self._plans[kernel]
