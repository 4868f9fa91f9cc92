"""``abstraction``: the vCPU part of the arch pipeline through ``KvmVcpu`` vs the same state
set with hand-written raw ioctls, in one process on one vCPU, many iterations.

* pipeline: every step of ``pipeline.VCPU_STEPS`` (cpuid, msrs, fpu, regs, sregs, lapic) as
  ``machine.prepare`` runs it, through the neutral ``Vcpu`` interface.
* raw + policy: ``KVM_SET_CPUID2`` (entries from ``cpuid.normalize``, copied by hand into a
  buffer allocated once), ``KVM_SET_MSRS`` (``msr.boot_msrs``), ``KVM_SET_FPU`` and
  ``KVM_SET_XSAVE``, ``KVM_SET_REGS``, ``KVM_GET/SET_SREGS`` and ``KVM_GET/SET_LAPIC`` with the
  fields patched in the KVM structures: what a VMM written straight against KVM does. The
  CPUID and MSR policy functions are shared, so the ratio is the cost of the abstraction.
* raw, precomputed: the same ioctls with every structure filled once up front: the floor.

Before timing, the state each side leaves in KVM is read back and compared byte for byte.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import inputs
from bench.cases import Context, Settings
from bench.stats import CaseResult, Sample, Table, paired_row
from vmmarch_cli import machine
from vmmarch_cli.arch.x86_64 import cpuid, msr, regs
from vmmarch_cli.arch.x86_64.lapic import APIC_LVT0, APIC_LVT1
from vmmarch_cli.arch.x86_64.pipeline import VCPU_STEPS, BootPlan
from vmmarch_cli.backends.kvm import abi
from vmmarch_cli.backends.kvm.system import ioctl
from vmmarch_cli.backends.kvm.vcpu import KvmVcpu
from vmmarch_cli.config import BootConfig
from vmmarch_cli.vcpu import CpuidEntry

NAME = "abstraction"
DEFAULTS = Settings(runs=5, warmup=1)
QUICK = Settings(runs=1, warmup=0, quick=True)
ITERATIONS = 200
QUICK_ITERATIONS = 5
MSR_IA32_TSC = 0x10  # it counts, so it never reads back the same
_SREGS_COPY = abi.kvm_sregs.interrupt_bitmap.offset  # everything but the pending-IRQ bitmap


def pipeline_setup(plan: BootPlan, vcpu: KvmVcpu, supported: list[CpuidEntry]) -> None:
    for _name, step in VCPU_STEPS:
        step(plan, vcpu, supported)


@dataclass
class RawSetup:
    """Hand-written raw ioctls; the target values come from the pipeline's first run."""

    fd: int
    has_xsave: bool
    plan: BootPlan
    supported: list[CpuidEntry]

    def capture(self) -> None:
        """Allocate every buffer once and take the target state from the vCPU as it is now."""
        fd = self.fd
        entries = cpuid.normalize(self.supported, cpuid.Topology(0, self.plan.cpu_count),
                                  self.plan.cpu_mask)
        self.cpuid_header, self.cpuid_entries = abi.cpuid_buffer(len(entries))
        self._fill_cpuid(entries)
        boot = msr.boot_msrs()
        self.msrs_header, self.msr_entries = abi.msrs_buffer(len(boot))
        for k, m in zip(self.msr_entries, boot, strict=True):
            k.index, k.data = m.index, m.value
        fpu = regs.boot_fpu()
        self.fpu = abi.kvm_fpu()
        self.fpu.fcw, self.fpu.mxcsr = fpu.fcw, fpu.mxcsr
        self.xsave = abi.kvm_xsave()
        if self.has_xsave:
            ioctl(fd, abi.KVM_GET_XSAVE, self.xsave)
        self.regs = abi.kvm_regs()
        ioctl(fd, abi.KVM_GET_REGS, self.regs)
        self.sregs_target = abi.kvm_sregs()
        ioctl(fd, abi.KVM_GET_SREGS, self.sregs_target)
        self.sregs = abi.kvm_sregs()
        self.lapic_target = abi.kvm_lapic_state()
        ioctl(fd, abi.KVM_GET_LAPIC, self.lapic_target)
        self.lapic = abi.kvm_lapic_state()

    def _fill_cpuid(self, entries: list[CpuidEntry]) -> None:
        flag = abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        for k, e in zip(self.cpuid_entries, entries, strict=True):
            k.function, k.index, k.flags = e.function, e.index, flag if e.indexed else 0
            k.eax, k.ebx, k.ecx, k.edx = e.eax, e.ebx, e.ecx, e.edx

    def _fill_msrs(self) -> None:
        for k, m in zip(self.msr_entries, msr.boot_msrs(), strict=True):
            k.index, k.data = m.index, m.value

    def setup(self, policy: bool) -> None:
        fd = self.fd
        if policy:
            self._fill_cpuid(cpuid.normalize(
                self.supported, cpuid.Topology(0, self.plan.cpu_count), self.plan.cpu_mask))
            self._fill_msrs()
        ioctl(fd, abi.KVM_SET_CPUID2, self.cpuid_header)
        if ioctl(fd, abi.KVM_SET_MSRS, self.msrs_header) != len(self.msr_entries):
            raise RuntimeError("KVM_SET_MSRS refused an MSR")
        ioctl(fd, abi.KVM_SET_FPU, self.fpu)
        if self.has_xsave:
            ioctl(fd, abi.KVM_SET_XSAVE, self.xsave)
        ioctl(fd, abi.KVM_SET_REGS, self.regs)
        ioctl(fd, abi.KVM_GET_SREGS, self.sregs)
        ctypes.memmove(ctypes.addressof(self.sregs), ctypes.addressof(self.sregs_target),
                       _SREGS_COPY)
        ioctl(fd, abi.KVM_SET_SREGS, self.sregs)
        ioctl(fd, abi.KVM_GET_LAPIC, self.lapic)
        for reg in (APIC_LVT0, APIC_LVT1):
            ctypes.memmove(ctypes.addressof(self.lapic) + reg,
                           ctypes.addressof(self.lapic_target) + reg, 4)
        ioctl(fd, abi.KVM_SET_LAPIC, self.lapic)


