"""An emulated VM: guest RAM shared with unicorn, a CPUID model, vCPUs that take turns on the
CPU and send each other IPIs (smp.py), and the I/O APIC that takes the devices' interrupt lines
to the local APICs its redirection entries name."""

from __future__ import annotations

import dataclasses
import json
import os
import threading

from vmmarch_cli.arch.x86_64 import board, lapic
from vmmarch_cli.backends.emulate import library, native, smp
from vmmarch_cli.backends.emulate.apic import IoApic, IoApicState
from vmmarch_cli.backends.emulate.cpuid import model_cpuid, with_timing_leaf
from vmmarch_cli.backends.emulate.hosttsc import TscClock, host_tsc
from vmmarch_cli.backends.emulate.vcpu import EmulateVcpu
from vmmarch_cli.snapshot.fileformat import SnapshotError
from vmmarch_cli.vcpu import CpuidEntry, HostMemory


class EmulateVm:
    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self._vcpus: list[EmulateVcpu] = []
        self._cpu = smp.CpuLock()
        # Its ID follows the CPUs', as the MADT and the MP table say (create_vcpu renumbers it).
        self.ioapic = IoApic(board.ioapic_id(1), self._deliver)
        # Started now, read when the CPUID model is asked for (while the kernel is read).
        self._tsc = None if _TSC_HZ else TscClock()

    def supported_cpuid(self) -> list[CpuidEntry]:
        with _TSC_LOCK:
            if not _TSC_HZ:
                _TSC_HZ.append((self._tsc or TscClock()).hz())
            self._tsc = None
            hz = _TSC_HZ[0]
        return with_timing_leaf(model_cpuid(), hz)

    def create_vcpu(self, index: int) -> EmulateVcpu:
        vcpu = EmulateVcpu(index, self.memory, self.ioapic)
        vcpu.join(self._cpu, self._route_ipi, application_processor=index != 0)
        self._vcpus.append(vcpu)
        self.ioapic.set_id(board.ioapic_id(len(self._vcpus)))
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

    def _deliver(self, entry: int) -> None:
        """An I/O APIC redirection entry fired: its vector to the vCPUs its destination names.
        The entry's low dword holds an ICR's vector, delivery-mode and destination-mode bits
        and its top byte the destination (82093AA datasheet 3.2.4), so it decodes as an IPI:
        physical or flat logical. Linux allocates vectors per CPU, so a vector delivered to
        another CPU than the one named means nothing there (COM2's output was lost with two
        vCPUs). No vCPU named (a line fired before the guest set its APICs up): vCPU 0."""
        ipi = smp.Ipi.decode(entry & 0xFFFF_FFFF, entry >> 32)
        if ipi is None or not self._vcpus:
            return
        targets = [v for v in self._vcpus if v.accepts_ipi(ipi, None)] or self._vcpus[:1]
        if ipi.mode == lapic.APIC_MODE_LOWEST:
            targets = targets[:1]  # one of them; the first, as with QEMU's round-robin off
        for vcpu in targets:
            vcpu.raise_interrupt(ipi.vector)

    # --- snapshots (vcpu.SnapshotVm) ---------------------------------------------------------

    def snapshot_identity(self) -> str:
        """The CPU engine this process runs on: a vCPU's saved context is its CPU state's
        bytes, which only the same build lays out the same way."""
        choice = library.chosen()
        if choice is None or choice.engine is None:
            return f"unicorn {choice.kind if choice else 'unknown'} library (not the engine)"
        return os.path.basename(choice.engine.directory)

    def snapshot_refusal(self) -> str | None:
        if native.layout().tsc_offset is None:
            return ("snapshots need the vmm-arch engine: this unicorn library does not say "
                    "where the guest's TSC offset is")
        return None

    def save_state(self) -> bytes:
        """The I/O APIC, and the host's TSC now: every vCPU's TSC offset is moved back by what
        passed from here to the restore (vcpu_snapshot.py)."""
        state = {"ioapic": dataclasses.asdict(self.ioapic.save()), "host_tsc": host_tsc()}
        return json.dumps(state).encode()

    def restore_state(self, data: bytes) -> None:
        """Before the vCPUs take their state (snapshot/guest.py, restore_vm)."""
        try:
            fields = json.loads(data)
            io = fields["ioapic"]
            state = IoApicState(int(io["select"]), int(io["id"]),
                                tuple(int(v) for v in io["redirection"]),
                                tuple(bool(v) for v in io["levels"]))
            saved_tsc = int(fields["host_tsc"])
        except (ValueError, KeyError, TypeError) as e:
            raise SnapshotError(f"the VM's state does not parse: {e}") from None
        try:
            self.ioapic.restore(state)
        except ValueError as e:
            raise SnapshotError(f"the I/O APIC's state does not fit: {e}") from None
        shift = host_tsc() - saved_tsc  # negative after a host reboot: the offset grows
        for vcpu in self._vcpus:
            vcpu.tsc_shift = shift

    def close(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        self._tsc = None  # its code page: a VM that never asked for the rate (a restore) made one


#: The host TSC rate, measured once per process by the first VM's clock (under the lock: two
#: VMs made in two threads must not run one clock's unicorn instance at once).
_TSC_HZ: list[int] = []
_TSC_LOCK = threading.Lock()
