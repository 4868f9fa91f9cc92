"""An emulated vCPU behind the neutral ``Vcpu`` interface.

Until its first ``run`` the vCPU is only neutral state held here; ``run`` then makes the unicorn
instance in the mode that state asks for (unicorn cannot change mode later) and loads it. From
then on unicorn holds the registers, except what it cannot hold: the hidden part of CS/SS/DS/ES
(kept here, checked against the GDT), the TSC (unicorn drops writes), IA32_APIC_BASE, the LAPIC
page and the CPUID table (answered from here through an instruction hook).

Exits follow KVM's model: an OUT or IN stops the vCPU at that instruction and ``run`` returns
IoOut / IoIn. An OUT has completed when ``run`` returns; an IN is undone and replayed on the next
``run`` with the data ``complete_io_in`` gave, as KVM completes it on the next KVM_RUN.

This module holds the run loop and the hooks; the vCPU's other jobs are its parts, each a
module of its own over the shared state of vcpu_core: vcpu_state, vcpu_interrupts, vcpu_ports
and vcpu_stopping.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

from vmmarch_cli.arch.x86_64 import msr
from vmmarch_cli.backends.emulate import apic, cpuid, delivery, descriptors, faults, native
from vmmarch_cli.backends.emulate.binding import UcError, uc_const, x86
from vmmarch_cli.backends.emulate.engine import Engine
from vmmarch_cli.backends.emulate.library import DebugCpu, PostedPorts, SystemCpu
from vmmarch_cli.backends.emulate.native import R_EAX, R_EBX, R_ECX, R_EDX
from vmmarch_cli.backends.emulate.reset import reset_regs, reset_sregs
from vmmarch_cli.backends.emulate.vcpu_core import (
    BURST_INSTRUCTIONS,
    HALT_POLL_SECONDS,
    INTERRUPT_WINDOW_SECONDS,
    RFLAGS_IF,
    RFLAGS_RF,
    UNMAPPED_ACCESS,
    UNMAPPED_ERRORS,
    VECTOR_UD,
    cpu_mode_name,
)
from vmmarch_cli.backends.emulate.vcpu_ports import PortIo
from vmmarch_cli.backends.emulate.vcpu_snapshot import Snapshots
from vmmarch_cli.backends.emulate.vcpu_stopping import Stopping
from vmmarch_cli.errors import BackendError
from vmmarch_cli.vcpu import (
    Debug,
    GuestDebug,
    Halt,
    InternalError,
    Interrupted,
    IoIn,
    Shutdown,
    VcpuExit,
)


class EmulateVcpu(Snapshots, PortIo, Stopping):
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
            if self._stop.is_set():
                return Interrupted()
            if lapic is None or self._engine is None:
                return None
            lapic.tick(time.monotonic_ns())
            if self._nmi_raised:  # the engine's CPU takes it in the burst (patch 0013)
                self._nmi_raised = self._halted = False
                return None
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

    def _run_burst(self, engine: Engine) -> VcpuExit | None:
        """Emulate until something stops unicorn; the exit it means, or None to go on."""
        self._exit, self._vector, self._unmapped, self._kicked = None, None, None, False
        if self._cpu_lock is not None:
            self._cpu_lock.acquire(self._kick)  # after any other vCPU that asked first
        try:
            if self._translations_stale:
                # Checked with the CPU held: another vCPU writes code only while it holds the
                # CPU, so an IPI that came while this one waited for it is seen here.
                self._translations_stale = False  # before the flush: a new IPI sets it again
                engine.uc.ctl_flush_tb()
            with self._lock:
                if self._stop.is_set():
                    return Interrupted()
                self._burst += 1
                self._emulating = self._burst
                self._nmi_raised = False  # an NMI requested so far is taken in this burst
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
        if self._debug_cpu is not None and self._debug_cpu.take_stop():
            watch = self._debug_cpu.watch_hit(self._debug.watchpoints)
            return Debug(engine.pc(), breakpoint=watch is None and not self._debug.single_step,
                         watch=watch)
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
            if SystemCpu.reports_arch_capabilities():
                self._system.set_arch_capabilities(cpuid.ARCH_CAPABILITIES)
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
        if DebugCpu.available():
            self._debug_cpu = DebugCpu(engine.uc)
            if self._debug != GuestDebug():
                self._debug_cpu.set_debug(self._debug)
        self._halted_flag = native.halted_flag(engine.uc)
        if self._system is None:  # the engine reports a triple fault itself (take_shutdown)
            self._reset_flag = native.reset_request(engine.uc)
            # unicorn's CPU is "stopped" from its creation until the first emu_start resumes it
            # (cpus.c: qemu_init_vcpu, cpu_resume). Cleared now, as that resume would, so that
            # the alarm thread (_watch_reset) cannot take it for a triple fault in the moment
            # before the first burst starts: it did, on a busy machine (a kick repeated there).
            self._reset_flag.value = False
        if self._io_read is not None:
            # Port I/O completes inside the hooks, so nothing needs a stop in mid-block: turn
            # unicorn's mid-block stop checks off, and let the alarm thread end a running
            # burst at a block start (native.Kick).
            native.exit_checks_at_block_start_only(engine.uc)
            self._kicker = native.Kick(engine.uc)
        self._apply_restore(engine)  # a snapshot's state, when one was given (before the alarm)
        self._engine = engine
        if self._alarm_thread is not None:
            self._alarm_thread.start()
        return engine

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
