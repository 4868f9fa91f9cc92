"""The emulated vCPU's interrupts: its local APIC, the alarm thread that fires the APIC timer
and stops a burst for a deliverable interrupt, the engine's INTR line, and IPIs between vCPUs
(smp.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from vmmarch_cli.arch.x86_64 import lapic
from vmmarch_cli.backends.emulate import apic, cpuid, smp
from vmmarch_cli.backends.emulate.vcpu_core import HALT_POLL_SECONDS, KICK_RETRY_SECONDS, VcpuCore
from vmmarch_cli.errors import BackendError
from vmmarch_cli.vcpu import (
    LAPIC_PAGE_SIZE,
    Lapic,
)

if TYPE_CHECKING:
    from vmmarch_cli.backends.emulate.vcpu import EmulateVcpu


class Interrupts(VcpuCore):
    def join(self, cpu_lock: smp.CpuLock, route_ipi: Callable[[EmulateVcpu, int, int], None],
             application_processor: bool) -> None:
        """Share the CPU with the VM's other vCPUs and send IPIs through ``route_ipi``; an
        application processor waits for INIT and STARTUP before it runs (SDM 8.4.4.1), as KVM
        keeps every vCPU but the BSP."""
        self._cpu_lock, self._route_ipi = cpu_lock, route_ipi
        self._awaiting_sipi = application_processor

    def accepts_ipi(self, ipi: smp.Ipi, source: EmulateVcpu | None) -> bool:
        """``ipi`` from ``source`` (None: the I/O APIC) names this vCPU."""
        model = self._apic or self._page_apic()
        return ipi.reaches(source is self, model.apic_id, model.logical_id)

    def receive_ipi(self, ipi: smp.Ipi, source: EmulateVcpu) -> None:
        """An IPI that reached this vCPU (from another vCPU's thread)."""
        if ipi.mode in (lapic.APIC_MODE_FIXED, lapic.APIC_MODE_LOWEST):
            if self._apic is not None and not self._awaiting_sipi:
                # Cross-modifying code (SDM vol. 3A 8.1.3): another vCPU may have written
                # code this vCPU's own unicorn instance holds translated. Linux signals the
                # end of such a write with an IPI to every CPU (text_poke_sync), so the
                # translations are dropped before this vCPU runs again.
                self._translations_stale = self._translations_stale or source is not self
                self._apic.raise_vector(ipi.vector)
        elif ipi.mode == lapic.APIC_MODE_NMI and not self._awaiting_sipi:
            self._raise_nmi()
        elif ipi.mode == lapic.APIC_MODE_INIT and self.index != 0 and self._engine is None:
            self._awaiting_sipi, self._sipi_vector = True, None
        elif (ipi.mode == lapic.APIC_MODE_STARTUP and self._awaiting_sipi
              and self._sipi_vector is None):
            self._sipi_vector = ipi.vector
            self._wake.set()

    def _raise_nmi(self) -> None:
        """An NMI for this vCPU (SDM vol. 3A 10.6.1, delivery mode 100b): the engine's CPU takes
        it at its next instruction boundary, whatever RFLAGS.IF says (patch 0013). A running
        burst takes it itself (a HLT in it does not hold it off); a vCPU between bursts, halted
        with interrupts on, is woken for it (one halted with them off has ended the run). The
        wheel has no way to raise one: there it is counted and dropped."""
        with self._line:  # the instance may be closing
            raised = self._system is not None and self._system.nmi()
        if not raised:
            self._hook_events["NMI dropped (no engine)"] = \
                self._hook_events.get("NMI dropped (no engine)", 0) + 1
            return
        with self._lock:  # against _run_burst's start, which clears the flag
            if not self._emulating:
                self._nmi_raised = True
        self._wake.set()

    def raise_interrupt(self, vector: int) -> None:
        """A fixed interrupt for this vCPU's local APIC (from the I/O APIC). Before the vCPU
        first runs, its APIC is its page, whose IRR keeps the interrupt until then (a device
        raises its line between a snapshot's restore and the first instruction: runjob.py)."""
        if self._apic is not None:
            self._apic.raise_vector(vector)
        else:
            model = self._page_apic()
            model.raise_vector(vector)
            self._lapic = model.page()

    def _page_apic(self) -> apic.LocalApic:
        """Before the vCPU first runs, its APIC is its page: the reset one (ID = index), or a
        restored snapshot's, whose IDs the I/O APIC's entries may name. A model of it, wired to
        nothing, to read it or to set a bit in it."""
        return apic.LocalApic(self._lapic, cpuid.CRYSTAL_HZ)

    def _new_apic(self, page: Lapic) -> apic.LocalApic:
        model = apic.LocalApic(page, cpuid.CRYSTAL_HZ)
        model.on_change = self._interrupt_changed
        if self._route_ipi is not None:
            route, vcpu = self._route_ipi, cast("EmulateVcpu", self)  # this part of one
            model.on_ipi = lambda low, high: route(vcpu, low, high)
        return model

    def _interrupt_changed(self) -> None:
        """Something in the APIC changed (from MMIO inside emu_start, a device, the timer):
        if an interrupt is now deliverable, wake a halted vCPU and, on the engine, raise the
        CPU's INTR line, which the CPU takes at its next block start; on the wheel, have the
        alarm thread stop the running burst. Never emu_stop here: inside an MMIO callback that
        would leave RIP on the access and repeat it (measured)."""
        if self._system_cpu:
            if self._update_line():
                self._wake.set()
            self._timer_moved()
            return
        if self._apic is None or self._apic.pending() is None:
            self._timer_moved()
            return
        self._wake.set()
        with self._alarm:
            self._alarm_kick = True
            self._alarm.notify()

    def _timer_moved(self) -> None:
        """Wake the alarm thread if the APIC timer now fires before the time it sleeps until.
        Only then: waking a thread from inside a hook hands it the GIL, which cost ~0.3 ms per
        APIC write (EOI, TPR) in a boot when it was done for every change."""
        deadline = self._apic.deadline() if self._apic is not None else None
        if deadline is None:
            return
        with self._alarm:
            if self._alarm_at is None or deadline < self._alarm_at:
                self._alarm.notify()

    def _update_line(self) -> bool:
        """Set the engine's INTR line to whether the local APIC has a deliverable interrupt;
        that answer. Under ``_line``: a raise and an acknowledge may race."""
        with self._line:
            pending = self._apic is not None and self._apic.pending() is not None
            if self._system is not None:  # None once closed (a device may still raise a line)
                self._system.interrupt_line(pending)
        return pending

    def _acknowledge(self) -> int:
        """The engine's CPU takes an external interrupt (on the vCPU thread, inside emu_start):
        the local APIC's highest deliverable vector goes from requested to in service, as in an
        INTA cycle (SDM vol. 3A 10.8.1); -1 when nothing is deliverable after all."""
        try:
            with self._line:
                lapic = self._apic
                vector = lapic.pending() if lapic is not None else None
                if lapic is not None and vector is not None:
                    lapic.accept(vector)
                if self._system is not None:
                    self._system.interrupt_line(lapic is not None and lapic.pending() is not None)
        except Exception as e:  # it cannot cross the C frames: the run stops instead
            self._callback_error = e
            self._kick()
            return -1
        return -1 if vector is None else vector

    def _retry_kick(self, after: float) -> None:
        with self._alarm:
            self._alarm_retry = time.monotonic() + after
            self._alarm.notify()

    def _alarm_loop(self) -> None:
        lapic = self._apic
        assert lapic is not None
        while True:
            with self._alarm:
                if self._closed:
                    return
                if not self._alarm_kick:
                    timeout = HALT_POLL_SECONDS
                    deadline = lapic.deadline()
                    self._alarm_at = deadline  # what _timer_moved compares with
                    if deadline is not None:
                        timeout = min(timeout, max(deadline - time.monotonic_ns(), 0) / 1e9)
                    if self._alarm_retry is not None:
                        timeout = min(timeout, max(self._alarm_retry - time.monotonic(), 0))
                    if self._kick_burst:
                        timeout = min(timeout, KICK_RETRY_SECONDS)
                    self._alarm.wait(timeout)
                kick = self._alarm_kick
                self._alarm_kick = False
                if self._alarm_retry is not None and time.monotonic() >= self._alarm_retry:
                    self._alarm_retry = None
                    kick = True
                kicked_burst = self._kick_burst
            self._watch_reset()
            if kicked_burst and not self._kick_again(kicked_burst):
                with self._alarm:
                    if self._kick_burst == kicked_burst:
                        self._kick_burst = 0
            lapic.tick(time.monotonic_ns())  # may set _alarm_kick again through on_change
            if kick and lapic.pending() is not None:
                self._wake.set()
                self._kick()

    def get_lapic(self) -> Lapic:
        return self._apic.page() if self._apic is not None else self._lapic

    def set_lapic(self, lapic: Lapic) -> None:
        if len(lapic.page) != LAPIC_PAGE_SIZE:
            raise BackendError(f"a LAPIC page is {LAPIC_PAGE_SIZE} bytes, not {len(lapic.page)}")
        self._lapic = lapic
        if self._apic is not None:
            self._apic = self._new_apic(lapic)
