"""A KVM vCPU's and VM's state in a snapshot (vcpu.SnapshotVcpu, vcpu.SnapshotVm): the kernel's
own structures, read with KVM_GET_* and given back with KVM_SET_*, in the order Firecracker
documents (src/vmm/src/vstate/vcpu/x86_64.rs, ``save_state`` and ``restore_state``):

* KVM_GET_MP_STATE first: it makes the local APIC take pending INIT/SIPI events, which changes
  the state read after it;
* the registers before the events: KVM_SET_SREGS can queue a pending interrupt, which
  KVM_SET_VCPU_EVENTS then states exactly;
* the special registers before the LAPIC (KVM_SET_SREGS sets APIC_BASE, which decides the
  LAPIC's mode) and the LAPIC before the MSRs (the TSC-deadline MSR needs the LAPIC's mode).

A vCPU's section: ``VcpuRecord``, then kvm_mp_state, kvm_regs, kvm_sregs, kvm_xsave (or kvm_fpu
where KVM has no XSAVE), kvm_xcrs (where it has), kvm_debugregs, kvm_lapic_state,
kvm_vcpu_events, ``msr_count`` kvm_msr_entry and ``cpuid_count`` kvm_cpuid_entry2. The VM's:
the three in-kernel interrupt controllers (kvm_irqchip: PIC master, PIC slave, I/O APIC), the
PIT (kvm_pit_state2) and the KVM clock (kvm_clock_data).

Guest time stops while the guest is saved, as on the emulate backend: IA32_TSC is among the MSRs
(a host-initiated write sets the TSC offset so that the guest's TSC goes on from the saved
value), the LAPIC state carries the timer's current count (KVM restarts the timer with it), and
KVM_SET_CLOCK sets kvmclock back to the saved time.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
from collections.abc import Sequence
from typing import TypeVar

from vmmarch_cli.arch.x86_64 import msr
from vmmarch_cli.arch.x86_64.record import Record
from vmmarch_cli.backends.kvm import abi
from vmmarch_cli.backends.kvm.system import check_extension, checked, ioctl
from vmmarch_cli.snapshot.fileformat import SnapshotError
from vmmarch_cli.vcpu import CpuidEntry

FLAG_XSAVE = 1  # the FPU state is a kvm_xsave (else a kvm_fpu)
FLAG_XCRS = 2  # a kvm_xcrs follows it

#: The capabilities a snapshot needs (linux/kvm.h KVM_CAP_*), with what each one is for.
NEEDED = {
    abi.KVM_CAP_MP_STATE: "KVM_GET/SET_MP_STATE",
    abi.KVM_CAP_VCPU_EVENTS: "KVM_GET/SET_VCPU_EVENTS",
    abi.KVM_CAP_DEBUGREGS: "KVM_GET/SET_DEBUGREGS",
    abi.KVM_CAP_ADJUST_CLOCK: "KVM_GET/SET_CLOCK",
    abi.KVM_CAP_PIT2: "KVM_GET/SET_PIT2",
    abi.KVM_CAP_IRQCHIP: "KVM_GET/SET_IRQCHIP",
}
CHIPS = (abi.KVM_IRQCHIP_PIC_MASTER, abi.KVM_IRQCHIP_PIC_SLAVE, abi.KVM_IRQCHIP_IOAPIC)

S = TypeVar("S", bound=ctypes.Structure)


class VcpuRecord(Record):
    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("msr_count", ctypes.c_uint32),
        ("cpuid_count", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


def refusal(kvm_fd: int) -> str | None:
    """Why this KVM cannot take or restore snapshots; None when it can."""
    missing = [what for cap, what in NEEDED.items() if check_extension(kvm_fd, cap) <= 0]
    if missing:
        return f"this KVM cannot take snapshots: it lacks {', '.join(missing)}"
    return None


#: The CPUID words that say which CPU KVM offers (vendor, family/model/stepping, features;
#: SDM vol. 2A, CPUID): (leaf, subleaf, register). Not leaf 1's EBX or leaf 0BH's EDX, which
#: hold the APIC ID of the host CPU that answered KVM_GET_SUPPORTED_CPUID.
FINGERPRINT = ((0x0, 0, "ebx"), (0x0, 0, "ecx"), (0x0, 0, "edx"), (0x1, 0, "eax"),
               (0x1, 0, "ecx"), (0x1, 0, "edx"), (0x7, 0, "ebx"), (0x7, 0, "ecx"),
               (0x7, 0, "edx"), (0x8000_0001, 0, "ecx"), (0x8000_0001, 0, "edx"))


def identity(supported: Sequence[CpuidEntry]) -> str:
    """What must be the same to restore a KVM snapshot here: the CPU KVM offers (a fingerprint
    of its supported CPUID), since the vCPU state holds that CPU's registers and MSRs."""
    leaves = {(e.function, e.index): e for e in supported}
    words = [getattr(leaves[(leaf, sub)], reg) if (leaf, sub) in leaves else 0
             for leaf, sub, reg in FINGERPRINT]
    return f"kvm, cpu {hashlib.sha256(repr(words).encode()).hexdigest()[:16]}"


