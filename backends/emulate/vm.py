"""An emulated VM: guest RAM shared with unicorn, a CPUID model, vCPUs that take turns on the
CPU and send each other IPIs (smp.py), and the I/O APIC that takes the devices' interrupt lines
to the first vCPU's local APIC."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from backends.emulate import smp
from backends.emulate.apic import IoApic
from backends.emulate.cpuid import model_cpuid, with_timing_leaf
from backends.emulate.engine import host_tsc_hz
from backends.emulate.vcpu import EmulateVcpu
from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.vcpu import CpuidEntry


class EmulateVm:
    def __init__(self, regions: Sequence[tuple[int, int]]) -> None:
        self.memory = MmapGuestMemory(regions)
        self._vcpus: list[EmulateVcpu] = []
        self._cpu = smp.CpuLock()
        # The I/O APIC ID follows the CPUs' as in the MADT and MP table; one vCPU: ID 1.
        self.ioapic = IoApic(1, self._deliver)

    def supported_cpuid(self) -> list[CpuidEntry]:
        return with_timing_leaf(model_cpuid(), _tsc_hz())

    def create_vcpu(self, index: int) -> EmulateVcpu:
        vcpu = EmulateVcpu(index, self.memory, self.ioapic)
        vcpu.join(self._cpu, self._route_ipi, application_processor=index != 0)
        self._vcpus.append(vcpu)
        return vcpu

    def _route_ipi(self, source: EmulateVcpu, low: int, high: int) -> None:
        ipi = smp.Ipi.decode(low, high)
        if ipi is None:
            return
        for vcpu in list(self._vcpus):
            if vcpu.accepts_ipi(ipi, source):
                vcpu.receive_ipi(ipi, source)

    def set_irq_line(self, irq: int, level: bool) -> None:
        self.ioapic.set_irq(irq, level)

    def _deliver(self, vector: int) -> None:
        if self._vcpus:
            self._vcpus[0].raise_interrupt(vector)

    def close(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        self.memory.close()


@functools.cache
def _tsc_hz() -> int:
    return host_tsc_hz()
