"""A local APIC (xAPIC, MMIO) and an I/O APIC for the emulated CPU: what KVM's in-kernel irqchip
does for the KVM backend, here in Python.

Register offsets and semantics: Intel SDM vol. 3A chapter 10 (table 10-1 "Local APIC Register
Address Map", 10.5.4 "APIC Timer", 10.8 "Handling Interrupts", 10.8.3.1 "Task and Processor
Priorities", 10.6.1 "Interrupt Command Register"); the I/O APIC: Intel 82093AA datasheet,
3.2 (IOREGSEL/IOWIN, ID, VER, ARB, the redirection table). Only what a Linux guest on one vCPU
uses is modelled: fixed delivery to this CPU, the timer in one-shot and periodic mode, self-IPIs,
EOI, TPR; edge-triggered I/O APIC inputs (the ISA serial ports).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64 import board, layout
from vmmarch_cli.arch.x86_64.lapic import (
    APIC_DFR,
    APIC_EOI,
    APIC_ESR,
    APIC_ICR_HIGH,
    APIC_ICR_LOW,
    APIC_ID,
    APIC_IRR,
    APIC_ISR,
    APIC_LDR,
    APIC_LVT_ERROR,
    APIC_LVT_TIMER,
    APIC_PPR,
    APIC_SVR,
    APIC_TIMER_CURRENT,
    APIC_TIMER_DIVIDE,
    APIC_TIMER_INITIAL,
    APIC_TPR,
    APIC_VERSION,
    DELIVERY_MODE_MASK,
    ICR_DELIVERY_STATUS,
    ICR_SHORTHAND_SHIFT,
    LVT_MASKED,
    VERSION_VALUE,
)
from vmmarch_cli.vcpu import LAPIC_PAGE_SIZE, Lapic

APIC_BASE = layout.APIC_DEFAULT_ADDRESS
IOAPIC_BASE = layout.IOAPIC_ADDRESS
MMIO_SIZE = 0x1000

LVT_VECTOR = 0xFF
TIMER_MODE_SHIFT = 17  # 00 one-shot, 01 periodic, 10 TSC-deadline (SDM figure 10-8)
TIMER_PERIODIC = 1
SVR_ENABLED = 1 << 8
#: Divide configuration bits 3,1,0 -> divisor (SDM figure 10-10).
DIVISORS = {0b000: 2, 0b001: 4, 0b010: 8, 0b011: 16, 0b100: 32, 0b101: 64, 0b110: 128,
            0b111: 1}
NS = 1_000_000_000

# I/O APIC (82093AA 3.2).
IOREGSEL = 0x00
IOWIN = 0x10
IOAPIC_ID = 0x00
IOAPIC_VER = 0x01
IOAPIC_ARB = 0x02
IOAPIC_REDTBL = 0x10
IOAPIC_PINS = board.IOAPIC_PINS
IOAPIC_VERSION_VALUE = (IOAPIC_PINS - 1) << 16 | 0x11
REDIR_MASKED = 1 << 16


class LocalApic:
    """One vCPU's local APIC. The timer counts at ``clock_hz`` of host monotonic time. Methods
    may be called from the vCPU thread (MMIO, injection) and its alarm thread (the timer)."""

    def __init__(self, page: Lapic, clock_hz: int, now: Callable[[], int] = time.monotonic_ns
                 ) -> None:
        self._regs = bytearray(page.page)
        self._clock_hz = clock_hz
        self._now = now
        self._lock = threading.RLock()
        self._timer_start = 0  # ns when the current count was loaded
        self._timer_deadline: int | None = None
        self.on_change: Callable[[], None] = lambda: None  # an interrupt became pending
        #: An ICR write: (ICR low, ICR high). The VM routes it to every vCPU it reaches
        #: (smp.py); alone, a local APIC delivers fixed IPIs to itself.
        self.on_ipi: Callable[[int, int], None] = self._self_ipi

    # --- the register page ----------------------------------------------------------------

    def _get(self, offset: int) -> int:
        return int.from_bytes(self._regs[offset : offset + 4], "little")

    def _put(self, offset: int, value: int) -> None:
        self._regs[offset : offset + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")

    def _bit(self, base: int, vector: int) -> tuple[int, int]:
        return base + (vector // 32) * 0x10, 1 << (vector % 32)

    def _set_bit(self, base: int, vector: int, on: bool) -> None:
        offset, mask = self._bit(base, vector)
        value = self._get(offset)
        self._put(offset, value | mask if on else value & ~mask)

    def _highest(self, base: int) -> int | None:
        for word in range(7, -1, -1):
            value = self._get(base + word * 0x10)
            if value:
                return word * 32 + value.bit_length() - 1
        return None

    def page(self) -> Lapic:
        with self._lock:
            self._put(APIC_TIMER_CURRENT, self._current_count(self._now()))
            self._put(APIC_PPR, self._ppr())
            return Lapic(bytes(self._regs[:LAPIC_PAGE_SIZE]))

    # --- MMIO -----------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            register = offset & ~0xF
            if register == APIC_TIMER_CURRENT:
                value = self._current_count(self._now())
            elif register == APIC_PPR:
                value = self._ppr()
            elif register == APIC_VERSION:
                value = VERSION_VALUE
            else:
                value = self._get(register)
            return (value >> 8 * (offset & 3)) & ((1 << 8 * size) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        register = offset & ~0xF
        ipi: tuple[int, int] | None = None
        with self._lock:
            if register == APIC_EOI:
                isr = self._highest(APIC_ISR)
                if isr is not None:
                    self._set_bit(APIC_ISR, isr, False)
            elif register == APIC_ICR_LOW:
                self._put(APIC_ICR_LOW, value & ~ICR_DELIVERY_STATUS)
                ipi = (value, self._get(APIC_ICR_HIGH))
            elif register == APIC_TIMER_INITIAL:
                self._put(APIC_TIMER_INITIAL, value)
                self._load_timer(self._now())
            elif register in (APIC_ID, APIC_TPR, APIC_LDR, APIC_DFR, APIC_SVR, APIC_ESR,
                              APIC_ICR_HIGH, APIC_TIMER_DIVIDE) or \
                    APIC_LVT_TIMER <= register <= APIC_LVT_ERROR:
                self._put(register, value)
            # ISR, TMR, IRR, PPR, version and the current count are read-only.
        if ipi is not None:
            self.on_ipi(*ipi)  # outside the lock: it may reach other vCPUs' APICs
        self.on_change()

    # --- interrupts -----------------------------------------------------------------------

    def _ppr(self) -> int:
        """Processor priority: the higher class of TPR and the highest in-service vector."""
        tpr = self._get(APIC_TPR) & 0xFF
        isr = self._highest(APIC_ISR) or 0
        return tpr if (tpr >> 4) >= (isr >> 4) else isr & 0xF0

    def raise_vector(self, vector: int) -> None:
        with self._lock:
            if vector >= 16:  # 0-15 are reserved and would be an illegal-vector error
                self._set_bit(APIC_IRR, vector, True)
        self.on_change()

    def _self_ipi(self, icr: int, high: int) -> None:
        shorthand = (icr >> ICR_SHORTHAND_SHIFT) & 3
        fixed = icr & DELIVERY_MODE_MASK == 0
        to_self = shorthand in (1, 2) or (shorthand == 0 and high >> 24 == self.apic_id)
        if fixed and to_self:
            self.raise_vector(icr & 0xFF)

    @property
    def apic_id(self) -> int:
        with self._lock:
            return self._get(APIC_ID) >> 24

    @property
    def logical_id(self) -> int:
        """LDR[31:24]: in the flat model one bit per CPU (SDM 10.6.2.2)."""
        with self._lock:
            return self._get(APIC_LDR) >> 24

    def pending(self) -> int | None:
        """The vector the CPU would take now if interrupts were enabled (SDM 10.8.3.1)."""
        with self._lock:
            if not self._get(APIC_SVR) & SVR_ENABLED:
                return None
            irr = self._highest(APIC_IRR)
            if irr is None or (irr >> 4) <= (self._ppr() >> 4):
                return None
            return irr

    def accept(self, vector: int) -> None:
        """The CPU took ``vector``: from requested to in service."""
        with self._lock:
            self._set_bit(APIC_IRR, vector, False)
            self._set_bit(APIC_ISR, vector, True)

    # --- the timer ------------------------------------------------------------------------

    def _divisor(self) -> int:
        d = self._get(APIC_TIMER_DIVIDE)
        return DIVISORS[(d & 0b11) | ((d >> 1) & 0b100)]

    def _ticks_ns(self, ticks: int) -> int:
        return ticks * self._divisor() * NS // self._clock_hz

    def _load_timer(self, now: int) -> None:
        initial = self._get(APIC_TIMER_INITIAL)
        self._timer_start = now
        self._timer_deadline = now + self._ticks_ns(initial) if initial else None

    def _current_count(self, now: int) -> int:
        if self._timer_deadline is None:
            return 0
        left = self._timer_deadline - now
        if left <= 0:
            return 0
        return left * self._clock_hz // (self._divisor() * NS)

    def deadline(self) -> int | None:
        with self._lock:
            return self._timer_deadline

    def timer_left(self) -> int | None:
        """Nanoseconds until the timer fires (0: due now), None when it is not armed: what a
        snapshot keeps of the timer, whose deadline is on this process's monotonic clock."""
        with self._lock:
            if self._timer_deadline is None:
                return None
            return max(self._timer_deadline - self._now(), 0)

    def resume_timer(self, left_ns: int | None) -> None:
        """Arm the timer to fire ``left_ns`` from now (None: disarmed), as a restore does."""
        with self._lock:
            self._timer_deadline = None if left_ns is None else self._now() + left_ns

    def tick(self, now: int) -> None:
        """Fire the timer if its deadline has passed (reloading it in periodic mode)."""
        with self._lock:
            deadline = self._timer_deadline
            if deadline is None or now < deadline:
                return
            lvt = self._get(APIC_LVT_TIMER)
            if (lvt >> TIMER_MODE_SHIFT) & 3 == TIMER_PERIODIC and self._get(APIC_TIMER_INITIAL):
                period = self._ticks_ns(self._get(APIC_TIMER_INITIAL))
                missed = (now - deadline) // period + 1
                self._timer_deadline = deadline + missed * period
            else:
                self._timer_deadline = None
            if not lvt & LVT_MASKED:
                self._set_bit(APIC_IRR, lvt & LVT_VECTOR, True)
        self.on_change()


