"""The peer VMM: QEMU from Debian's ``qemu-system-x86`` package, and its command lines."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bench import harness

QEMU = "qemu-system-x86_64"
DEBIAN_PACKAGE = "qemu-system-x86"
#: What every QEMU run here needs: no default devices or config files, no display, the first
#: UART on our stdout, and exit instead of reset (a reset would boot the kernel again).
COMMON = ("-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
          "-no-reboot")
#: microvm as the reference measured it: no option ROMs, the ISA UART at 0x3f8.
MICROVM = "microvm,x-option-roms=off,isa-serial=on"
#: QEMU prints this (stderr) when KVM_RUN returns KVM_EXIT_INTERNAL_ERROR, then pauses.
KVM_INTERNAL_ERROR = r"KVM internal error"


class PeerUnavailable(Exception):
    """QEMU is not installed and could not be installed; the message says what to do."""


@dataclass(frozen=True)
class Qemu:
    path: str
    version: str


def find_qemu(install: bool = True) -> Qemu:
    """``qemu-system-x86_64`` on PATH; else ``apt-get install`` it when root (and ``install``)."""
    path = shutil.which(QEMU)
    if path is None and install:
        if os.geteuid() != 0:
            raise PeerUnavailable(
                f"{QEMU} is not installed and this is not root: run "
                f"`sudo apt-get install -y {DEBIAN_PACKAGE}` (or benchmark vmm-arch alone "
                "with --no-peer)"
            )
        if shutil.which("apt-get") is None:
            raise PeerUnavailable(f"{QEMU} is not installed and there is no apt-get here")
        _apt_install(DEBIAN_PACKAGE)
        path = shutil.which(QEMU)
    if path is None:
        raise PeerUnavailable(f"{QEMU} is not installed (Debian package {DEBIAN_PACKAGE})")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return Qemu(path, (out.stdout.splitlines() or ["unknown"])[0])


def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    argv = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(argv, env=env, capture_output=True, check=False).returncode == 0:
        return
    # A fresh container often has no package lists yet.
    subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerUnavailable(f"`{' '.join(argv)}` failed: {last}")


@cache
def cpu_flags(qemu: str) -> frozenset[str]:
    """The CPUID flag names this QEMU recognises (``-cpu help``)."""
    out = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, check=False)
    _, _, flags = out.stdout.partition("Recognized CPUID flags:")
    return frozenset(flags.split())


def qemu_feature(linux_name: str) -> str:
    """Linux's /proc/cpuinfo name -> QEMU's: sse4_2 -> sse4.2, sha_ni -> sha-ni."""
    if linux_name.startswith("sse4_"):
        return linux_name.replace("_", ".")
    return linux_name.replace("_", "-")


def cpu_option(qemu: str, mask: Iterable[str]) -> tuple[str, list[str]]:
    """``host,-f1,-f2...`` hiding ``mask`` as vmm-arch does; also the names QEMU lacks.

    ``osxsave`` is not a QEMU flag: it mirrors CR4.OSXSAVE and goes away with ``xsave``.
    """
    known = cpu_flags(qemu)
    names = sorted({qemu_feature(m) for m in mask})
    off = [n for n in names if n in known]
    return ",".join(["host", *(f"-{n}" for n in off)]), [n for n in names if n not in known]


def direct_boot(
    qemu: str,
    *,
    machine: str,
    kernel: Path,
    initrd: Path | None,
    append: str,
    accel: str = "kvm",
    cpu: str = "host",
    mem_mib: int = 256,
    cpus: int = 1,
) -> list[str]:
    """QEMU loading ``kernel`` itself: an ELF with a PVH note through PVH, a bzImage through
    its setup code (with firmware: qboot on microvm, SeaBIOS on pc)."""
    argv = [qemu, "-accel", accel, "-cpu", cpu, "-m", str(mem_mib), "-smp", str(cpus), *COMMON,
            "-M", machine,
            "-kernel", str(kernel), "-append", append]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    return argv


def tiny_guest(qemu: str, bios: Path, *, cpu: str = "host", mem_mib: int = 256) -> list[str]:
    """QEMU running ``bios`` (see ``write_tiny_bios``) on microvm under KVM."""
    return [qemu, "-accel", "kvm", "-cpu", cpu, "-m", str(mem_mib), *COMMON,
            "-M", f"{MICROVM},rtc=off", "-bios", str(bios)]


#: 16-bit code at the reset vector (CS base 0xffff0000, IP 0xfff0; SDM vol. 3A 9.1.4):
#: cli; mov dx, 0x3f8; mov al, 'Q'; out dx, al; mov al, 10; out dx, al; 1: hlt; jmp 1b
TINY_RESET_CODE = bytes.fromhex("fa baf803 b051 ee b00a ee f4 ebfd".replace(" ", ""))
TINY_BIOS_SIZE = 64 * 1024  # QEMU wants a firmware image of whole 64 KiB blocks
TINY_BANNER = r"^Q\r?$"


def write_tiny_bios(path: Path) -> Path:
    """A 64 KiB firmware image whose first instructions print ``Q`` on COM1 and halt."""
    image = bytearray(TINY_BIOS_SIZE)
    image[0xFFF0 : 0xFFF0 + len(TINY_RESET_CODE)] = TINY_RESET_CODE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_bytes() != image:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(bytes(image))
        tmp.replace(path)
    return path


#: QEMU's error when KVM refuses an MSR value it writes at vCPU reset (seen for
#: IA32_ARCH_CAPABILITIES, 0x10a, on the kvm_pvm host).
_MSR_REFUSED = "failed to set MSR 0x10a"


@cache
def host_cpu_extras(qemu: str, bios: Path) -> tuple[str, ...]:
    """Flags ``-cpu host`` needs to start at all on this KVM: probed once with the tiny guest.

    On the kvm_pvm host, KVM refuses QEMU's IA32_ARCH_CAPABILITIES write and QEMU aborts before
    the first instruction unless ``-arch-capabilities`` is given.
    """
    run = harness.measure(tiny_guest(qemu, bios), {"refused": _MSR_REFUSED},
                          kill_on={"ran": TINY_BANNER}, timeout=15)
    return ("-arch-capabilities",) if "refused" in run.milestones else ()


def tcg_tsc_parameter() -> str:
    """``tsc_early_khz=`` with this host's TSC rate (``cpu MHz`` of /proc/cpuinfo).

    Under TCG, microvm offers the guest no PIT/HPET reference to calibrate the TSC against; the
    stock kernel then marks the TSC unstable and often hangs (../shared/reference/peers-boot.md).
    """
    mhz = 2300.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
                break
    except (OSError, ValueError):
        pass
    return f"tsc_early_khz={round(mhz * 1000)}"
