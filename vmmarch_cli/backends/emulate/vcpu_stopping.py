"""Stopping the emulated vCPU from any thread (kicks, a triple fault's stuck CPU) and for a
debugger, sampling it, and closing it.
"""

from __future__ import annotations

from vmmarch_cli.backends.emulate.library import DebugCpu
from vmmarch_cli.backends.emulate.vcpu_core import VcpuCore
from vmmarch_cli.errors import BackendError
from vmmarch_cli.vcpu import GuestDebug

#: Why the wheel cannot stop for a debugger: it has no way in to QEMU's breakpoints and steps.
NEEDS_ENGINE = ("breakpoints and single steps need the vmm-arch CPU engine; this run uses "
                "the unicorn wheel (`vmm-arch engine` says why)")
NEEDS_WATCH = "watchpoints need the vmm-arch CPU engine with patch 0012"


class Stopping(VcpuCore):
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

    def clear_stop(self) -> None:
        self._stop.clear()

    def set_guest_debug(self, debug: GuestDebug) -> None:
        if debug == self._debug:
            return
        if debug.planted:  # the engine has breakpoints enough: a debugger never plants here
            raise BackendError("the emulate backend does not stop at planted int3s: its "
                               "breakpoints have no limit")
        if self._engine is None:  # applied when the instance is made (_start)
            if debug != GuestDebug() and not DebugCpu.available():
                raise BackendError(NEEDS_ENGINE)
        elif self._debug_cpu is None:
            if debug != GuestDebug():
                raise BackendError(NEEDS_ENGINE)
        elif not self._debug_cpu.set_debug(debug):
            self._debug_cpu.set_debug(self._debug)
            raise BackendError(NEEDS_WATCH)
        self._debug = debug

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
            engine = self._engine
            self._engine, self._kicker, self._native, self._system = None, None, None, None
            self._debug_cpu = None
            self._posted = None
            if engine is not None:
                engine.close()
