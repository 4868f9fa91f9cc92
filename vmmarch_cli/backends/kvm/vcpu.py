"""A KVM vCPU behind the neutral ``Vcpu`` interface."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from vmmarch_cli.arch.x86_64 import fxsave
from vmmarch_cli.arch.x86_64.opcodes import OPCODE_FWAIT, OPCODE_INT3
from vmmarch_cli.arch.x86_64.regs import (
    DEBUG_ADDRESS_REGISTERS,
    DR6_BREAKPOINT_HITS,
    dr7_execute_breakpoints,
)
from vmmarch_cli.backends.kvm import abi, convert, snapshot
from vmmarch_cli.backends.kvm.emulation import (
    SoftwareEvent,
    decode_software_event,
    fwait_event,
)
from vmmarch_cli.backends.kvm.system import checked, raw_ioctl
from vmmarch_cli.errors import BackendError
from vmmarch_cli.vcpu import (
    LAPIC_PAGE_SIZE,
    CpuidEntry,
    Debug,
    Fpu,
    GuestDebug,
    Halt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    Lapic,
    MmioRead,
    MmioWrite,
    MsrEntry,
    Regs,
    Shutdown,
    Sregs,
    Unknown,
    VcpuExit,
)

#: The signal that kicks a vCPU thread out of KVM_RUN (a no-op handler is installed for it).
KICK_SIGNAL = signal.SIGUSR1

# The XSAVE header's XSTATE_BV, after the legacy (FXSAVE) region (SDM vol. 1 13.4.2).
XSAVE_XSTATE_BV = 512
XFEATURE_X87_SSE = 0x3


def install_kick_handler() -> None:
    """Make KICK_SIGNAL interrupt KVM_RUN instead of killing the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        signal.siginterrupt(KICK_SIGNAL, True)


def _fxsave_of(f: abi.kvm_fpu) -> fxsave.Fxsave:
    """KVM_GET_FPU's struct kvm_fpu as an FXSAVE image (the same fields, another order)."""
    image = fxsave.Fxsave()
    image.fcw, image.fsw, image.ftw, image.mxcsr = f.fcw, f.fsw, f.ftwx, f.mxcsr
    ctypes.memmove(image.st, f.fpr, ctypes.sizeof(image.st))
    ctypes.memmove(image.xmm, f.xmm, ctypes.sizeof(image.xmm))
    return image


