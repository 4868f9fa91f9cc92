"""A vCPU's state in a snapshot (vcpu.SnapshotVcpu): the engine's CPU context, and what
vmm-arch keeps beside it: the local APIC model (its page and the time left on its timer), the
halted and wait-for-SIPI state, the CPUID table, and the guest's TSC.

The engine's context is unicorn's ``uc_context`` data: CPUX86State up to ``end_reset_fields``
(every register, MSR, FPU and SSE state, hflags; unicorn.c ``cpu_context_size``), valid only for
the same engine build, which the snapshot's description names. A restore sets it after the
instance is made, then moves the TSC offset back by the host TSC that passed since the snapshot
(the VM's ``tsc_shift``, one for all its vCPUs, so that their TSCs stay as far apart as they
were): to the guest, the time between snapshot and restore did not pass. Its local APIC timer
is kept as the time it had left, for the same reason.

Layout of the section: ``VcpuRecord``, the context, the LAPIC page, then ``CpuidRecord``s.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from vmmarch_cli.arch.x86_64.record import Record
from vmmarch_cli.backends.emulate import native
from vmmarch_cli.backends.emulate.binding import x86
from vmmarch_cli.backends.emulate.engine import Engine
from vmmarch_cli.backends.emulate.vcpu_interrupts import Interrupts
from vmmarch_cli.backends.emulate.vcpu_state import StateAccess
from vmmarch_cli.errors import BackendError
from vmmarch_cli.snapshot.fileformat import SnapshotError
from vmmarch_cli.vcpu import LAPIC_PAGE_SIZE, CpuidEntry, Lapic

FLAG_STARTED = 1  # the engine instance exists: the vCPU has run
FLAG_HALTED = 2  # in HLT with interrupts on, waiting for one
FLAG_AWAITING_SIPI = 4  # an AP not started yet
FLAG_SIPI = 8  # sipi_vector holds the STARTUP IPI's vector
FLAG_TIMER = 16  # the local APIC timer is armed: timer_left_ns
#: DR7's L0-L3 and G0-G3 (SDM vol. 3B 17.2.4): a breakpoint the engine keeps as host
#: pointers beside the context, which a restore cannot remake yet.
DR7_ENABLES = 0xFF
U64 = (1 << 64) - 1


class VcpuRecord(Record):
    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("sipi_vector", ctypes.c_uint32),
        ("context_length", ctypes.c_uint32),
        ("cpuid_count", ctypes.c_uint32),
        ("tsc_offset", ctypes.c_uint64),  # env->tsc_offset, two's complement
        ("timer_left_ns", ctypes.c_uint64),
    )


class CpuidRecord(Record):
    _fields_ = tuple((name, ctypes.c_uint32) for name in (
        "function", "index", "eax", "ebx", "ecx", "edx", "indexed"))


@dataclass(frozen=True)
class Restoring:
    """What the restore applies once the engine instance exists (``_start``)."""

    context: bytes
    tsc_offset: int
    timer_left_ns: int | None


class Snapshots(StateAccess, Interrupts):
    _restoring: Restoring | None = None
    #: Host TSC ticks from the snapshot to its restore (set by the VM's restore_state).
    tsc_shift = 0

    def save_state(self) -> bytes:
        """This vCPU's state, taken while it does not run (between ``run`` calls)."""
        engine = self._engine
        flags = 0
        context = b""
        tsc = 0
        left: int | None = None
        if engine is not None:
            flags |= FLAG_STARTED
            offset = native.tsc_offset(engine.uc)
            if offset is None:
                raise BackendError("snapshots need the vmm-arch engine (this is the unicorn "
                                   "wheel, which does not say where the TSC offset is)")
            if int(engine.uc.reg_read(x86.UC_X86_REG_DR7)) & DR7_ENABLES:
                raise BackendError("the guest has hardware breakpoints set (DR7): a snapshot "
                                   "cannot keep them yet")
            context = _context_data(engine)
            tsc = offset.value & U64
            left = self._apic.timer_left() if self._apic is not None else None
        if self._halted:
            flags |= FLAG_HALTED
        if self._awaiting_sipi:
            flags |= FLAG_AWAITING_SIPI
        if self._sipi_vector is not None:
            flags |= FLAG_SIPI
        if left is not None:
            flags |= FLAG_TIMER
        record = VcpuRecord(flags=flags, sipi_vector=self._sipi_vector or 0,
                            context_length=len(context), cpuid_count=len(self._cpuid),
                            tsc_offset=tsc, timer_left_ns=left or 0)
        cpuid = b"".join(CpuidRecord(e.function, e.index, e.eax, e.ebx, e.ecx, e.edx,
                                     int(e.indexed)).pack() for e in self._cpuid)
        page: bytes = self.get_lapic().page
        return record.pack() + context + page + cpuid

    def restore_state(self, data: bytes) -> None:
        """Take ``data`` (``save_state``'s, from the same engine build) before the first run."""
        if self._engine is not None:
            raise BackendError("a vCPU takes a snapshot's state before it first runs")
        try:
            record = VcpuRecord.read(data)
            at = VcpuRecord.sizeof()
            context = data[at : at + record.context_length]
            at += record.context_length
            page = data[at : at + LAPIC_PAGE_SIZE]
            at += LAPIC_PAGE_SIZE
            entries = []
            for _ in range(record.cpuid_count):
                e = CpuidRecord.read(data, at)
                entries.append(CpuidEntry(e.function, e.index, e.eax, e.ebx, e.ecx, e.edx,
                                          bool(e.indexed)))
                at += CpuidRecord.sizeof()
            if len(page) != LAPIC_PAGE_SIZE or at != len(data):
                raise ValueError(f"{len(data)} bytes, not the {at} its record describes")
        except ValueError as e:
            raise SnapshotError(f"cpu{self.index}'s state does not parse: {e}") from None
        self.set_cpuid(entries)
        self.set_lapic(Lapic(page))
        self._halted = bool(record.flags & FLAG_HALTED)
        self._awaiting_sipi = bool(record.flags & FLAG_AWAITING_SIPI)
        self._sipi_vector = record.sipi_vector if record.flags & FLAG_SIPI else None
        if record.flags & FLAG_STARTED:
            left = record.timer_left_ns if record.flags & FLAG_TIMER else None
            self._restoring = Restoring(context, record.tsc_offset, left)

    def _apply_restore(self, engine: Engine) -> None:
        """The engine side of ``restore_state``, once the instance exists and before the
        guest or the alarm thread runs."""
        restoring = self._restoring
        if restoring is None:
            return
        self._restoring = None
        context = engine.uc.context_save()  # a valid header for this instance
        address, size = _context_data_at(context)
        if size != len(restoring.context):
            raise SnapshotError(f"cpu{self.index}'s CPU context is {len(restoring.context)} "
                                f"bytes; this engine's is {size}")
        ctypes.memmove(address, restoring.context, size)
        engine.uc.context_restore(context)
        offset = native.tsc_offset(engine.uc)
        if offset is None:
            raise BackendError("snapshots need the vmm-arch engine (this is the unicorn wheel)")
        shifted = (restoring.tsc_offset - self.tsc_shift) & U64
        offset.value = shifted - (1 << 64) if shifted >> 63 else shifted
        if self._apic is not None:
            self._apic.resume_timer(restoring.timer_left_ns)
            self._apic.on_change()  # interrupts pending in its IRR raise the INTR line again


def _context_data(engine: Engine) -> bytes:
    """The CPU part of unicorn's context: its data, without the header's host pointers."""
    return ctypes.string_at(*_context_data_at(engine.uc.context_save()))


def _context_data_at(context: Any) -> tuple[int, int]:
    """(address, length) of a unicorn context's data: a uc_context (uc_priv.h) starts with the
    data's length and ends with the data."""
    base = int(context.context.value)
    size = ctypes.c_size_t.from_address(base).value
    return base + int(context.size) - size, size
