"""The software backend: an x86_64 CPU emulated by unicorn (QEMU's TCG as a library).

unicorn is an optional dependency (``pip install 'vmm-arch[emulate]'``; its core is GPLv2), so
this module imports it only when a VM is made: ``vmm-arch backends`` and ``--help`` work without
it and say how to get it. What unicorn does differently from a hardware CPU, and how this backend
makes up for it, is in docs/backends.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from backends.emulate import smp
from vmmarch_cli.errors import BackendUnavailableError
from vmmarch_cli.vcpu import HypervisorInfo

if TYPE_CHECKING:
    from backends.emulate.vm import EmulateVm

NAME = "emulate"
MISSING = "unicorn is not installed: pip install 'vmm-arch[emulate]'"


def unicorn_version() -> str:
    """unicorn's version, or BackendUnavailableError with the one-line fix."""
    try:
        unicorn = importlib.import_module("unicorn")
    except ImportError:
        raise BackendUnavailableError(MISSING) from None
    return str(getattr(unicorn, "__version__", "unknown"))


def unicorn_library() -> str:
    """The libunicorn the binding loaded: the wheel's, or ``$LIBUNICORN_PATH``'s (unicorn's own
    override, e.g. the build of bench/unicorn_fix.py; docs/backends.md, "Speed")."""
    binding = importlib.import_module("unicorn.unicorn_py3.unicorn")
    return str(getattr(getattr(binding, "uclib", None), "_name", "unknown"))


class EmulateHypervisor:
    name = NAME

    def __init__(self) -> None:
        self._version = unicorn_version()

    @staticmethod
    def probe() -> HypervisorInfo:
        """Whether unicorn can be imported here (nothing else is needed: no device, no rights)."""
        try:
            return EmulateHypervisor().info()
        except BackendUnavailableError as e:
            return HypervisorInfo(NAME, False, str(e))

    def info(self) -> HypervisorInfo:
        return HypervisorInfo(NAME, True, "", {
            "engine": f"unicorn {self._version}",
            "library": unicorn_library(),
            "cpu": f"up to {smp.MAX_VCPUS} software CPUs, one running at a time; exceptions, "
                   "SYSCALL and interrupts through the guest IDT",
            "devices": "local APIC and I/O APIC (MMIO); port I/O devices as on KVM",
        })

    def default_cpu_mask(self) -> frozenset[str]:
        # The emulator runs every instruction it reports in CPUID: nothing to hide.
        return frozenset()

    def max_vcpus(self) -> int:
        # One unicorn instance per vCPU, taking turns (smp.py); 8 is what Linux's flat logical
        # APIC mode, the one IPIs use here, can address.
        return smp.MAX_VCPUS

    def create_vm(self, regions: Sequence[tuple[int, int]]) -> EmulateVm:
        from backends.emulate.vm import EmulateVm

        return EmulateVm(regions)

    def close(self) -> None:
        pass
