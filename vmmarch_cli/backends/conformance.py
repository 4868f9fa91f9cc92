"""What mypy checks of every backend: its classes implement the neutral interface of
``vmmarch_cli/vcpu.py``, required members and the optional Protocols they claim. Nothing here
runs; the backends return their own types, so without these lines no check would compare them
with the Protocols."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmmarch_cli.backends.emulate import EmulateHypervisor
    from vmmarch_cli.backends.emulate.vcpu import EmulateVcpu
    from vmmarch_cli.backends.emulate.vm import EmulateVm
    from vmmarch_cli.backends.kvm import KvmHypervisor
    from vmmarch_cli.backends.kvm.vcpu import KvmVcpu
    from vmmarch_cli.backends.kvm.vm import KvmVm
    from vmmarch_cli.vcpu import (
        Hypervisor,
        HypervisorClass,
        InlinePortIo,
        PostedPortIo,
        Vcpu,
        Vm,
    )

    def _implements(cls: HypervisorClass, hv: Hypervisor, vm: Vm, vcpu: Vcpu) -> None: ...
    def _inline(vcpu: InlinePortIo) -> None: ...
    def _posts(vcpu: PostedPortIo) -> None: ...

    def _kvm(hv: KvmHypervisor, vm: KvmVm, vcpu: KvmVcpu) -> None:
        _implements(KvmHypervisor, hv, vm, vcpu)

    def _emulate(hv: EmulateHypervisor, vm: EmulateVm, vcpu: EmulateVcpu) -> None:
        _implements(EmulateHypervisor, hv, vm, vcpu)
        _inline(vcpu)
        _posts(vcpu)
