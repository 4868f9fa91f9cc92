"""Hypervisor backends, by name. Each one implements ``vmmarch_cli.vcpu.Hypervisor``.

Backends are imported on first use, so ``vmm-arch --help`` pays for none of them.
"""

from __future__ import annotations

import importlib
from typing import Any

from vmmarch_cli.errors import BackendUnavailableError, BadInputError
from vmmarch_cli.vcpu import Hypervisor, HypervisorInfo

#: name -> (module, class)
REGISTRY: dict[str, tuple[str, str]] = {
    "kvm": ("backends.kvm", "KvmHypervisor"),
    "emulate": ("backends.emulate", "EmulateHypervisor"),
}


def names() -> list[str]:
    return list(REGISTRY)


def _class(name: str) -> Any:
    if name not in REGISTRY:
        raise BadInputError(f"unknown backend {name!r}; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} cannot load: {e}") from None


def open_backend(name: str, quiet: bool = False) -> Hypervisor:
    """Open backend ``name``; what it has to say while it opens (the emulate backend building
    its CPU engine on first use) goes to stderr unless ``quiet``."""
    hv: Hypervisor = _class(name)(quiet=quiet)
    return hv


def probe(name: str) -> HypervisorInfo:
    try:
        info: HypervisorInfo = _class(name).probe()
    except BackendUnavailableError as e:
        return HypervisorInfo(name, False, str(e))
    return info
