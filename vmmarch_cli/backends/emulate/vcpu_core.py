"""What every part of the emulated vCPU shares: its state (VcpuCore.__init__), the constants
and the small helpers. The parts, by job: vcpu_state, vcpu_interrupts, vcpu_ports,
vcpu_stopping, and vcpu (the run loop and the hooks).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmmarch_cli.arch.x86_64 import msr, regs
from vmmarch_cli.backends.emulate import apic, cpuid, descriptors, faults, native, smp
from vmmarch_cli.backends.emulate.binding import uc_const
from vmmarch_cli.backends.emulate.engine import Engine
from vmmarch_cli.backends.emulate.library import DebugCpu, PostedPorts, SystemCpu
from vmmarch_cli.backends.emulate.native import NativeCpu
from vmmarch_cli.backends.emulate.reset import reset_lapic, reset_regs, reset_sregs
from vmmarch_cli.vcpu import (
    ATTR_DB,
    ATTR_L,
    CpuidEntry,
    Fpu,
    GuestDebug,
    HostMemory,
    Sregs,
    VcpuExit,
)

if TYPE_CHECKING:
    from vmmarch_cli.backends.emulate.vcpu import EmulateVcpu

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


class VcpuCore:
    def __init__(self, index: int, memory: HostMemory,
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
        self._nmi_raised = False  # an NMI came between bursts: run one (_raise_nmi)
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
        # What stops the vCPU for a debugger (set_guest_debug), applied by the engine (patch
        # 0011) once the instance exists.
        self._debug = GuestDebug()
        self._debug_cpu: DebugCpu | None = None
        self._hook_events: dict[str, int] = {}  # delivered by the Python path, by name
        # Posted port I/O (vcpu.PostedPortIo, the engine's patch 0010): what the VMM posted,
        # applied when the instance is made; under ``_lock`` with the instance.
        self._posts: dict[int, tuple[int | None, bool]] = {}
        self._posted: PostedPorts | None = None
        self._posted_reads = 0  # kept when the instance is closed
        self.rip_samples: Counter[int] = Counter()  # --profile (machine._sampler)

    def _native_cpu(self, uc: Any) -> NativeCpu:
        if self._native is None:
            self._native = NativeCpu(uc)
        return self._native

    def _write_sregs(self, engine: Engine, sregs: Sregs) -> None:
        engine.write_sregs(sregs)
        self._native_cpu(engine.uc).load_segments(sregs)

    def _engine_events(self) -> dict[str, int]:
        assert self._system is not None
        events: dict[str, int] = {}
        for (external, vector), count in self._system.delivered().items():
            # An external delivery through vector 2 is an NMI (patch 0013): a fixed interrupt
            # below 16 is an illegal vector the local APIC never raises (SDM 10.5.2).
            name = (f"interrupt {vector:#x}" if external and vector != faults.NMI
                    else faults.vector_name(vector))
            events[name] = events.get(name, 0) + count
        return events

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

    def _kick_again(self, burst: int) -> bool:
        """Kick ``burst`` again if it still runs; False once it is over."""
        with self._lock:
            if self._emulating != burst or self._engine is None or self._kicker is None:
                return False
            self._kicker()
            return True

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