def msrs_to_save(kvm_fd: int) -> list[int]:
    """The MSRs a snapshot keeps: those KVM lists as its own, and the ones vmm-arch's pipeline
    sets and a guest programs that the list leaves out (the MTRRs, on the kernels measured:
    KVM keeps them in its MTRR state, not among the listed MSRs)."""
    listed = _msr_index_list(kvm_fd)
    extra = [m.index for m in msr.boot_msrs()] + list(msr.MTRR_MSRS)
    return listed + [index for index in dict.fromkeys(extra) if index not in set(listed)]


def _msr_index_list(kvm_fd: int) -> list[int]:
    """KVM_GET_MSR_INDEX_LIST: asked once with room for none, KVM answers E2BIG with the
    count."""
    header = abi.kvm_msr_list(0)
    try:
        ioctl(kvm_fd, abi.KVM_GET_MSR_INDEX_LIST, header)
    except OSError as e:
        if e.errno != errno.E2BIG:  # E2BIG: nmsrs now holds the count
            raise
    buf = (ctypes.c_uint32 * (1 + header.nmsrs))(header.nmsrs)
    checked(kvm_fd, abi.KVM_GET_MSR_INDEX_LIST, abi.kvm_msr_list.from_buffer(buf),
            "KVM_GET_MSR_INDEX_LIST")
    return list(buf[1 : 1 + buf[0]])


