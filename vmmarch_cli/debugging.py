"""A debugger's hold on a running VM, all-stop (gdb manual, "All-Stop Mode"): when one vCPU stops
for it (a breakpoint, a finished step) or the client interrupts (Ctrl-C), every vCPU stops; they
go on together, or one of them takes a single step while the others wait.

The debugger itself (the gdb stub, vmmarch_cli/gdb/) speaks to its client; this module only
pauses and resumes the vCPU threads of ``machine.run`` and hands the debugger each stop. The
main thread waits in ``DebugWait.wait`` instead of ``machine._wait``: on the guest's end, on a
vCPU's debug stop, and on the client's socket, all at once (a ``select``), so a step's round trip
costs no polling interval.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from vmmarch_cli.vcpu import Debug, GuestDebug, Vcpu, Watchpoint

#: How long a parked vCPU thread sleeps before it looks at the run's end again.
PARK_POLL_SECONDS = 0.05


class StopKind(StrEnum):
    BREAKPOINT = "breakpoint"
    WATCH = "watch"
    STEP = "step"
    INTERRUPT = "interrupt"  # the client's Ctrl-C
    ATTACH = "attach"  # before the guest's first instruction


@dataclass(frozen=True)
class DebugStop:
    vcpu: int  # the vCPU the stop is about (index)
    kind: StopKind
    watch: Watchpoint | None = None  # for WATCH: which watchpoint


@dataclass(frozen=True)
class Resumption:
    """How the debugger lets the guest go on: every vCPU runs, or ``step`` (a vCPU index) takes
    one instruction while the others wait; ``detach``: the debugger is gone for good."""

    debug: GuestDebug = field(default_factory=GuestDebug)  # single_step: set by ``step``
    step: int | None = None
    detach: bool = False


class Debugger(Protocol):
    def serve(self, stop: DebugStop) -> Resumption:
        """Tell the client about ``stop`` (for ATTACH: wait for it first) and answer it until
        it resumes the guest. Raises to end the run (gdb's kill)."""
        ...

    def sockets(self) -> list[int]:
        """What to watch while the guest runs (readable: call ``poll``)."""
        ...

    def poll(self) -> StopKind | None:
        """Read what made ``sockets`` readable: the stop the guest must make for the
        debugger (every vCPU stops, then ``serve`` is called), or None."""
        ...


class AllStop:
    """The vCPU threads' side. A vCPU runs only while it is runnable: with a debugger none is
    until the client first resumes; a stop (``debug_exit``, ``pause``) makes none runnable, and
    ``release`` makes all of them, or the one that steps, runnable again. A thread whose vCPU
    is not runnable parks (``park``)."""

    def __init__(self, vcpus: Sequence[Vcpu], done: threading.Event) -> None:
        self._vcpus = vcpus
        self._done = done
        self._cond = threading.Condition()
        self._parked: set[int] = set()
        self._runnable: set[int] = set()
        self.event: DebugStop | None = None
        self._wake_r, self._wake_w = os.pipe()

    @property
    def indices(self) -> set[int]:
        return {v.index for v in self._vcpus}

    @property
    def wake_fd(self) -> int:
        """Readable when a vCPU stopped for the debugger or the run ended."""
        return self._wake_r

    def wake(self) -> None:
        os.write(self._wake_w, b"\0")

    def drain(self) -> None:
        os.read(self._wake_r, 4096)

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    def runnable(self, vcpu: Vcpu) -> bool:
        return vcpu.index in self._runnable

    def debug_exit(self, vcpu: Vcpu, ex: Debug) -> None:
        """From a vCPU thread: its vCPU stopped for the debugger; every other one stops too."""
        kind = (StopKind.WATCH if ex.watch is not None else
                StopKind.BREAKPOINT if ex.breakpoint else StopKind.STEP)
        with self._cond:
            first = self.event is None
            if first:
                self.event = DebugStop(vcpu.index, kind, ex.watch)
        self.pause()
        if first:
            self.wake()

    def pause(self) -> None:
        with self._cond:
            self._runnable.clear()
        for v in self._vcpus:
            v.request_stop()

    def park(self, vcpu: Vcpu) -> None:
        """From a vCPU thread: wait until this vCPU is runnable again or the run ends."""
        with self._cond:
            self._parked.add(vcpu.index)
            self._cond.notify_all()
            while vcpu.index not in self._runnable and not self._done.is_set():
                self._cond.wait(PARK_POLL_SECONDS)
            self._parked.discard(vcpu.index)

    def wait_parked(self) -> bool:
        """Until every vCPU is parked (False: the run ended first)."""
        with self._cond:
            while not self.indices <= self._parked:
                if self._done.is_set():
                    return False
                self._cond.wait(PARK_POLL_SECONDS)
        return True

    def release(self, resumption: Resumption) -> None:
        """Let the vCPUs go on as ``resumption`` says: all of them, or the one that steps."""
        everyone = self.indices
        runners = everyone if resumption.step is None else {resumption.step} & everyone
        for v in self._vcpus:
            if v.index in runners:
                v.set_guest_debug(replace(resumption.debug,
                                          single_step=v.index == resumption.step))
                v.clear_stop()
        with self._cond:
            self.event = None
            self._runnable |= runners
            self._cond.notify_all()


class DebugWait:
    """The main thread's wait while a debugger holds the VM."""

    def __init__(self, debugger: Debugger, allstop: AllStop, deliver: Callable[[], None],
                 interval: float) -> None:
        self._debugger = debugger
        self._allstop = allstop
        self._deliver = deliver  # posted writes, so that the console streams meanwhile
        self._interval = interval

    def attach(self) -> None:
        """Before the vCPU threads start: the client connects and says how to begin."""
        self._resume(self._debugger.serve(DebugStop(0, StopKind.ATTACH)))

    def wait(self, done: threading.Event, timeout: float | None) -> bool:
        """Like machine._wait: True when the run ended, False when ``timeout`` passed (time
        spent stopped for the debugger does not count). A client may come, go and come back
        (after a detach, or when it did not wait) while the guest runs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if done.is_set():
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            wait = self._interval if remaining is None else min(self._interval, remaining)
            watched = [self._allstop.wake_fd, *self._debugger.sockets()]
            ready, _, _ = select.select(watched, [], [], wait)
            self._deliver()
            if self._allstop.wake_fd in ready:
                self._allstop.drain()
            if done.is_set():
                return True
            kind = None
            client = any(fd != self._allstop.wake_fd for fd in ready)
            if self._allstop.event is None and client:
                kind = self._debugger.poll()
                if kind is not None:
                    self._allstop.pause()
            if self._allstop.event is None and kind is None:
                continue
            began = time.monotonic()
            if not self._allstop.wait_parked():
                return True
            self._deliver()  # what the guest wrote before it stopped, before gdb looks
            stop = self._allstop.event or DebugStop(0, kind or StopKind.INTERRUPT)
            self._resume(self._debugger.serve(stop))
            if deadline is not None:
                deadline += time.monotonic() - began

    def _resume(self, resumption: Resumption) -> None:
        if resumption.detach:
            resumption = Resumption()  # no breakpoints, no step: the guest runs free
        self._allstop.release(resumption)
