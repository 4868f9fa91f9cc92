"""An emulated VM: guest RAM shared with unicorn, a CPUID model, vCPUs; no interrupt controller."""

from __future__ import annotations

from collections.abc import Sequence

from backends.emulate.cpuid import model_cpuid
from backends.emulate.vcpu import EmulateVcpu
from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.vcpu import CpuidEntry


class EmulateVm:
    def __init__(self, regions: Sequence[tuple[int, int]]) -> None:
        self.memory = MmapGuestMemory(regions)
        self._vcpus: list[EmulateVcpu] = []
        #: Interrupt line levels as the devices drive them; nothing delivers them yet.
        self.irq_levels: dict[int, bool] = {}

    def supported_cpuid(self) -> list[CpuidEntry]:
        return list(model_cpuid())

    def create_vcpu(self, index: int) -> EmulateVcpu:
        vcpu = EmulateVcpu(index, self.memory)
        self._vcpus.append(vcpu)
        return vcpu

    def set_irq_line(self, irq: int, level: bool) -> None:
        self.irq_levels[irq] = level

    def close(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        self.memory.close()
