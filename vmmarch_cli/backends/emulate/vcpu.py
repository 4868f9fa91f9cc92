"""An emulated vCPU behind the neutral ``Vcpu`` interface.

Until its first ``run`` the vCPU is only neutral state held here; ``run`` then makes the unicorn
instance in the mode that state asks for (unicorn cannot change mode later) and loads it. From
then on unicorn holds the registers, except what it cannot hold: the hidden part of CS/SS/DS/ES
(kept here, checked against the GDT), the TSC (unicorn drops writes), IA32_APIC_BASE, the LAPIC
page and the CPUID table (answered from here through an instruction hook).

Exits follow KVM's model: an OUT or IN stops the vCPU at that instruction and ``run`` returns
IoOut / IoIn. An OUT has completed when ``run`` returns; an IN is undone and replayed on the next
``run`` with the data ``complete_io_in`` gave, as KVM completes it on the next KVM_RUN.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from vmmarch_cli.arch.x86_64 import lapic, msr, regs
from vmmarch_cli.backends.emulate import apic, cpuid, delivery, descriptors, faults, native, smp
from vmmarch_cli.backends.emulate.binding import UcError, uc_const, x86
from vmmarch_cli.backends.emulate.engine import ENGINE_MSRS, Engine, refuse_compatibility_mode
from vmmarch_cli.backends.emulate.library import PostedPorts, SystemCpu
from vmmarch_cli.backends.emulate.native import R_EAX, R_EBX, R_ECX, R_EDX, NativeCpu
from vmmarch_cli.backends.emulate.reset import reset_lapic, reset_regs, reset_sregs
from vmmarch_cli.errors import BackendError
from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.vcpu import (
    ATTR_DB,
    ATTR_L,
    LAPIC_PAGE_SIZE,
    CpuidEntry,
    Fpu,
    Halt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    Lapic,
    MsrEntry,
    Regs,
    Shutdown,
    Sregs,
    VcpuExit,
)

#: How often a stop request is repeated while the vCPU is still emulating (see ``_kick``).
KICK_RETRY_SECONDS = 0.001
#: Instructions per burst when port I/O leaves emu_start (no attach_io): unicorn then runs its
#: per-instruction counting hook anyway (for precise stops), so the burst bound costs nothing
#: more and replaces stops from other threads, which are unsafe there (see native.py).
BURST_INSTRUCTIONS = 100_000
#: MSRs only this backend holds: unicorn drops TSC writes and has no APIC base MSR.
BACKEND_MSRS = frozenset({msr.MSR_IA32_TSC, msr.MSR_IA32_APIC_BASE})
#: MSRs KVM refuses a non-canonical address for (arch/x86/kvm/x86.c, __kvm_set_msr); unicorn
#: takes anything, so the check is here and both backends reject the same input.
CANONICAL_MSRS = frozenset({msr.MSR_LSTAR, msr.MSR_CSTAR, msr.MSR_KERNEL_GS_BASE})
UNMAPPED_ACCESS = {
    uc_const.UC_MEM_READ_UNMAPPED: "read", uc_const.UC_MEM_WRITE_UNMAPPED: "write",
    uc_const.UC_MEM_FETCH_UNMAPPED: "instruction fetch",
}
UNMAPPED_ERRORS = {uc_const.UC_ERR_READ_UNMAPPED, uc_const.UC_ERR_WRITE_UNMAPPED,
                   uc_const.UC_ERR_FETCH_UNMAPPED}
VECTOR_UD = 6


def cpu_mode_name(s: Sregs) -> str:
    """The CPU mode ``s`` puts the vCPU in, as the messages name it (SDM vol. 3A 2.2)."""
    if descriptors.long_mode(s) and s.cs.attributes & ATTR_L:
        return "64-bit"
    if s.cr0 & regs.X86_CR0_PE and s.cs.attributes & ATTR_DB:
        return "32-bit"
    return "16-bit"


def canonical(address: int) -> bool:
    """Bits 63:47 all equal (48-bit linear addresses, SDM vol. 1 3.3.7.1)."""
    top = address >> 47
    return top in (0, (1 << 17) - 1)


#: While an interrupt waits for RFLAGS.IF, the vCPU is stopped again this often to look.
INTERRUPT_WINDOW_SECONDS = 0.0002
#: A halted vCPU with no timer armed still looks for a stop request this often.
HALT_POLL_SECONDS = 0.05
RFLAGS_IF = 0x200
RFLAGS_RF = 0x10000


class EmulateVcpu:
    def __init__(self, index: int, memory: MmapGuestMemory,
                 ioapic: apic.IoApic | None = None) -> None:
        self.index = index
        self._memory = memory
        self._ioapic = ioapic
        self._apic: apic.LocalApic | None = None
        # Interrupt plumbing: the alarm thread fires the APIC timer and stops a running burst
        # when an interrupt becomes deliverable; the vCPU thread injects between bursts.
        self._wake = threading.Event()
        self._alarm = threading.Condition()
        self._alarm_kick = False
        self._alarm_retry: float | None = None
        self._alarm_at: int | None = None  # the timer deadline the alarm thread sleeps until
        self._kick_burst = 0  # a kicked burst the alarm thread kicks again until it is over
        self._alarm_thread: threading.Thread | None = None
        self._closed = False
        self._halted = False
        # Port I/O completed inside the hooks (attach_io), instead of IoIn/IoOut exits.
        self._io_read: Callable[[int, int], int] | None = None
        self._io_write: Callable[[int, int, int], None] | None = None
        self._regs = reset_regs()
        self._sregs = reset_sregs(index)
        self._fpu = Fpu()
        self._msrs: dict[int, int] = {}  # until the engine exists
        self._tsc = 0
        self._cpuid: list[CpuidEntry] = []
        self._cpuid_answers: dict[tuple[int, int], cpuid.Answer] = {}  # memo of cpuid.answer
        self._lapic = reset_lapic(index)
        self._engine: Engine | None = None
        # Stopping from other threads: ``_emulating`` is the number of the burst inside
        # emu_start (0 when none), guarded by ``_lock`` with the engine reference.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._burst = 0
        self._emulating = 0
        self._kicked = False
        self._kicker: native.Kick | None = None  # see _start
        # SMP (smp.py): the CPU shared with the other vCPUs, the VM's IPI routing, and an AP's
        # wait for its STARTUP IPI (the vector, once it came).
        self._cpu_lock: smp.CpuLock | None = None
        self._route_ipi: Callable[[EmulateVcpu, int, int], None] | None = None
        self._awaiting_sipi = False
        self._sipi_vector: int | None = None
        self._translations_stale = False  # see receive_ipi
        self._halted_flag: Any = None  # unicorn's CPUState.halted (native.halted_flag)
        self._reset_flag: Any = None  # unicorn's CPUState.stopped (native.reset_request)
        self._reset_seen = False  # the alarm thread let a stopped CPU out (_watch_reset)
        # What the hooks saw during the last burst.
        self._exit: VcpuExit | None = None
        self._vector: int | None = None
        self._unmapped: tuple[str, int] | None = None
        self._in_undo: tuple[int, ...] | None = None
        self._in_reply: tuple[int, int] | None = None  # (port, value) for the replayed IN
        self._native: NativeCpu | None = None
        self._undeliverable = ""  # why the last exception could not be delivered
        # The engine's system CPU (library.SystemCpu), when the library has it: it delivers
        # exceptions, SYSCALL and interrupts itself, and the APIC drives its INTR line, under
        # ``_line`` (the vCPU thread acknowledges while the alarm thread raises).
        self._system: SystemCpu | None = None
        self._system_cpu = False  # the engine delivers (stays True after close drops _system)
        self._line = threading.Lock()
        self._callback_error: Exception | None = None
        self._hook_events: dict[str, int] = {}  # delivered by the Python path, by name
        # Posted port I/O (vcpu.PostedPortIo, the engine's patch 0010): what the VMM posted,
        # applied when the instance is made; under ``_lock`` with the instance.
        self._posts: dict[int, tuple[int | None, bool]] = {}
        self._posted: PostedPorts | None = None
        self._posted_reads = 0  # kept when the instance is closed
        self.rip_samples: Counter[int] = Counter()  # --profile (machine._sampler)

    # --- state -------------------------------------------------------------------------

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

    def get_lapic(self) -> Lapic:
        return self._apic.page() if self._apic is not None else self._lapic

    def set_lapic(self, lapic: Lapic) -> None:
        if len(lapic.page) != LAPIC_PAGE_SIZE:
            raise BackendError(f"a LAPIC page is {LAPIC_PAGE_SIZE} bytes, not {len(lapic.page)}")
        self._lapic = lapic
        if self._apic is not None:
            self._apic = self._new_apic(lapic)

    @property
    def injected_events(self) -> dict[str, int]:
        """Exceptions and interrupts delivered through the guest IDT, by vector name (the same
        result field as the KVM backend's fallback injections)."""
        events = dict(self._hook_events)
        if self._system is not None:
            for name, count in self._engine_events().items():
                events[name] = events.get(name, 0) + count
        return events

    def _engine_events(self) -> dict[str, int]:
        assert self._system is not None
        events: dict[str, int] = {}
        for (external, vector), count in self._system.delivered().items():
            name = f"interrupt {vector:#x}" if external else faults.vector_name(vector)
            events[name] = events.get(name, 0) + count
        return events

    # --- running -----------------------------------------------------------------------

    def run(self) -> VcpuExit:
        if self._awaiting_sipi:
            waited = self._await_sipi()
            if waited is not None:
                return waited
        engine = self._engine or self._start()
        while True:
            decided = self._between_bursts()
            if decided is not None:
                return decided
            ex = self._run_burst(engine)
            if ex is not None:
                return ex

    def _between_bursts(self) -> VcpuExit | None:
        """Everything decided while the guest is not executing, in one place: a stop request
        ends the run; a pending interrupt is delivered when RFLAGS.IF allows; a vCPU halted
        with interrupts on sleeps until an interrupt is pending (the timer's deadline, a device,
        a stop request), without spinning the host CPU."""
        lapic = self._apic
        while True:
            if self._translations_stale and self._engine is not None:
                self._translations_stale = False  # before the flush: a new IPI sets it again
                self._engine.uc.ctl_flush_tb()
            if self._stop.is_set():
                return Interrupted()
            if lapic is None or self._engine is None:
                return None
            lapic.tick(time.monotonic_ns())
            vector = lapic.pending()
            if vector is not None and self._system_cpu:
                self._halted = False  # its INTR line is up: the CPU takes it when IF allows
                return None
            if vector is not None:
                # An IN waiting for its replay is half done: the interrupt comes after it, or
                # the handler's own IN from that port would receive the replayed value.
                if self._in_reply is not None or not self._interrupts_enabled() or \
                        self._native_cpu(self._engine.uc).interrupt_shadow:
                    self._retry_kick(INTERRUPT_WINDOW_SECONDS)
                    return None
                problem = self._deliver_external(vector)
                if problem:
                    return InternalError(problem)
                lapic.accept(vector)
                self._halted = False
                continue  # another may be pending at a higher priority than the new PPR
            if not self._halted:
                return None
            deadline = lapic.deadline()
            wait = HALT_POLL_SECONDS if deadline is None else min(
                HALT_POLL_SECONDS, max(deadline - time.monotonic_ns(), 0) / 1e9)
            self._wake.wait(wait)
            self._wake.clear()

    def _interrupts_enabled(self) -> bool:
        assert self._engine is not None
        return bool(int(self._engine.uc.reg_read(x86.UC_X86_REG_EFLAGS)) & RFLAGS_IF)

    def _deliver_external(self, vector: int) -> str:
        """An interrupt the local APIC presents, through the guest IDT; the problem if the
        delivery would fault (then the run stops)."""
        engine = self._engine
        assert engine is not None
        if not self._code64(engine):
            return "external interrupts are delivered in 64-bit mode only"
        native = self._native_cpu(engine.uc)
        s = self.get_sregs()
        decision = delivery.decide(self._memory, s, s.cs.selector & 0x3,
                                   int(engine.uc.reg_read(x86.UC_X86_REG_RSP)), vector,
                                   False, 0)
        if decision.problem or decision.vector != vector:
            return decision.problem or f"interrupt vector {vector} has no usable gate"
        native.interrupt(vector)
        name = f"interrupt {vector:#x}"
        self._hook_events[name] = self._hook_events.get(name, 0) + 1
        return ""

    def _native_cpu(self, uc: Any) -> NativeCpu:
        if self._native is None:
            self._native = NativeCpu(uc)
        return self._native

    # --- more than one vCPU (smp.py) ------------------------------------------------------

    def join(self, cpu_lock: smp.CpuLock, route_ipi: Callable[[EmulateVcpu, int, int], None],
             application_processor: bool) -> None:
        """Share the CPU with the VM's other vCPUs and send IPIs through ``route_ipi``; an
        application processor waits for INIT and STARTUP before it runs (SDM 8.4.4.1), as KVM
        keeps every vCPU but the BSP."""
        self._cpu_lock, self._route_ipi = cpu_lock, route_ipi
        self._awaiting_sipi = application_processor

    def accepts_ipi(self, ipi: smp.Ipi, source: EmulateVcpu | None) -> bool:
        """``ipi`` from ``source`` (None: the I/O APIC) names this vCPU."""
        model = self._apic
        apic_id = model.apic_id if model is not None else self.index
        ldr = model.logical_id if model is not None else 0
        return ipi.reaches(source is self, apic_id, ldr)

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
        elif ipi.mode == lapic.APIC_MODE_INIT and self.index != 0 and self._engine is None:
            self._awaiting_sipi, self._sipi_vector = True, None
        elif (ipi.mode == lapic.APIC_MODE_STARTUP and self._awaiting_sipi
              and self._sipi_vector is None):
            self._sipi_vector = ipi.vector
            self._wake.set()
        # NMI, SMI and INIT to a running vCPU are not modelled: Linux sends them only to
        # report a lockup or to restart a CPU.

    def _await_sipi(self) -> VcpuExit | None:
        """Block until a STARTUP IPI (then start in real mode at vector * 4 KiB, CS = vector
        << 8, IP = 0: SDM 8.4.4.1) or a stop request."""
        while self._sipi_vector is None:
            if self._stop.is_set():
                return Interrupted()
            self._wake.wait(HALT_POLL_SECONDS)
            self._wake.clear()
        vector = self._sipi_vector
        start = reset_sregs(self.index)
        self.set_sregs(replace(start, cs=replace(start.cs, selector=vector << 8,
                                                  base=vector << 12),
                               apic_base=self._sregs.apic_base))
        self.set_regs(replace(reset_regs(), rip=0))
        self._awaiting_sipi = False
        return None

    # --- interrupts from devices and the APIC timer (any thread) --------------------------

    def raise_interrupt(self, vector: int) -> None:
        """A fixed interrupt for this vCPU's local APIC (from the I/O APIC)."""
        if self._apic is not None:
            self._apic.raise_vector(vector)

    def _new_apic(self, page: Lapic) -> apic.LocalApic:
        model = apic.LocalApic(page, cpuid.CRYSTAL_HZ)
        model.on_change = self._interrupt_changed
        if self._route_ipi is not None:
            route = self._route_ipi
            model.on_ipi = lambda low, high: route(self, low, high)
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

    def _run_burst(self, engine: Engine) -> VcpuExit | None:
        """Emulate until something stops unicorn; the exit it means, or None to go on."""
        self._exit, self._vector, self._unmapped, self._kicked = None, None, None, False
        if self._cpu_lock is not None:
            self._cpu_lock.acquire(self._kick)  # after any other vCPU that asked first
        try:
            with self._lock:
                if self._stop.is_set():
                    return Interrupted()
                self._burst += 1
                self._emulating = self._burst
            if not self._system_cpu and self._apic is not None and \
                    self._apic.pending() is not None:
                # Pending already: either it waits for RFLAGS.IF (a retry is set) or it came
                # after _between_bursts looked, when a kick would have been dropped (nothing
                # ran): have the alarm thread kick this burst.
                self._retry_kick(INTERRUPT_WINDOW_SECONDS)
            error: Exception | None = None
            try:
                engine.run(0 if self._kicker is not None else BURST_INSTRUCTIONS)
            except UcError as e:
                if getattr(e, "errno", None) != native.KICK_ERROR:
                    error = e
                else:  # the kick ended the burst (_kicked says so), unless a hook failed too:
                    # the binding raises the status before the hook's exception.
                    failed = getattr(engine.uc, "_hook_exception", None)
                    if failed is not None:
                        raise BackendError(f"emulate backend hook failed: {failed!r}") from failed
            except Exception as e:  # a hook failed; unicorn re-raises it after stopping
                raise BackendError(f"emulate backend hook failed: {e!r}") from e
            finally:
                with self._lock:
                    self._emulating = 0
        finally:
            if self._cpu_lock is not None:
                self._cpu_lock.release()
        if self._callback_error is not None:
            failed, self._callback_error = self._callback_error, None
            raise BackendError(f"emulate backend callback failed: {failed!r}") from failed
        if self._system is not None and self._system.take_shutdown():
            return Shutdown("triple fault")  # KVM reports KVM_EXIT_SHUTDOWN
        if self._reset_flag is not None and (self._reset_seen or self._reset_flag.value):
            # QEMU saw a triple fault (native.reset_request); KVM reports KVM_EXIT_SHUTDOWN.
            self._reset_seen = False
            return Shutdown("triple fault")
        if self._exit is not None:
            if isinstance(self._exit, IoIn) and self._in_undo is not None:
                engine.restore_io_registers(self._in_undo)  # replayed by the next run
                self._in_undo = None
            return self._exit
        if self._vector is not None:
            return self._deliver_exception(self._vector)
        if error is not None:
            return self._engine_error(error)
        if self._stop.is_set() or self._kicked:
            return None  # _between_bursts decides
        # HLT: unicorn has no HLT hook and returns with the PC past it; CPUState.halted says it
        # was HLT and not the end of a counted burst. With interrupts on, the vCPU waits for
        # one (_between_bursts); with them off it is done.
        if self._halted_flag.value:
            if self._apic is not None and self._interrupts_enabled():
                self._halted = True
                return None
            return Halt()
        return None

    def _deliver_exception(self, vector: int) -> VcpuExit:
        """An exception the hooks could not deliver (the run stopped there): a triple fault when
        no gate was usable, as on a CPU (faults.py), else what made delivery impossible."""
        problem, self._undeliverable = self._undeliverable, ""
        sregs = self.get_sregs()
        outcome = faults.escalate(
            vector, lambda v: descriptors.gate_problem(self._memory, sregs, v),
            descriptors.not_present)
        if outcome.delivered is None:
            return Shutdown("triple fault")
        return InternalError(problem or f"{faults.vector_name(vector)} could not be delivered "
                             f"through the guest IDT in {cpu_mode_name(sregs)} mode")

    def _write_sregs(self, engine: Engine, sregs: Sregs) -> None:
        engine.write_sregs(sregs)
        self._native_cpu(engine.uc).load_segments(sregs)

    def _code64(self, engine: Engine) -> bool:
        """The vCPU runs 64-bit code now (the instance may be in 32-bit or real mode)."""
        return self._native_cpu(engine.uc).code64

    def _deliver_now(self, uc: Any, vector: int) -> bool:
        """Deliver the exception in flight through the guest IDT, from inside a hook, as the CPU
        would (native.py); False when that cannot be done safely (the run then stops)."""
        engine = self._engine
        if engine is None or not self._code64(engine):
            return False  # 64-bit IDT delivery only; other modes stop as before
        native = self._native_cpu(uc)
        s = self.get_sregs()
        rip = engine.pc()
        length = 0
        if native.software:
            before = descriptors.read_linear(self._memory, s, rip - 2, 2) or b""
            length = 2 if before[:1] == b"\xcd" else 1
        decision = delivery.decide(self._memory, s, s.cs.selector & 0x3,
                                   int(uc.reg_read(x86.UC_X86_REG_RSP)), vector,
                                   native.software, length)
        if decision.problem:
            self._undeliverable = decision.problem
            native.forget()
            return False
        if decision.rewind:
            native.set_rip(rip - decision.rewind)
        if decision.vector == vector and decision.error_code is None:
            native.deliver()
        else:
            native.deliver_instead(decision.vector, decision.error_code or 0)
        name = faults.vector_name(decision.vector)
        self._hook_events[name] = self._hook_events.get(name, 0) + 1
        return True

    def _engine_error(self, error: Exception) -> VcpuExit:
        errno = getattr(error, "errno", None)
        if errno == uc_const.UC_ERR_INSN_INVALID:
            return self._deliver_exception(VECTOR_UD)  # unicorn reports #UD as this error
        if errno in UNMAPPED_ERRORS and self._unmapped is not None:
            kind, address = self._unmapped
            return InternalError(
                f"{kind} at guest-physical {address:#x}, outside guest RAM (the emulate backend "
                "has no MMIO devices)"
            )
        return InternalError(f"unicorn stopped: {error}")

    def _start(self) -> Engine:
        engine = Engine(self._memory)  # set_sregs refused what it cannot run
        # Hooks before anything runs: unicorn does not retranslate code for a later hook.
        engine.add_hook(uc_const.UC_HOOK_INSN, self._on_out, x86.UC_X86_INS_OUT)
        engine.add_hook(uc_const.UC_HOOK_INSN, self._on_in, x86.UC_X86_INS_IN)
        engine.add_hook(uc_const.UC_HOOK_INSN, self._on_cpuid, x86.UC_X86_INS_CPUID)
        if SystemCpu.available():
            # The engine delivers exceptions, INT n and SYSCALL itself, in the CPU loop, and
            # takes interrupts on its INTR line, acknowledged by the local APIC model.
            self._system = SystemCpu(engine.uc)
            self._system.enable(self._acknowledge)
            self._system_cpu = True
        else:  # the wheel: the Python path below does it, from hooks and between bursts
            engine.add_hook(uc_const.UC_HOOK_INSN, self._on_syscall, x86.UC_X86_INS_SYSCALL)
            engine.add_hook(uc_const.UC_HOOK_INTR, self._on_interrupt)
            engine.add_hook(uc_const.UC_HOOK_INSN_INVALID, self._on_invalid)
        # Only where no RAM is: a memory hook that covers a page keeps every store to it on
        # unicorn's slow path (uc_mem_hook_installed in notdirty_write; measured: ~45% of a
        # Linux boot's time went to those stores while this hook covered everything).
        for first, last in engine.outside_ram():
            engine.add_hook(uc_const.UC_HOOK_MEM_UNMAPPED, self._on_unmapped, begin=first,
                            end=last)
        # The local APIC (xAPIC page) and the I/O APIC as MMIO: reads and writes call the
        # models, through the guest's paging (measured: ~1 us per access).
        self._apic = self._new_apic(self._lapic)
        model = self._apic
        engine.uc.mmio_map(apic.APIC_BASE, apic.MMIO_SIZE,
                           lambda uc, off, size, _: model.read(off, size), None,
                           lambda uc, off, size, value, _: model.write(off, size, value),
                           None)
        ioapic = self._ioapic
        if ioapic is not None:
            engine.uc.mmio_map(apic.IOAPIC_BASE, apic.MMIO_SIZE,
                               lambda uc, off, size, _: ioapic.read(off, size), None,
                               lambda uc, off, size, value, _: ioapic.write(off, size, value),
                               None)
        self._alarm_thread = threading.Thread(target=self._alarm_loop, daemon=True,
                                              name=f"vcpu{self.index}-apic")
        self._write_sregs(engine, self._sregs)  # guest memory (GDT, page tables) is there
        engine.write_regs(self._regs)
        engine.write_fpu(self._fpu)
        for index, value in self._msrs.items():
            engine.write_msr(index, value)
        if PostedPorts.available():
            posted = PostedPorts(engine.uc)
            for port, (read, queue) in self._posts.items():
                posted.post(port, read, queue)
            with self._lock:
                self._posted = posted
        self._halted_flag = native.halted_flag(engine.uc)
        if self._system is None:  # the engine reports a triple fault itself (take_shutdown)
            self._reset_flag = native.reset_request(engine.uc)
        if self._io_read is not None:
            # Port I/O completes inside the hooks, so nothing needs a stop in mid-block: turn
            # unicorn's mid-block stop checks off, and let the alarm thread end a running
            # burst at a block start (native.Kick).
            native.exit_checks_at_block_start_only(engine.uc)
            self._kicker = native.Kick(engine.uc)
        self._engine = engine
        if self._alarm_thread is not None:
            self._alarm_thread.start()
        return engine

    # --- posted port I/O (vcpu.PostedPortIo) -----------------------------------------------

    def can_post(self) -> bool:
        return PostedPorts.available()

    def post_port(self, port: int, read: int | None, queue: bool) -> bool:
        if not PostedPorts.available():
            return False
        with self._lock:
            self._posts[port] = (read, queue)
            if self._posted is not None:
                self._posted.post(port, read, queue)
        return True

    def collect_posted(self) -> list[tuple[int, bytes]]:
        with self._lock:
            return self._posted.collect() if self._posted is not None else []

    def posted_reads(self) -> int:
        with self._lock:
            return self._posted.reads() if self._posted is not None else self._posted_reads

    # --- hooks (called by unicorn on the vCPU thread, inside emu_start) ------------------

    def attach_io(self, read: Callable[[int, int], int],
                  write: Callable[[int, int, int], None]) -> None:
        """Complete port I/O inside the instruction hooks with these device handlers instead of
        returning IoIn/IoOut exits (an optional capability the machine uses where a backend
        offers it). Without exits nothing needs a stop in mid-block: the guest runs without
        unicorn's per-instruction hook, and interrupts stop a running burst (``_kick``)."""
        self._io_read, self._io_write = read, write

    def _on_out(self, uc: Any, port: int, size: int, value: int, _: object) -> None:
        if self._io_write is not None:
            self._io_write(port, size, value & ((1 << 8 * size) - 1))
            return
        self._exit = IoOut(port, size, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
        uc.emu_stop()  # after this instruction, as the engine runs with per-instruction checks

    def _on_in(self, uc: Any, port: int, size: int, _: object) -> int:
        if self._io_read is not None:
            return self._io_read(port, size) & ((1 << 8 * size) - 1)
        reply = self._in_reply
        if reply is not None and reply[0] == port:
            self._in_reply = None
            return reply[1]  # the replay: the value complete_io_in gave
        assert self._engine is not None
        self._in_undo = self._engine.io_registers()
        self._exit = IoIn(port, size)
        uc.emu_stop()
        return (1 << 8 * size) - 1  # discarded: the instruction is undone and replayed

    def _on_cpuid(self, uc: Any, _: object) -> int:
        """Answer from the VMM's table (cpuid.answer, once per leaf and subleaf) with the
        OS-state bits of CR4, through the CPU state in place: ~3 us, where the binding's register
        calls took 17 us (a Linux boot runs ~1,100 CPUIDs)."""
        native = self._native_cpu(uc)
        gprs = native.gprs
        leaf, subleaf = gprs[R_EAX] & 0xFFFF_FFFF, gprs[R_ECX] & 0xFFFF_FFFF
        key = (leaf, subleaf)
        result = self._cpuid_answers.get(key)
        if result is None:
            result = self._cpuid_answers[key] = cpuid.answer(self._cpuid, leaf, subleaf)
        # CPUID writes the 32-bit registers, which clears bits 63:32 (SDM vol. 1 3.4.1.1).
        (gprs[R_EAX], gprs[R_EBX], gprs[R_ECX], gprs[R_EDX]) = cpuid.with_os_bits(
            leaf, subleaf, result, native.crs[4])
        return 1  # skip unicorn's own CPUID

    def _on_syscall(self, uc: Any, _: object) -> None:
        """SYSCALL in 64-bit mode as the SDM defines it (vol. 2B): unicorn only calls this hook
        and then adds the instruction's 2 bytes to RIP, so RIP is set to LSTAR - 2 here."""
        engine = self._engine
        assert engine is not None
        if not self._code64(engine):
            return  # not a 64-bit kernel's entry; unicorn's NOP stands
        rip = engine.pc()
        rflags = int(uc.reg_read(x86.UC_X86_REG_RFLAGS))
        uc.reg_write(x86.UC_X86_REG_RCX, rip + 2)
        uc.reg_write(x86.UC_X86_REG_R11, rflags & ~RFLAGS_RF)
        uc.reg_write(x86.UC_X86_REG_RFLAGS,
                     rflags & ~engine.read_msr(msr.MSR_SYSCALL_MASK) & ~RFLAGS_RF)
        self._native_cpu(uc).enter_kernel((engine.read_msr(msr.MSR_STAR) >> 32) & 0xFFFF)
        self._native_cpu(uc).set_rip(engine.read_msr(msr.MSR_LSTAR) - 2)

    def _on_interrupt(self, uc: Any, vector: int, _: object) -> None:
        # Every exception but #UD, and INT n: delivered here and the guest goes on, or the
        # run stops and _deliver_exception says why.
        if not self._deliver_now(uc, vector):
            self._vector = vector
            uc.emu_stop()

    def _on_invalid(self, uc: Any, _: object) -> bool:
        # unicorn reports #UD here, not to the interrupt hook; False makes emu_start fail with
        # UC_ERR_INSN_INVALID, which _engine_error turns into the same decision.
        return self._deliver_now(uc, VECTOR_UD)

    def _on_unmapped(self, uc: Any, access: int, address: int, size: int, value: int,
                     _: object) -> bool:
        self._unmapped = (UNMAPPED_ACCESS.get(access, "access"), address)
        return False  # not handled: emu_start fails with the matching UC_ERR_*_UNMAPPED

    # --- completing exits, stopping ------------------------------------------------------

    def complete_io_in(self, data: bytes) -> None:
        if not isinstance(self._exit, IoIn):
            return
        size = self._exit.size
        self._in_reply = (self._exit.port,
                          int.from_bytes(data[:size].ljust(size, b"\xff"), "little"))

    def complete_mmio_read(self, data: bytes) -> None:
        pass  # no MMIO exits: an access outside RAM is an InternalError

    def sample(self) -> None:
        """Record where the guest is (from any thread), without stopping it: unicorn's RIP as
        of the last block boundary or helper call, which is as precise as a profile needs."""
        with self._lock:  # close() drops the engine (and the memory cpu points into)
            cpu = self._native
            if cpu is not None and self._engine is not None:
                self.rip_samples[cpu.rip] += 1

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._kick()

    def _kick(self) -> None:
        """Make a running burst return soon (from any thread; attached port I/O only): the
        guest stops at the next block start, between two whole instructions (native.Kick).

        uc_emu_start clears what a kick sets when it begins, so a kick that lands between our
        "about to emulate" and that reset is lost; the alarm thread repeats the kick every
        KICK_RETRY_SECONDS until the burst is over (a thread per kick cost ~10% of a boot).
        """
        with self._lock:
            burst, kicker = self._emulating, self._kicker
            if self._engine is None or kicker is None:
                return  # a counted burst ends by itself soon
            if not burst:
                return  # between bursts: _run_burst looks at the APIC once it starts one
            self._kicked = True
            kicker()
            with self._alarm:  # (the alarm thread never takes _lock while it holds _alarm)
                self._kick_burst = max(self._kick_burst, burst)
                self._alarm.notify()

    def _watch_reset(self) -> None:
        """After a triple fault unicorn may spin inside emu_start with its CPU stopped
        (native.reset_request), deaf to kicks: clear the flag so the CPU loop runs on to the
        next block start, and kick; the burst then ends as a shutdown (_run_burst)."""
        with self._lock:
            flag = self._reset_flag
            if not self._emulating or flag is None or not flag.value:
                return
            self._reset_seen = True
            flag.value = False
        self._kick()

    def _kick_again(self, burst: int) -> bool:
        """Kick ``burst`` again if it still runs; False once it is over."""
        with self._lock:
            if self._emulating != burst or self._engine is None or self._kicker is None:
                return False
            self._kicker()
            return True

    def close(self) -> None:
        with self._alarm:
            self._closed = True
            self._alarm.notify()
        if self._alarm_thread is not None and self._alarm_thread.is_alive():
            self._alarm_thread.join()
        with self._lock, self._line:  # nothing may reach the closed instance's CPU after this
            if self._posted is not None:
                self._posted_reads = self._posted.reads()
            if self._system is not None:  # its counters live in the instance: keep them
                for name, count in self._engine_events().items():
                    self._hook_events[name] = self._hook_events.get(name, 0) + count
            self._engine, self._kicker, self._native, self._system = None, None, None, None
            self._posted = None
