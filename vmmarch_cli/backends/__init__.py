"""Hypervisor backends, by name. Each one implements ``vmmarch_cli.vcpu.Hypervisor``.

Backends are imported on first use, so ``vmm-arch --help`` pays for none of them. ``auto`` is
a policy, not a backend: ``pick`` says which one it means on this host, and why.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from vmmarch_cli.errors import BackendUnavailableError, BadInputError
from vmmarch_cli.vcpu import Hypervisor, HypervisorClass, HypervisorInfo

#: name -> (module, class)
REGISTRY: dict[str, tuple[str, str]] = {
    "kvm": ("vmmarch_cli.backends.kvm", "KvmHypervisor"),
    "emulate": ("vmmarch_cli.backends.emulate", "EmulateHypervisor"),
}


#: The name that lets ``pick`` choose.
AUTO = "auto"


def names() -> list[str]:
    return list(REGISTRY)


@dataclass(frozen=True)
class Pick:
    """The backend ``auto`` means here, and why (for the report line and --json)."""

    name: str
    reason: str


def pick() -> Pick:
    """Hardware KVM where /dev/kvm runs guest ring 0 in hardware; the emulate backend where
    /dev/kvm is missing, unusable, or emulates guest ring 0 (a nested KVM without VMX runs
    guest kernel code ~1000x slower and cannot enter ring 0 from a user SYSCALL:
    docs/limited-kvm.md); KVM as it is when the emulate backend is unavailable."""
    kvm = probe("kvm", facts=False)
    if kvm.usable and runs_ring0_in_hardware("kvm"):
        return Pick("kvm", "/dev/kvm runs guest ring 0 in hardware")
    emulate = probe("emulate", facts=False)
    why_not_kvm = kvm.reason if not kvm.usable else "this host's KVM emulates guest ring 0"
    if emulate.usable:
        return Pick("emulate", why_not_kvm)
    if kvm.usable:
        return Pick("kvm", f"{why_not_kvm}, and the emulate backend is unavailable: "
                           f"{emulate.reason}")
    raise BackendUnavailableError(f"no backend works here: kvm: {kvm.reason}; emulate: "
                                  f"{emulate.reason}")


def runs_ring0_in_hardware(name: str) -> bool:
    """Whether backend ``name`` runs guest kernel code on the CPU (not in an emulator)."""
    return _class(name).runs_ring0_in_hardware()


def resolve(name: str) -> Pick:
    """``name`` itself, or what ``auto`` picks."""
    if name == AUTO:
        return pick()
    _class(name)  # BadInputError for an unknown name
    return Pick(name, f"--backend {name}")


def _class(name: str) -> HypervisorClass:
    if name not in REGISTRY:
        raise BadInputError(f"unknown backend {name!r}; choose one of {AUTO}, "
                            f"{', '.join(REGISTRY)}")
    module, cls = REGISTRY[name]
    try:
        found: HypervisorClass = getattr(importlib.import_module(module), cls)
        return found
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} cannot load: {e}") from None


def open_backend(name: str, quiet: bool = False) -> Hypervisor:
    """Open backend ``name`` (not ``auto``: ``resolve`` it first); what it has to say while it
    opens (the emulate backend building its CPU engine on first use) goes to stderr unless
    ``quiet``."""
    return _class(name)(quiet=quiet)


def probe(name: str, facts: bool = True) -> HypervisorInfo:
    try:
        return _class(name).probe(facts)
    except BackendUnavailableError as e:
        return HypervisorInfo(name, False, str(e))
