"""The software backend: an x86_64 CPU emulated by unicorn (QEMU's TCG as a library).

unicorn is an optional dependency (``pip install 'vmm-arch[emulate]'``; its core is GPLv2), so
this module imports it only when a VM is made: ``vmm-arch backends`` and ``--help`` work without
it and say how to get it. What unicorn does differently from a hardware CPU, and how this backend
makes up for it, is in docs/backends.md.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from vmmarch_cli.backends.emulate import libbuild, library, smp
from vmmarch_cli.errors import BackendUnavailableError
from vmmarch_cli.vcpu import HostMemory, HypervisorInfo

if TYPE_CHECKING:
    from vmmarch_cli.backends.emulate.vm import EmulateVm

NAME = "emulate"


def unicorn_version() -> str:
    """The installed unicorn binding's version, or BackendUnavailableError with the one-line
    fix. From the loaded binding when there is one; else from its metadata, without importing
    it (importlib.metadata costs ~20 ms of imports: only reports pay that)."""
    library.wheel_library()  # BackendUnavailableError when the binding cannot be found
    loaded = sys.modules.get("unicorn")
    if loaded is not None:
        return str(getattr(loaded, "__version__", "unknown"))
    import importlib.metadata

    try:
        return importlib.metadata.version("unicorn")
    except importlib.metadata.PackageNotFoundError:
        raise BackendUnavailableError(library.MISSING) from None


class EmulateHypervisor:
    name = NAME

    def __init__(self, quiet: bool = False) -> None:
        """Load unicorn with the CPU engine (built now on first use, saying so on stderr unless
        ``quiet``) or, failing that, the wheel."""
        library.wheel_library()  # BackendUnavailableError when the binding cannot be found
        self.engine = library.load(quiet)
        self._version = unicorn_version()

    @staticmethod
    def probe(facts: bool = True) -> HypervisorInfo:
        """Whether unicorn is installed here (nothing else is needed: no device, no rights),
        and with ``facts`` which version and library the backend would run on; builds and loads
        nothing. Without them it only looks for the binding: its version costs ~20 ms of
        importlib.metadata, which ``auto`` need not pay on every boot."""
        try:
            if not facts:
                library.wheel_library()
                return HypervisorInfo(NAME, True)
            version = unicorn_version()
            engine = library.plan()
        except BackendUnavailableError as e:
            return HypervisorInfo(NAME, False, str(e))
        return HypervisorInfo(NAME, True, "", _facts(version, engine))

    def info(self) -> HypervisorInfo:
        return HypervisorInfo(NAME, True, "", _facts(self._version, self.engine))

    @staticmethod
    def runs_ring0_in_hardware() -> bool:
        return False  # every guest instruction runs on the software CPU

    def default_cpu_mask(self) -> frozenset[str]:
        # The emulator runs every instruction it reports in CPUID: nothing to hide.
        return frozenset()

    def max_vcpus(self) -> int:
        # One unicorn instance per vCPU, taking turns (smp.py); 8 is what Linux's flat logical
        # APIC mode, the one IPIs use here, can address.
        return smp.MAX_VCPUS

    def create_vm(self, memory: HostMemory) -> EmulateVm:
        from vmmarch_cli.backends.emulate.vm import EmulateVm

        return EmulateVm(memory)

    def close(self) -> None:
        pass


def _facts(version: str, engine: library.Choice) -> dict[str, str]:
    if engine.kind is library.Kind.ENGINE and engine.library:
        runs = f"the vmm-arch engine: unicorn {version} + {len(libbuild.series())} patches"
    elif engine.kind is library.Kind.ENGINE:
        runs = f"the vmm-arch engine ({engine.reason})"
    else:
        runs = f"unicorn {version}, {engine.kind} library ({engine.reason})"
    facts = {"engine": runs}
    if engine.library:
        facts["library"] = engine.library
    facts["cpu"] = (f"up to {smp.MAX_VCPUS} software CPUs, one running at a time; exceptions, "
                    "SYSCALL and interrupts through the guest IDT")
    facts["devices"] = "local APIC and I/O APIC (MMIO); port I/O devices as on KVM"
    return facts