def vcpu_state(vcpu: KvmVcpu, msr_indices: list[int]) -> bytes:
    """Everything the setup writes, as KVM reports it, for the equality check (XSAVE is
    compared through its legacy FPU view)."""
    fd = vcpu._fd
    parts: list[bytes] = []
    for struct, request in ((abi.kvm_regs, abi.KVM_GET_REGS), (abi.kvm_sregs, abi.KVM_GET_SREGS),
                            (abi.kvm_lapic_state, abi.KVM_GET_LAPIC),
                            (abi.kvm_fpu, abi.KVM_GET_FPU)):
        k = struct()
        ioctl(fd, request, k)
        parts.append(bytes(k))
    parts.append(repr(vcpu.get_msrs(msr_indices)).encode())
    parts.append(repr(vcpu.get_cpuid()).encode())
    return b"".join(parts)


def _timed(fn: Callable[[], None], iterations: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - t0) / iterations * 1e6


def run(ctx: Context) -> CaseResult:
    s = ctx.settings
    iterations = QUICK_ITERATIONS if s.quick else ITERATIONS
    kernel = inputs.guest("bootcheck")
    pipe_runs: list[Sample] = []
    raw_runs: list[Sample | None] = []
    floor_runs: list[Sample | None] = []
    with machine.prepare(BootConfig(kernel=kernel, backend="kvm")) as p:
        vcpu = p.vcpus[0]
        if not isinstance(vcpu, KvmVcpu):
            raise RuntimeError("the abstraction case needs the KVM backend")
        plan = BootPlan(entry=p.plan_entry, protocol=p.protocol, cmdline=p.cmdline.encode(),
                        ram_regions=tuple(p.vm.memory.regions()), cpu_count=len(p.vcpus),
                        cpu_mask=p.cpu_mask)
        supported = p.vm.supported_cpuid()
        raw = RawSetup(vcpu._fd, bool(vcpu._has_xsave), plan, supported)
        pipeline_setup(plan, vcpu, supported)
        raw.capture()
        indices = [m.index for m in msr.boot_msrs() if m.index != MSR_IA32_TSC]
        after_pipeline = vcpu_state(vcpu, indices)
        raw.setup(policy=True)
        same = vcpu_state(vcpu, indices) == after_pipeline
        for i in range(s.warmup + s.runs):
            ctx.say(f"abstraction: round {i + 1}/{s.warmup + s.runs} ({iterations} iterations)")
            a = _timed(lambda: pipeline_setup(plan, vcpu, supported), iterations)
            b = _timed(lambda: raw.setup(policy=True), iterations)
            c = _timed(lambda: raw.setup(policy=False), iterations)
            if i >= s.warmup:
                pipe_runs.append({"setup_us": a})
                raw_runs.append({"setup_us": b})
                floor_runs.append({"setup_us": c})
    table = Table(f"vCPU setup (cpuid, msrs, fpu, regs, sregs, lapic), {iterations} iterations "
                  "per round", "pipeline via KvmVcpu", "raw ioctls")
    table.rows.append(paired_row("setup_us", "us", pipe_runs, raw_runs, target="<= 1.05x",
                                 note="raw + the same CPUID/MSR policy functions"))
    table.rows.append(paired_row("setup_us", "us", pipe_runs, floor_runs,
                                 note="raw with every structure precomputed (the floor)"))
    table.notes.append("state after raw == state after pipeline (read back from KVM): "
                       + ("yes" if same else "NO"))
    table.notes.append("the raw side reads vCPU private fields (_fd, _has_xsave) on purpose")
    return CaseResult(NAME, [table])