def save_vcpu(fd: int, has_xsave: bool, has_xcrs: bool, msrs: Sequence[int]) -> bytes:
    """The vCPU's state, in Firecracker's order (module docstring); the vCPU must not run."""
    mp_state = _get(fd, abi.kvm_mp_state(), abi.KVM_GET_MP_STATE, "KVM_GET_MP_STATE")
    regs = _get(fd, abi.kvm_regs(), abi.KVM_GET_REGS, "KVM_GET_REGS")
    sregs = _get(fd, abi.kvm_sregs(), abi.KVM_GET_SREGS, "KVM_GET_SREGS")
    fpu: ctypes.Structure = (_get(fd, abi.kvm_xsave(), abi.KVM_GET_XSAVE, "KVM_GET_XSAVE")
                             if has_xsave else
                             _get(fd, abi.kvm_fpu(), abi.KVM_GET_FPU, "KVM_GET_FPU"))
    xcrs = _get(fd, abi.kvm_xcrs(), abi.KVM_GET_XCRS, "KVM_GET_XCRS") if has_xcrs else None
    debugregs = _get(fd, abi.kvm_debugregs(), abi.KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS")
    lapic = _get(fd, abi.kvm_lapic_state(), abi.KVM_GET_LAPIC, "KVM_GET_LAPIC")
    entries = _readable_msrs(fd, msrs)
    events = _get(fd, abi.kvm_vcpu_events(), abi.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")
    header, cpuid = abi.cpuid_buffer(256)
    checked(fd, abi.KVM_GET_CPUID2, header, "KVM_GET_CPUID2")
    record = VcpuRecord(flags=(FLAG_XSAVE if has_xsave else 0) | (FLAG_XCRS if xcrs else 0),
                        msr_count=len(entries), cpuid_count=header.nent)
    parts = [record, mp_state, regs, sregs, fpu, *([xcrs] if xcrs else []), debugregs, lapic,
             events]
    return (b"".join(bytes(p) for p in parts) + b"".join(bytes(e) for e in entries)
            + bytes(cpuid)[: header.nent * ctypes.sizeof(abi.kvm_cpuid_entry2)])


def restore_vcpu(fd: int, has_xsave: bool, data: bytes, index: int) -> None:
    """Give a new vCPU (never run) ``save_vcpu``'s state, in Firecracker's order."""
    reader = _Reader(data, f"cpu{index}'s state")
    record = reader.take(VcpuRecord)
    if bool(record.flags & FLAG_XSAVE) != has_xsave:
        raise SnapshotError(f"cpu{index}'s FPU state is in another form than this KVM's "
                            "(KVM_CAP_XSAVE differs)")
    mp_state = reader.take(abi.kvm_mp_state)
    regs = reader.take(abi.kvm_regs)
    sregs = reader.take(abi.kvm_sregs)
    fpu: ctypes.Structure = reader.take(abi.kvm_xsave if has_xsave else abi.kvm_fpu)
    xcrs = reader.take(abi.kvm_xcrs) if record.flags & FLAG_XCRS else None
    debugregs = reader.take(abi.kvm_debugregs)
    lapic = reader.take(abi.kvm_lapic_state)
    events = reader.take(abi.kvm_vcpu_events)
    msrs = [reader.take(abi.kvm_msr_entry) for _ in range(record.msr_count)]
    cpuid = [reader.take(abi.kvm_cpuid_entry2) for _ in range(record.cpuid_count)]
    reader.end()

    header, entries = abi.cpuid_buffer(len(cpuid))
    for i, e in enumerate(cpuid):
        entries[i] = e
    checked(fd, abi.KVM_SET_CPUID2, header, "KVM_SET_CPUID2")
    checked(fd, abi.KVM_SET_MP_STATE, mp_state, "KVM_SET_MP_STATE")
    checked(fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS")
    checked(fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
    if has_xsave:
        checked(fd, abi.KVM_SET_XSAVE, fpu, "KVM_SET_XSAVE")
    else:
        checked(fd, abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")
    if xcrs is not None:
        checked(fd, abi.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")
    checked(fd, abi.KVM_SET_DEBUGREGS, debugregs, "KVM_SET_DEBUGREGS")
    checked(fd, abi.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")
    header_m, entries_m = abi.msrs_buffer(len(msrs))
    for i, m in enumerate(msrs):
        entries_m[i] = m
    n = checked(fd, abi.KVM_SET_MSRS, header_m, "KVM_SET_MSRS")
    if n != len(msrs):
        bad = msrs[n]
        raise SnapshotError(f"cpu{index}: KVM refused MSR {bad.index:#x} = {bad.data:#x} "
                            f"({n} of {len(msrs)} set)")
    checked(fd, abi.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")


def save_vm(fd: int) -> bytes:
    """The in-kernel interrupt controllers, the PIT and the KVM clock."""
    chips = []
    for chip_id in CHIPS:
        chip = abi.kvm_irqchip(chip_id=chip_id)
        checked(fd, abi.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        chips.append(chip)
    pit = _get(fd, abi.kvm_pit_state2(), abi.KVM_GET_PIT2, "KVM_GET_PIT2")
    clock = _get(fd, abi.kvm_clock_data(), abi.KVM_GET_CLOCK, "KVM_GET_CLOCK")
    return b"".join(bytes(p) for p in (*chips, pit, clock))


def restore_vm(fd: int, data: bytes) -> None:
    """Before the vCPUs take their state (snapshot/guest.py, restore_vm)."""
    reader = _Reader(data, "the VM's state")
    chips = [reader.take(abi.kvm_irqchip) for _ in CHIPS]
    pit = reader.take(abi.kvm_pit_state2)
    clock = reader.take(abi.kvm_clock_data)
    reader.end()
    if [c.chip_id for c in chips] != list(CHIPS):
        raise SnapshotError("the VM's state does not parse: its interrupt controllers are "
                            f"{[c.chip_id for c in chips]}")
    checked(fd, abi.KVM_SET_PIT2, pit, "KVM_SET_PIT2")
    # Only the time: the flags KVM_GET_CLOCK reports (TSC_STABLE, REALTIME, HOST_TSC) ask
    # KVM_SET_CLOCK for more than going on from the saved time (api.rst 4.45).
    checked(fd, abi.KVM_SET_CLOCK, abi.kvm_clock_data(clock=clock.clock), "KVM_SET_CLOCK")
    for chip in chips:
        checked(fd, abi.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")


def _get(fd: int, struct: S, request: int, what: str) -> S:
    checked(fd, request, struct, what)
    return struct


def _readable_msrs(fd: int, indices: Sequence[int]) -> list[abi.kvm_msr_entry]:
    """The MSRs in ``indices`` this vCPU can read now. KVM_GET_MSRS stops at the first one it
    cannot (one the vCPU's CPUID does not offer) and says how many it read: that one is left
    out and the rest read again."""
    out: list[abi.kvm_msr_entry] = []
    rest = list(indices)
    while rest:
        header, entries = abi.msrs_buffer(len(rest))
        for e, index in zip(entries, rest, strict=True):
            e.index = index
        n = checked(fd, abi.KVM_GET_MSRS, header, "KVM_GET_MSRS")
        out.extend(abi.kvm_msr_entry(index=entries[i].index, data=entries[i].data)
                   for i in range(n))
        rest = rest[n + 1 :]
    return out


class _Reader:
    """Structures one after another out of a section; SnapshotError when it ends early or has
    bytes left over."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data, self._at, self._what = data, 0, what

    def take(self, kind: type[S]) -> S:
        size = ctypes.sizeof(kind)
        if self._at + size > len(self._data):
            raise SnapshotError(f"{self._what} does not parse: it ends inside a {kind.__name__}")
        value = kind.from_buffer_copy(self._data, self._at)
        self._at += size
        return value

    def end(self) -> None:
        if self._at != len(self._data):
            raise SnapshotError(f"{self._what} does not parse: {len(self._data) - self._at} "
                                "bytes left over")
