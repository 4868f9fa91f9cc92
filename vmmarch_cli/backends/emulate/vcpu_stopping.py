"""Stopping the emulated vCPU from any thread (kicks, a triple fault's stuck CPU), sampling it,
and closing it.
"""

from __future__ import annotations

from vmmarch_cli.backends.emulate.vcpu_core import VcpuCore


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
