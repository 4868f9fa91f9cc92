"""The x86_64 boot pipeline: an ordered list of named steps, each pure state applied through
``GuestMemory`` or ``Vcpu`` only. No backend, device or CLI is imported here.

Order matters: guest memory first (tables the vCPU state points at), then per vCPU CPUID before
MSRs (since Linux 6.13 KVM hides CPUID-gated MSRs until CPUID is set; Firecracker 4681a67f7),
then FPU, GPRs, sregs, and the LAPIC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from vmmarch_cli.arch.x86_64 import (
    acpi,
    boot_params,
    cpuid,
    e820,
    gdt,
    lapic,
    layout,
    mptable,
    msr,
    paging,
    pvh,
    regs,
)
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.errors import PipelineStepError, VmmArchError
from vmmarch_cli.vcpu import CpuidEntry, GuestMemory, Vcpu


@dataclass(frozen=True)
class BootPlan:
    """Everything the pipeline needs to know, decided before it runs."""

    entry: int
    cmdline: bytes
    protocol: BootProtocol
    ram_regions: tuple[tuple[int, int], ...]
    cpu_count: int = 1
    cpu_mask: frozenset[str] = frozenset()
    initrd_address: int = 0
    initrd_size: int = 0
    setup_header: bytes = b""
    kernel_alignment: int = 0x100_0000  # what Firecracker reports for an ELF vmlinux


#: What a step set, as ``dump-regs`` shows it: built on demand, because only ``dump-regs``
#: reads it and formatting ~30 values per vCPU was ~5% of vCPU setup (benchmark case
#: "abstraction").
Describe = Callable[[], dict[str, str]]


@dataclass(frozen=True)
class StepRecord:
    """What one step did, for ``dump-regs`` and for tests that run a step alone."""

    step: str
    target: str  # "memory" or "cpu<N>"
    describe: Describe = field(default=dict, compare=False)  # compare summaries, not closures

    @property
    def summary(self) -> dict[str, str]:
        return self.describe()



MemoryStep = Callable[[BootPlan, GuestMemory], Describe]
VcpuStep = Callable[[BootPlan, Vcpu, Sequence[CpuidEntry]], Describe]


def _hex(v: int) -> str:
    return f"{v:#x}"


# --- memory steps --------------------------------------------------------------------------


def write_cmdline(plan: BootPlan, mem: GuestMemory) -> Describe:
    mem.write(layout.CMDLINE_START, plan.cmdline + b"\0")
    return lambda: {"address": _hex(layout.CMDLINE_START), "size": str(len(plan.cmdline) + 1)}


def write_gdt(plan: BootPlan, mem: GuestMemory) -> Describe:
    table = gdt.pvh_gdt() if plan.protocol == BootProtocol.PVH else gdt.linux64_gdt()
    mem.write(layout.BOOT_GDT_START, gdt.pack_table(table))
    mem.write(layout.BOOT_IDT_START, bytes(8))
    count = len(table)
    return lambda: {"gdt": _hex(layout.BOOT_GDT_START), "entries": str(count),
                    "idt": _hex(layout.BOOT_IDT_START)}


def write_page_tables(plan: BootPlan, mem: GuestMemory) -> Describe:
    tables = paging.identity_tables()
    for address, data in tables.tables:
        mem.write(address, data)
    cr3 = tables.cr3
    return lambda: {"cr3": _hex(cr3), "identity_map": f"{layout.IDENTITY_MAP_GIB} GiB"}


def write_mptable(plan: BootPlan, mem: GuestMemory) -> Describe:
    table = mptable.build(plan.cpu_count)
    mem.write(table.address, table.data)
    address, size = table.address, len(table.data)
    return lambda: {"address": _hex(address), "size": str(size)}


def write_acpi(plan: BootPlan, mem: GuestMemory) -> Describe:
    tables = acpi.build(plan.cpu_count)
    for address, data in tables.blobs:
        mem.write(address, data)
    rsdp, end = tables.rsdp_address, tables.end
    return lambda: {"rsdp": _hex(rsdp), "end": _hex(end), "cpus": str(plan.cpu_count)}


def write_zero_page(plan: BootPlan, mem: GuestMemory) -> Describe:
    entries = e820.memory_map(plan.ram_regions)
    page = boot_params.build(
        boot_params.ZeroPage(
            cmdline_address=layout.CMDLINE_START,
            cmdline_size=len(plan.cmdline) + 1,
            e820=entries,
            initrd_address=plan.initrd_address,
            initrd_size=plan.initrd_size,
            setup_header=plan.setup_header,
            kernel_alignment=plan.kernel_alignment,
            acpi_rsdp_address=layout.ACPI_RSDP_START,
        )
    )
    mem.write(layout.ZERO_PAGE_START, page)
    count = len(entries)
    return lambda: {"address": _hex(layout.ZERO_PAGE_START), "e820_entries": str(count),
                    "initrd": f"{plan.initrd_address:#x}+{plan.initrd_size:#x}"}


def write_start_info(plan: BootPlan, mem: GuestMemory) -> Describe:
    entries = e820.memory_map(plan.ram_regions)
    modules = [(plan.initrd_address, plan.initrd_size)] if plan.initrd_size else []
    info = pvh.StartInfo(
        cmdline_address=layout.CMDLINE_START,
        memmap_address=layout.PVH_MEMMAP_START,
        memmap=entries,
        modlist_address=layout.PVH_MODLIST_START,
        modules=modules,
        rsdp_address=layout.ACPI_RSDP_START,
    )
    mem.write(layout.PVH_INFO_START, pvh.build_start_info(info))
    mem.write(layout.PVH_MODLIST_START, pvh.build_modlist(modules))
    mem.write(layout.PVH_MEMMAP_START, pvh.build_memmap(entries))
    counts = len(entries), len(modules)
    return lambda: {"address": _hex(layout.PVH_INFO_START), "memmap_entries": str(counts[0]),
                    "modules": str(counts[1])}


# --- vCPU steps ----------------------------------------------------------------------------


def set_cpuid(plan: BootPlan, vcpu: Vcpu, supported: Sequence[CpuidEntry]) -> Describe:
    topology = cpuid.Topology(apic_id=vcpu.index, cpu_count=plan.cpu_count)
    entries = cpuid.normalize(supported, topology, plan.cpu_mask)
    vcpu.set_cpuid(entries)
    leaves, apic_id = len(entries), vcpu.index  # not the vCPU: a record must not keep it alive
    return lambda: {"leaves": str(leaves), "apic_id": str(apic_id),
                    "masked": ",".join(sorted(plan.cpu_mask)) or "-"}


def set_msrs(plan: BootPlan, vcpu: Vcpu, supported: Sequence[CpuidEntry]) -> Describe:
    entries = msr.boot_msrs()
    vcpu.set_msrs(entries)
    return lambda: {msr.MSR_NAMES[e.index]: _hex(e.value) for e in entries}


def set_fpu(plan: BootPlan, vcpu: Vcpu, supported: Sequence[CpuidEntry]) -> Describe:
    fpu = regs.boot_fpu()
    vcpu.set_fpu(fpu)
    return lambda: {"fcw": _hex(fpu.fcw), "mxcsr": _hex(fpu.mxcsr)}


def set_regs(plan: BootPlan, vcpu: Vcpu, supported: Sequence[CpuidEntry]) -> Describe:
    if plan.protocol == BootProtocol.PVH:
        r = regs.pvh_regs(plan.entry)
        vcpu.set_regs(r)
        return lambda: {"rip": _hex(r.rip), "rbx": _hex(r.rbx), "rflags": _hex(r.rflags)}
    r = regs.linux64_regs(plan.entry)
    vcpu.set_regs(r)
    return lambda: {"rip": _hex(r.rip), "rsp": _hex(r.rsp), "rbp": _hex(r.rbp),
                    "rsi": _hex(r.rsi), "rflags": _hex(r.rflags)}


def set_sregs(plan: BootPlan, vcpu: Vcpu, supported: Sequence[CpuidEntry]) -> Describe:
    current = vcpu.get_sregs()
    if plan.protocol == BootProtocol.PVH:
        s = regs.pvh_sregs(current)
    else:
        s = regs.linux64_sregs(current, cr3=layout.PML4_START)
    vcpu.set_sregs(s)
    return lambda: {"cs": _hex(s.cs.selector), "ds": _hex(s.ds.selector),
                    "tr": _hex(s.tr.selector), "cr0": _hex(s.cr0), "cr3": _hex(s.cr3),
                    "cr4": _hex(s.cr4), "efer": _hex(s.efer),
                    "gdtr": f"{s.gdt.base:#x}/{s.gdt.limit:#x}",
                    "idtr": f"{s.idt.base:#x}/{s.idt.limit:#x}"}


def set_lapic(plan: BootPlan, vcpu: Vcpu, supported: Sequence[CpuidEntry]) -> Describe:
    state = lapic.virtual_wire(vcpu.get_lapic())
    vcpu.set_lapic(state)
    lvt0, lvt1 = state.register(lapic.APIC_LVT0), state.register(lapic.APIC_LVT1)
    return lambda: {"lvt0": _hex(lvt0), "lvt1": _hex(lvt1)}


#: The pipeline, in order, per boot protocol. Names are what ``dump-regs`` and tests use.
MEMORY_STEPS: dict[str, tuple[tuple[str, MemoryStep], ...]] = {
    BootProtocol.LINUX64: (
        ("cmdline", write_cmdline),
        ("gdt", write_gdt),
        ("page_tables", write_page_tables),
        ("mptable", write_mptable),
        ("acpi", write_acpi),
        ("boot_params", write_zero_page),
    ),
    BootProtocol.PVH: (
        ("cmdline", write_cmdline),
        ("gdt", write_gdt),
        ("mptable", write_mptable),
        ("acpi", write_acpi),
        ("start_info", write_start_info),
    ),
}
VCPU_STEPS: tuple[tuple[str, VcpuStep], ...] = (
    ("cpuid", set_cpuid),
    ("msrs", set_msrs),
    ("fpu", set_fpu),
    ("regs", set_regs),
    ("sregs", set_sregs),
    ("lapic", set_lapic),
)


def probe_cpuid_mask(
    vcpu: Vcpu, supported: Sequence[CpuidEntry], mask: frozenset[str], cpu_count: int
) -> list[str]:
    """Set the masked CPUID on ``vcpu`` and read it back: the masked features still visible.

    Some hypervisors answer parts of CPUID themselves (a PVM host reports the host's leaves 1,
    7 and 0DH whatever the VMM set); the caller then asks the kernel to ignore those features
    (``clearcpuid=``). Detected per boot, so a hypervisor that honours the table needs nothing.
    """
    vcpu.set_cpuid(cpuid.normalize(supported, cpuid.Topology(vcpu.index, cpu_count), mask))
    return cpuid.leaked(mask, vcpu.get_cpuid())


def configure(
    plan: BootPlan,
    memory: GuestMemory,
    vcpus: Sequence[Vcpu],
    supported_cpuid: Sequence[CpuidEntry],
) -> list[StepRecord]:
    """Run every step: memory once, then each vCPU in index order. A step that fails raises
    PipelineStepError naming it and its target, with the cause chained."""
    records = [_record(name, "memory", partial(step, plan, memory))
               for name, step in MEMORY_STEPS[plan.protocol]]
    for vcpu in vcpus:
        for name, vstep in VCPU_STEPS:
            records.append(_record(name, f"cpu{vcpu.index}",
                                   partial(vstep, plan, vcpu, supported_cpuid)))
    return records


def _record(step: str, target: str, run: Callable[[], Describe]) -> StepRecord:
    try:
        return StepRecord(step, target, run())
    except VmmArchError as e:
        raise PipelineStepError(step, target, e) from e
