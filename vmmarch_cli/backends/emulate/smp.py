"""More than one emulated vCPU: one CPU at a time, and the interprocessor interrupts between
their local APICs (INIT and STARTUP for the APs, fixed IPIs after).

unicorn instances that share guest memory do not make a lock-prefixed instruction of one atomic
against the others (TCG runs them without its parallel mode), so two vCPUs executing at once
would break every spinlock. As QEMU's single-threaded TCG does, one vCPU runs guest code at a
time: ``CpuLock`` hands the CPU over first come, first served, and a vCPU that waits longer
than a time slice asks the running one to stop (a safe stop at a block start, native.py).
Halted vCPUs wait outside it.

ICR fields: Intel SDM vol. 3A 10.6.1 (figure 10-12); destinations 10.6.2 (physical: the APIC
ID, 0xFF broadcast; logical flat model: one bit per CPU in LDR[31:24], which Linux uses for up
to 8 CPUs); INIT/SIPI: 8.4.4.1 (an AP waits for a STARTUP IPI and starts in real mode at
vector * 4 KiB).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64.lapic import (
    APIC_MODE_INIT,
    BROADCAST_ID,
    DELIVERY_MODE_MASK,
    DELIVERY_MODE_SHIFT,
    ICR_DEST_SHIFT,
    ICR_LEVEL_ASSERT,
    ICR_LOGICAL,
    ICR_SHORTHAND_SHIFT,
    ICR_VECTOR,
)

#: How long a vCPU waits for the CPU before it asks the running one to stop: the round-robin
#: slice (QEMU's TCG uses 10 ms; shorter here, since a vCPU often waits on another's spinlock).
TIME_SLICE_SECONDS = 0.002
#: vCPUs per VM: Linux addresses up to 8 CPUs with the flat logical model (SDM 10.6.2.2).
MAX_VCPUS = 8


SHORTHAND_NONE, SHORTHAND_SELF, SHORTHAND_ALL, SHORTHAND_OTHERS = range(4)


@dataclass(frozen=True)
class Ipi:
    mode: int
    vector: int
    shorthand: int
    destination: int
    logical: bool

    @classmethod
    def decode(cls, low: int, high: int) -> Ipi | None:
        """The IPI an ICR write sends; None for an INIT level de-assert, which a xAPIC
        ignores (SDM 10.6.1: "INIT Level De-assert ... not supported")."""
        mode = (low & DELIVERY_MODE_MASK) >> DELIVERY_MODE_SHIFT
        if mode == APIC_MODE_INIT and not low & ICR_LEVEL_ASSERT:
            return None
        return cls(mode, low & ICR_VECTOR, (low >> ICR_SHORTHAND_SHIFT) & 3,
                   (high >> ICR_DEST_SHIFT) & 0xFF, bool(low & ICR_LOGICAL))

    def reaches(self, is_source: bool, apic_id: int, ldr_bits: int) -> bool:
        if self.shorthand == SHORTHAND_SELF:
            return is_source
        if self.shorthand == SHORTHAND_ALL:
            return True
        if self.shorthand == SHORTHAND_OTHERS:
            return not is_source
        if self.logical:
            return bool(ldr_bits & self.destination)
        return self.destination in (BROADCAST_ID, apic_id)


class CpuLock:
    """The CPU, for one vCPU at a time, in the order they asked (a ticket lock)."""

    def __init__(self, time_slice: float = TIME_SLICE_SECONDS) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0
        self._slice = time_slice
        self._kick_holder: Callable[[], None] | None = None

    def acquire(self, kick: Callable[[], None]) -> None:
        """Wait for the CPU; ``kick`` is how a later waiter makes this vCPU let go of it."""
        with self._cond:
            ticket = self._next
            self._next += 1
            while self._serving != ticket:
                if not self._cond.wait(self._slice) and self._kick_holder is not None:
                    self._kick_holder()
            self._kick_holder = kick

    def release(self) -> None:
        with self._cond:
            self._kick_holder = None
            self._serving += 1
            self._cond.notify_all()