class KvmVcpu:
    def __init__(self, index: int, fd: int, mmap_size: int, has_xsave: bool,
                 has_xcrs: bool = False,
                 snapshot_msrs: Callable[[], list[int]] = list) -> None:
        self.index = index
        self._fd = fd
        self._has_xcrs = has_xcrs
        self._snapshot_msrs = snapshot_msrs  # the MSRs a snapshot keeps (KVM's index list)
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # from_address, not from_buffer: a buffer export would make close() fail while any
        # frame (a traceback, a finished thread's) still holds the structure.
        anchor = ctypes.c_char.from_buffer(self._map)
        self._run: abi.kvm_run | None = abi.kvm_run.from_address(ctypes.addressof(anchor))
        del anchor
        self._has_xsave = has_xsave
        self._pending_in: tuple[int, int] | None = None  # (offset in kvm_run, length)
        self._pending_mmio = False
        self._stop = threading.Event()
        self._thread_id: int | None = None
        self._debug = GuestDebug()
        # A single step did port or MMIO I/O: KVM reported the I/O exit instead of the debug
        # exit, and completing the I/O is the rest of the step (the next run).
        self._step_io = False
        #: Software interrupts the hypervisor could not emulate and we injected, by mnemonic.
        self.injected_events: Counter[str] = Counter()
        #: Guest RIPs seen by ``sample()`` kicks, for ``--profile``.
        self.rip_samples: Counter[int] = Counter()
        self._sample = threading.Event()

    @property
    def run_struct(self) -> abi.kvm_run:
        if self._run is None:
            raise BackendError(f"vCPU {self.index} is closed")
        return self._run

    # --- state -------------------------------------------------------------------------

    def get_regs(self) -> Regs:
        k = abi.kvm_regs()
        checked(self._fd, abi.KVM_GET_REGS, k, "KVM_GET_REGS")
        return convert.regs_from_kvm(k)

    def set_regs(self, regs: Regs) -> None:
        checked(self._fd, abi.KVM_SET_REGS, convert.regs_to_kvm(regs), "KVM_SET_REGS")

    def _kvm_sregs(self) -> abi.kvm_sregs:
        k = abi.kvm_sregs()
        checked(self._fd, abi.KVM_GET_SREGS, k, "KVM_GET_SREGS")
        return k

    def get_sregs(self) -> Sregs:
        return convert.sregs_from_kvm(self._kvm_sregs())

    def set_sregs(self, sregs: Sregs) -> None:
        """One KVM_SET_SREGS, for a vCPU being set up (not yet run): the interrupt bitmap goes
        in empty, as nothing can be pending before the first KVM_RUN."""
        k = convert.sregs_to_kvm(sregs, abi.kvm_sregs())
        checked(self._fd, abi.KVM_SET_SREGS, k, "KVM_SET_SREGS")

    def get_fpu(self) -> Fpu:
        """From the XSAVE area's legacy region where offered, else KVM_GET_FPU."""
        if self._has_xsave:
            x = abi.kvm_xsave()
            checked(self._fd, abi.KVM_GET_XSAVE, x, "KVM_GET_XSAVE")
            return fxsave.to_fpu(fxsave.Fxsave.from_buffer(x))
        f = abi.kvm_fpu()
        checked(self._fd, abi.KVM_GET_FPU, f, "KVM_GET_FPU")
        return fxsave.to_fpu(_fxsave_of(f))

    def set_fpu(self, fpu: Fpu) -> None:
        """Through KVM_SET_XSAVE where offered: KVM_SET_FPU ignores kvm_fpu.mxcsr upstream, and
        the XSAVE area's legacy region holds the whole x87 and SSE state (one write sets it)."""
        if not self._has_xsave:
            f = abi.kvm_fpu()
            checked(self._fd, abi.KVM_GET_FPU, f, "KVM_GET_FPU")
            image = _fxsave_of(f)
            fxsave.fill(image, fpu)
            f.fcw, f.fsw, f.ftwx, f.mxcsr = image.fcw, image.fsw, image.ftw, image.mxcsr
            ctypes.memmove(f.fpr, image.st, ctypes.sizeof(f.fpr))
            ctypes.memmove(f.xmm, image.xmm, ctypes.sizeof(f.xmm))
            checked(self._fd, abi.KVM_SET_FPU, f, "KVM_SET_FPU")
            return
        x = abi.kvm_xsave()
        checked(self._fd, abi.KVM_GET_XSAVE, x, "KVM_GET_XSAVE")
        fxsave.fill(fxsave.Fxsave.from_buffer(x), fpu)
        xstate_bv = ctypes.c_uint8.from_buffer(x, XSAVE_XSTATE_BV)
        xstate_bv.value |= XFEATURE_X87_SSE  # else the CPU loads x87/SSE init state
        checked(self._fd, abi.KVM_SET_XSAVE, x, "KVM_SET_XSAVE")

    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]:
        header, entries = abi.msrs_buffer(len(indices))
        for e, index in zip(entries, indices, strict=True):
            e.index = index
        n = checked(self._fd, abi.KVM_GET_MSRS, header, "KVM_GET_MSRS")
        return [MsrEntry(entries[i].index, entries[i].data) for i in range(n)]

    def set_msrs(self, msrs: Sequence[MsrEntry]) -> None:
        header, entries = abi.msrs_buffer(len(msrs))
        pack, size = abi.KVM_MSR_ENTRY.pack_into, abi.KVM_MSR_ENTRY.size
        for i, m in enumerate(msrs):  # one C call per entry instead of two setattr
            pack(entries, i * size, m.index, m.value)
        n = checked(self._fd, abi.KVM_SET_MSRS, header, "KVM_SET_MSRS")
        if n != len(msrs):
            # KVM stops at the first MSR it refuses and returns how many it set.
            bad = msrs[n]
            raise BackendError(
                f"KVM_SET_MSRS set {n} of {len(msrs)} MSRs: it refused MSR {bad.index:#x} "
                f"= {bad.value:#x}"
            )

    def get_cpuid(self) -> list[CpuidEntry]:
        header, entries = abi.cpuid_buffer(256)
        checked(self._fd, abi.KVM_GET_CPUID2, header, "KVM_GET_CPUID2")
        return [cpuid_from_kvm(entries[i]) for i in range(header.nent)]

    def set_cpuid(self, cpuid: Sequence[CpuidEntry]) -> None:
        header, entries = abi.cpuid_buffer(len(cpuid))
        pack, size = abi.KVM_CPUID_ENTRY2.pack_into, abi.KVM_CPUID_ENTRY2.size
        flag = abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        for i, e in enumerate(cpuid):  # one C call per entry instead of nine setattr
            pack(entries, i * size, e.function, e.index, flag if e.indexed else 0,
                 e.eax, e.ebx, e.ecx, e.edx)
        checked(self._fd, abi.KVM_SET_CPUID2, header, "KVM_SET_CPUID2")

    def get_lapic(self) -> Lapic:
        k = abi.kvm_lapic_state()
        checked(self._fd, abi.KVM_GET_LAPIC, k, "KVM_GET_LAPIC")
        return Lapic(bytes(k)[:LAPIC_PAGE_SIZE])

    def set_lapic(self, lapic: Lapic) -> None:
        k = abi.kvm_lapic_state.from_buffer_copy(lapic.page.ljust(abi.KVM_APIC_REG_SIZE, b"\0"))
        checked(self._fd, abi.KVM_SET_LAPIC, k, "KVM_SET_LAPIC")

    # --- snapshots (vcpu.SnapshotVcpu; snapshot.py) ------------------------------------

    def save_state(self) -> bytes:
        """Everything KVM holds of this vCPU, which does not run now. An exit's port or MMIO
        access is completed first, as KVM_RUN with immediate_exit does it (api.rst 4.2: KVM
        finishes the instruction before it returns EINTR), so the state is between
        instructions."""
        self._complete_exit_io(self.run_struct)
        return snapshot.save_vcpu(self._fd, self._has_xsave, self._has_xcrs,
                                  self._snapshot_msrs())

    def restore_state(self, data: bytes) -> None:
        snapshot.restore_vcpu(self._fd, self._has_xsave, data, self.index)

    # --- running -----------------------------------------------------------------------

    def run(self) -> VcpuExit:
        """KVM_RUN until an exit the caller must see. The hot path is one libc call and one
        field read: a stop request needs no check here, because it sets kvm_run.immediate_exit,
        which makes KVM_RUN return EINTR at once (KVM_CAP_IMMEDIATE_EXIT is required)."""
        run = self.run_struct
        fd = self._fd
        if self._step_io:
            return self._finish_step_io(run)
        self._thread_id = threading.get_ident()
        try:
            while True:
                if raw_ioctl(fd, abi.KVM_RUN, None) < 0:
                    exit_ = self._run_failed(ctypes.get_errno())
                    if exit_ is None:
                        continue
                    return exit_
                reason = run.exit_reason
                if reason == abi.KVM_EXIT_IO:
                    self._step_io = self._debug.single_step
                    return self._io_exit(run)
                exit_ = self._other_exit(run, reason)
                if exit_ is not None:
                    self._step_io = self._debug.single_step and \
                        isinstance(exit_, MmioRead | MmioWrite)
                    return exit_
        finally:
            self._thread_id = None

    def _finish_step_io(self, run: abi.kvm_run) -> VcpuExit:
        """The rest of a step that did I/O: KVM_RUN with immediate_exit completes the I/O
        and returns at once (EINTR), with RIP after the instruction, where the step ends
        (a plain KVM_RUN would run one more instruction first)."""
        self._step_io = False
        self._complete_exit_io(run)
        return Debug(self.get_regs().rip, breakpoint=False)

    def _complete_exit_io(self, run: abi.kvm_run) -> None:
        """KVM_RUN with immediate_exit: KVM completes the last exit's port or MMIO access and
        returns at once (EINTR), without running the guest further."""
        run.immediate_exit = 1
        raw_ioctl(self._fd, abi.KVM_RUN, None)  # EINTR by design
        if not self._stop.is_set():  # a stop request keeps it set
            run.immediate_exit = 0

    def _run_failed(self, err: int) -> VcpuExit | None:
        if err not in (errno.EINTR, errno.EAGAIN):
            raise BackendError(f"KVM_RUN failed: {os.strerror(err)} (errno {err})")
        if self._stop.is_set():
            return Interrupted()
        if self._sample.is_set():
            self._sample.clear()
            self.rip_samples[self.get_regs().rip] += 1
        return None

    def _other_exit(self, run: abi.kvm_run, reason: int) -> VcpuExit | None:
        """Every exit but port I/O; None means: handled here, run again."""
        if reason == abi.KVM_EXIT_MMIO:
            m = run.exit.mmio
            if m.is_write:
                return MmioWrite(m.phys_addr, bytes(m.data)[: m.len])
            self._pending_mmio = True
            return MmioRead(m.phys_addr, m.len)
        if reason == abi.KVM_EXIT_DEBUG:
            hit = bool(run.exit.debug.dr6 & DR6_BREAKPOINT_HITS)
            return Debug(self.get_regs().rip, breakpoint=hit)
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            return self._internal_error(run)
        if reason == abi.KVM_EXIT_HLT:
            return Halt()
        if reason == abi.KVM_EXIT_SHUTDOWN:
            return Shutdown("triple fault")
        if reason == abi.KVM_EXIT_INTR:
            return Interrupted() if self._stop.is_set() else None
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            code = run.exit.fail_entry.hardware_entry_failure_reason
            return InternalError(f"VM entry failed (hardware reason {code:#x})")
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            kind = run.exit.system_event.type
            if kind == abi.KVM_SYSTEM_EVENT_RESET:
                return Shutdown("reset")
            return Shutdown(f"system event {kind}")
        return Unknown(f"KVM exit reason {reason}")

    def _io_exit(self, run: abi.kvm_run) -> VcpuExit:
        io = run.exit.io
        length = io.size * io.count
        if io.direction == abi.KVM_EXIT_IO_OUT:
            start = io.data_offset
            return IoOut(io.port, io.size, self._map[start : start + length])
        self._pending_in = (io.data_offset, length)
        return IoIn(io.port, io.size, io.count)

    def _internal_error(self, run: abi.kvm_run) -> VcpuExit | None:
        """Inject the software interrupts the emulator rejects; anything else is a fault."""
        internal = run.exit.internal
        if internal.suberror != abi.KVM_INTERNAL_ERROR_EMULATION:
            return InternalError(f"KVM internal error, suberror {internal.suberror}")
        failure = run.exit.emulation_failure
        insn = b""
        has_bytes = failure.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        if failure.ndata >= 3 and has_bytes:
            insn = bytes(failure.insn_bytes)[: min(failure.insn_size, 15)]
        if insn[:1] == bytes((OPCODE_INT3,)) and self._debug.planted:
            rip = self.get_regs().rip  # on the int3 (measured: this KVM does not move it)
            if rip in self._debug.planted:
                return Debug(rip, breakpoint=True)
        event = decode_software_event(insn)
        if event is None and insn[:1] == bytes((OPCODE_FWAIT,)):
            fpu = abi.kvm_fpu()
            checked(self._fd, abi.KVM_GET_FPU, fpu, "KVM_GET_FPU")
            event = fwait_event(fpu.fsw)
        if event is None:
            return InternalError("KVM could not emulate an instruction", insn)
        self._complete(event)
        return None

    def _complete(self, event: SoftwareEvent) -> None:
        """Step past the instruction and inject what it raises.

        The hypervisor pushes the current RIP for an injected event, so RIP moves first: the
        handler's iretq then resumes after the instruction, as on hardware.
        """
        if event.length:
            regs = self.get_regs()
            self.set_regs(Regs(**{**regs.__dict__, "rip": regs.rip + event.length}))
        self.injected_events[event.mnemonic] += 1
        if event.vector is None:
            return
        events = abi.kvm_vcpu_events()
        checked(self._fd, abi.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        if event.exception:
            events.exception.injected = 1
            events.exception.nr = event.vector
            events.exception.has_error_code = 0
        else:
            events.interrupt.injected = 1
            events.interrupt.nr = event.vector
            events.interrupt.soft = 1
        events.flags = 0
        checked(self._fd, abi.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def complete_io_in(self, data: bytes) -> None:
        if self._pending_in is None:
            return
        offset, length = self._pending_in
        self._map[offset : offset + length] = data[:length].ljust(length, b"\xff")
        self._pending_in = None

    def complete_mmio_read(self, data: bytes) -> None:
        if not self._pending_mmio:
            return
        m = self.run_struct.exit.mmio
        for i in range(m.len):
            m.data[i] = data[i] if i < len(data) else 0xFF
        self._pending_mmio = False

    def clear_stop(self) -> None:
        self._stop.clear()
        run = self._run
        if run is not None:
            run.immediate_exit = 0

    def set_guest_debug(self, debug: GuestDebug) -> None:
        """KVM_SET_GUEST_DEBUG: breakpoints in the debug registers (a software breakpoint,
        int3, ends in an internal error on a ring-0-emulating KVM), single steps by KVM."""
        if debug.watchpoints:
            raise BackendError("the KVM backend has no watchpoints (on a KVM that emulates "
                               "guest ring 0, as here, data breakpoints never fire)")
        if len(debug.breakpoints) > DEBUG_ADDRESS_REGISTERS:
            raise BackendError(f"KVM breaks at {DEBUG_ADDRESS_REGISTERS} addresses at "
                               f"once (DR0-DR3), not {len(debug.breakpoints)}")
        k = abi.kvm_guest_debug()
        if debug.breakpoints or debug.single_step:
            k.control = abi.KVM_GUESTDBG_ENABLE
            if debug.single_step:
                k.control |= abi.KVM_GUESTDBG_SINGLESTEP
            if debug.breakpoints:
                k.control |= abi.KVM_GUESTDBG_USE_HW_BP
                for slot, address in enumerate(sorted(debug.breakpoints)):
                    k.debugreg[slot] = address
                k.debugreg[7] = dr7_execute_breakpoints(len(debug.breakpoints))
        checked(self._fd, abi.KVM_SET_GUEST_DEBUG, k, "KVM_SET_GUEST_DEBUG")
        self._debug = debug

    def request_stop(self) -> None:
        self._stop.set()
        run = self._run
        if run is not None:
            run.immediate_exit = 1
        thread_id = self._thread_id
        if thread_id is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(thread_id, KICK_SIGNAL)

    def sample(self) -> None:
        """Interrupt the running vCPU once to record where the guest is (from any thread)."""
        self._sample.set()
        thread_id = self._thread_id
        if thread_id is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(thread_id, KICK_SIGNAL)

    def close(self) -> None:
        """Unmap kvm_run and close the fd; once only (the VM closes its vCPUs again)."""
        if self._fd < 0:
            return
        self._run = None  # nothing may touch kvm_run once it is unmapped
        self._map.close()
        fd, self._fd = self._fd, -1
        os.close(fd)


def cpuid_from_kvm(k: abi.kvm_cpuid_entry2) -> CpuidEntry:
    return CpuidEntry(
        function=k.function, index=k.index, eax=k.eax, ebx=k.ebx, ecx=k.ecx, edx=k.edx,
        indexed=bool(k.flags & abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX),
    )