@dataclass(frozen=True)
class IoApicState:
    select: int
    id: int
    redirection: tuple[int, ...]
    levels: tuple[bool, ...]


class IoApic:
    """The I/O APIC: ISA interrupt lines to redirection entries, which ``deliver`` routes to
    the local APICs their destination names (the VM's job). Edge-triggered inputs fire on a
    rising edge."""

    def __init__(self, apic_id: int, deliver: Callable[[int], None]) -> None:
        self._select = 0
        self._id = apic_id << 24
        self._redirection = [REDIR_MASKED] * IOAPIC_PINS
        self._levels = [False] * IOAPIC_PINS
        self._deliver = deliver
        self._lock = threading.Lock()

    def save(self) -> IoApicState:
        with self._lock:
            return IoApicState(self._select, self._id, tuple(self._redirection),
                               tuple(self._levels))

    def restore(self, state: IoApicState) -> None:
        """Take ``state`` as it was, without delivering anything (the lines' levels included:
        an edge delivered before the snapshot is not delivered again)."""
        if len(state.redirection) != IOAPIC_PINS or len(state.levels) != IOAPIC_PINS:
            raise ValueError(f"an I/O APIC state for {len(state.redirection)} pins, not "
                             f"{IOAPIC_PINS}")
        with self._lock:
            self._select, self._id = state.select, state.id
            self._redirection, self._levels = list(state.redirection), list(state.levels)

    def set_id(self, apic_id: int) -> None:
        """The ID the VMM assigned (board.ioapic_id), before the guest runs."""
        with self._lock:
            self._id = apic_id << 24

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == IOREGSEL:
                return self._select
            if offset != IOWIN:
                return 0
            index = self._select
            if index == IOAPIC_ID:
                return self._id
            if index == IOAPIC_VER:
                return IOAPIC_VERSION_VALUE
            if index == IOAPIC_ARB:
                return self._id
            pin, high = divmod(index - IOAPIC_REDTBL, 2)
            if 0 <= pin < IOAPIC_PINS:
                return (self._redirection[pin] >> (32 * high)) & 0xFFFF_FFFF
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        fire = None
        with self._lock:
            if offset == IOREGSEL:
                self._select = value & 0xFF
                return
            if offset != IOWIN:
                return
            index = self._select
            if index == IOAPIC_ID:
                self._id = value & 0x0F00_0000
                return
            pin, high = divmod(index - IOAPIC_REDTBL, 2)
            if not 0 <= pin < IOAPIC_PINS:
                return
            old = self._redirection[pin]
            shift = 32 * high
            self._redirection[pin] = (old & ~(0xFFFF_FFFF << shift)) | (value << shift)
            # Unmasking a line that is high delivers it (an edge seen while masked is lost on
            # real hardware, but a level the device still holds is not).
            if old & REDIR_MASKED and not self._redirection[pin] & REDIR_MASKED and \
                    self._levels[pin]:
                fire = self._redirection[pin]
        if fire is not None:
            self._deliver(fire)

    def set_irq(self, pin: int, level: bool) -> None:
        fire = None
        with self._lock:
            if not 0 <= pin < IOAPIC_PINS:
                return
            rising = level and not self._levels[pin]
            self._levels[pin] = level
            entry = self._redirection[pin]
            if rising and not entry & REDIR_MASKED:
                fire = entry
        if fire is not None:
            self._deliver(fire)
