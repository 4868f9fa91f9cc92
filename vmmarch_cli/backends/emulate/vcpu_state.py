"""The emulated vCPU's state in and out: registers, MSRs, CPUID, the LAPIC page, and the
events it delivered (the neutral Vcpu getters and setters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from vmmarch_cli.arch.x86_64 import msr
from vmmarch_cli.backends.emulate import descriptors
from vmmarch_cli.backends.emulate.binding import x86
from vmmarch_cli.backends.emulate.engine import ENGINE_MSRS, refuse_compatibility_mode
from vmmarch_cli.backends.emulate.vcpu_core import BACKEND_MSRS, CANONICAL_MSRS, VcpuCore, canonical
from vmmarch_cli.errors import BackendError
from vmmarch_cli.vcpu import (
    CpuidEntry,
    Fpu,
    MsrEntry,
    Regs,
    Sregs,
)


class StateAccess(VcpuCore):
    def get_regs(self) -> Regs:
        return self._engine.read_regs() if self._engine else self._regs

    def set_regs(self, regs: Regs) -> None:
        self._regs = regs
        if self._engine:
            self._engine.write_regs(regs)

    def get_sregs(self) -> Sregs:
        engine = self._engine
        if engine is None:
            return self._sregs
        cpu = self._native_cpu(engine.uc)
        gdt, idt, (cr0, _, cr2, cr3, cr4) = cpu.tables_and_control()
        seg = cpu.segments()
        return replace(self._sregs, cs=seg["cs"], ds=seg["ds"], es=seg["es"], fs=seg["fs"],
                       gs=seg["gs"], ss=seg["ss"], tr=seg["tr"], ldt=seg["ldt"], gdt=gdt,
                       idt=idt, cr0=cr0, cr2=cr2, cr3=cr3, cr4=cr4,
                       cr8=int(engine.uc.reg_read(x86.UC_X86_REG_CR8)),
                       efer=engine.read_msr(msr.MSR_EFER))

    def set_sregs(self, sregs: Sregs) -> None:
        # unicorn cannot hold CS/SS/DS/ES hidden state: check it against the GDT instead, so
        # a wrong descriptor fails here as it would misbehave on a real CPU or KVM.
        descriptors.check_segments(self._memory, sregs)
        refuse_compatibility_mode(sregs)
        self._sregs = sregs
        if self._engine:
            self._write_sregs(self._engine, sregs)

    def get_fpu(self) -> Fpu:
        return self._engine.read_fpu() if self._engine else self._fpu

    def set_fpu(self, fpu: Fpu) -> None:
        self._fpu = fpu
        if self._engine:
            self._engine.write_fpu(fpu)

    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]:
        """Like KVM_GET_MSRS: stops at the first MSR this backend does not have."""
        out: list[MsrEntry] = []
        for index in indices:
            if index == msr.MSR_IA32_TSC:
                value = self._tsc
            elif index == msr.MSR_IA32_APIC_BASE:
                value = self._sregs.apic_base
            elif index == msr.MSR_EFER and not self._engine:
                value = self._sregs.efer
            elif index in ENGINE_MSRS:
                value = (self._engine.read_msr(index) if self._engine
                         else self._msrs.get(index, 0))
            else:
                break
            out.append(MsrEntry(index, value))
        return out

    def set_msrs(self, entries: Sequence[MsrEntry]) -> None:
        for e in entries:  # all or nothing: check every entry first
            if e.index not in ENGINE_MSRS | BACKEND_MSRS:
                raise BackendError(f"MSR {e.index:#x} is not supported by the emulate backend")
            if e.index in CANONICAL_MSRS and not canonical(e.value):
                raise BackendError(f"MSR {e.index:#x} = {e.value:#x} is not a canonical address")
        for e in entries:
            if e.index == msr.MSR_IA32_TSC:
                self._tsc = e.value
            elif e.index == msr.MSR_IA32_APIC_BASE:
                self._sregs = replace(self._sregs, apic_base=e.value)
            elif e.index == msr.MSR_EFER and not self._engine:
                self._sregs = replace(self._sregs, efer=e.value)
            elif self._engine:
                self._engine.write_msr(e.index, e.value)
            else:
                self._msrs[e.index] = e.value

    def get_cpuid(self) -> list[CpuidEntry]:
        return list(self._cpuid)

    def set_cpuid(self, entries: Sequence[CpuidEntry]) -> None:
        self._cpuid = list(entries)
        self._cpuid_answers = {}

    @property
    def injected_events(self) -> dict[str, int]:
        """Exceptions and interrupts delivered through the guest IDT, by vector name (the same
        result field as the KVM backend's fallback injections)."""
        events = dict(self._hook_events)
        if self._system is not None:
            for name, count in self._engine_events().items():
                events[name] = events.get(name, 0) + count
        return events
