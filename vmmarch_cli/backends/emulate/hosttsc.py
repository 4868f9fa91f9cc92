"""The host's time-stamp counter, which the emulated CPU's RDTSC reads (unicorn returns the
host's TSC, measured on 2.1.4), and its rate, which the guest is told in CPUID leaf 15H.

The rate is the TSC's advance against CLOCK_MONOTONIC_RAW, the host kernel's clock from its own
TSC calibration, not slewed by NTP (CLOCK_MONOTONIC is: readings over 2-20 ms were 100-900 ppm
apart with it). Each end of the interval is the reading with the narrowest bracket of two clock
reads out of several, so a preemption between the reads cannot skew it; the TSC is read
directly (a four-instruction function, below), not through an emulator run, which alone took
~50 us. A guest told a rate that is off drifts by as much: 0.34% is 3 ms a second.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import time
from collections.abc import Callable

#: rdtsc (0F 31: EDX:EAX = TSC, SDM vol. 2B); shl rdx, 32 (48 C1 E2 20); or rax, rdx
#: (48 09 D0); ret (C3): the 64-bit TSC in RAX, as the System V ABI returns a uint64_t.
READ_TSC_CODE = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")
#: Readings per end of an interval; the one with the narrowest bracket counts.
TRIES = 16
CLOCK = time.CLOCK_MONOTONIC_RAW
NS = 1_000_000_000


class HostTsc:
    """Reads the host TSC by calling ``READ_TSC_CODE`` in an executable page of its own."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(READ_TSC_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self.read: Callable[[], int] = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)

    def sample(self) -> tuple[int, int]:
        """(nanoseconds, TSC) read as close together as this host allows: the midpoint of the
        narrowest of ``TRIES`` brackets."""
        read, clock = self.read, time.clock_gettime_ns
        best = (1 << 62, 0, 0)
        for _ in range(TRIES):
            before = clock(CLOCK)
            tsc = read()
            after = clock(CLOCK)
            if after - before < best[0]:
                best = (after - before, (before + after) // 2, tsc)
        return best[1], best[2]


class TscClock:
    """The TSC rate, timed between the clock's creation and ``hz()``, at least ``MIN_NS``
    apart: a VM makes its clock when it is created and asks while the kernel is read, so a
    boot's wait for it overlaps the load."""

    MIN_NS = 5_000_000

    def __init__(self) -> None:
        self._tsc = HostTsc()
        self._start = self._tsc.sample()

    def hz(self) -> int:
        t0, c0 = self._start
        wait = t0 + self.MIN_NS - time.clock_gettime_ns(CLOCK)
        if wait > 0:
            time.sleep(wait / NS)
        t1, c1 = self._tsc.sample()
        return (c1 - c0) * NS // max(t1 - t0, 1)


@functools.cache
def _reader() -> HostTsc:
    return HostTsc()  # kept: its page holds the code the reader calls


def host_tsc() -> int:
    """The host's TSC now (what the guest's RDTSC adds its offset to; a snapshot's restore
    moves that offset by how far this went on: vm.py)."""
    return _reader().read()
