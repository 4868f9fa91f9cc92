"""Which libunicorn the emulate backend runs on, and the engine's own functions in it.

unicorn's Python binding loads its library once, when it is first imported, from
``$LIBUNICORN_PATH`` when that is set. So the choice is made here, once per process, before the
binding is imported anywhere:

1. ``VMMARCH_ENGINE=wheel``: the library of the unicorn wheel, as PyPI ships it.
2. ``LIBUNICORN_PATH`` set by the user: that library ("given").
3. Otherwise the engine (libbuild.py): from the cache when it passes its load check, else built
   now (on first use: one line says so, then a progress line).
4. When the engine cannot be built: the wheel, with a one-line notice naming the cause.

The engine's API (patches 0004-0006: the system CPU) is used when the loaded library has it,
whatever chose it; the wheel gets the backend's Python delivery path instead (docs/backends.md).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vmmarch_cli.backends.emulate import libbuild
from vmmarch_cli.errors import BackendError, BackendUnavailableError
from vmmarch_cli.progress import status as status_line
from vmmarch_cli.vcpu import GuestDebug, WatchKind, Watchpoint

#: Forces the unicorn wheel's library when set to "wheel" (anything else: the engine).
ENGINE_VARIABLE = "VMMARCH_ENGINE"
WHEEL = "wheel"
MISSING = "unicorn is not installed: pip install 'vmm-arch[emulate]'"

Report = Callable[[str], None]


def _notice(quiet: bool) -> Report:
    """One-line messages a user should see (first use, a fallback): stderr unless quiet."""
    if quiet:
        return lambda message: None
    return lambda message: print(f"vmm-arch: {message}", file=sys.stderr, flush=True)


class Kind(StrEnum):
    ENGINE = "engine"  # vmm-arch's build, with the patch series
    WHEEL = "wheel"  # the unicorn wheel's own library
    GIVEN = "given"  # $LIBUNICORN_PATH, set by the user


@dataclass(frozen=True)
class Choice:
    kind: Kind
    library: str  # the file loaded (or that would be)
    reason: str  # why not the engine; empty when it is the engine
    engine: libbuild.Engine | None = None


_chosen: Choice | None = None
_lock = threading.Lock()


def chosen() -> Choice | None:
    """What this process loaded, if the binding was imported through ``load``."""
    return _chosen


def load(quiet: bool = False) -> Choice:
    """Choose the library (building the engine if need be: a one-line notice, then a status
    line, on stderr unless ``quiet``), import unicorn's binding with it, and return the choice;
    the same one on every later call."""
    global _chosen
    with _lock:
        if _chosen is None:
            _chosen = _import(_choose(_notice(quiet), quiet))
        return _chosen


def plan() -> Choice:
    """What ``load`` would choose now, without building or loading anything (for reports)."""
    if _chosen is not None:
        return _chosen
    forced = _forced()
    if forced is not None:
        return forced
    digest = libbuild.series_digest(libbuild.series())
    engine = libbuild.cached(digest)
    if engine is not None:
        return Choice(Kind.ENGINE, str(engine.library), "", engine)
    failure = libbuild.recent_failure(digest)
    if failure is not None:
        return Choice(Kind.WHEEL, wheel_library(),
                      f"the engine failed to build ({failure[0]}) at {failure[1]}")
    return Choice(Kind.ENGINE, "", "not built yet: it builds on first use (about a minute)")


def wheel_library() -> str:
    """The library file the unicorn wheel ships (not loaded)."""
    try:
        spec = importlib.util.find_spec("unicorn")
    except (ImportError, ValueError):  # ValueError: imported and found to be missing
        spec = None
    if spec is None or spec.origin is None:
        raise BackendUnavailableError(MISSING)
    return os.path.join(os.path.dirname(spec.origin), "lib", libbuild.LIB_NAME)


def _forced() -> Choice | None:
    if os.environ.get(ENGINE_VARIABLE, "").strip().lower() == WHEEL:
        return Choice(Kind.WHEEL, wheel_library(), f"{ENGINE_VARIABLE}=wheel")
    given = os.environ.get("LIBUNICORN_PATH")
    if given:
        return Choice(Kind.GIVEN, os.path.join(given, libbuild.LIB_NAME),
                      "LIBUNICORN_PATH is set")
    return None


def _choose(notice: Report, quiet: bool) -> Choice:
    forced = _forced()
    if forced is not None:
        return forced
    wheel = wheel_library()
    digest = libbuild.series_digest(libbuild.series())
    engine = libbuild.cached(digest)
    if engine is not None:
        problem = libbuild.load_problem(engine)
        if problem is None:
            return Choice(Kind.ENGINE, str(engine.library), "", engine)
        notice(f"the cached CPU engine fails its load check ({problem}): rebuilding it")
    else:
        failure = libbuild.recent_failure(digest)
        if failure is not None:
            reason = f"the engine failed to build ({failure[0]}) at {failure[1]}"
            notice(f"{reason}; running on the unicorn wheel (`vmm-arch engine build` tries "
                   "again)")
            return Choice(Kind.WHEEL, wheel, reason)
        try:
            libbuild.find_compiler()  # without one, say so instead of "building"
        except libbuild.BuildError as e:
            libbuild.remember_failure(digest, str(e))
            reason = f"the engine could not be built: {e}"
            notice(f"{reason}; running on the unicorn wheel")
            return Choice(Kind.WHEEL, wheel, reason)
        notice(f"building the CPU engine (unicorn {libbuild.VERSION} and vmm-arch's patches) "
               "on first use; about a minute, once")
    try:
        with status_line("", quiet) as progress:
            engine = libbuild.build(progress, force=engine is not None)
    except libbuild.BuildError as e:
        reason = f"the engine could not be built: {e}"
        notice(f"{reason}; running on the unicorn wheel")
        return Choice(Kind.WHEEL, wheel, reason)
    return Choice(Kind.ENGINE, str(engine.library), "", engine)


def _import(choice: Choice) -> Choice:
    """Import unicorn's binding so that it loads ``choice.library``; the wheel instead (and
    said so) when that library does not load: the binding itself silently falls back."""
    before = os.environ.get("LIBUNICORN_PATH")
    try:
        if choice.kind is Kind.ENGINE:
            os.environ["LIBUNICORN_PATH"] = os.path.dirname(choice.library)
        elif choice.kind is Kind.WHEEL:
            os.environ.pop("LIBUNICORN_PATH", None)
        binding = importlib.import_module("unicorn.unicorn_py3.unicorn")
    except ImportError:
        raise BackendUnavailableError(MISSING) from None
    finally:
        if before is None:
            os.environ.pop("LIBUNICORN_PATH", None)
        else:
            os.environ["LIBUNICORN_PATH"] = before
    loaded = str(getattr(getattr(binding, "uclib", None), "_name", ""))
    if os.path.realpath(loaded) != os.path.realpath(choice.library):
        return Choice(Kind.WHEEL, loaded, f"{choice.library} did not load")
    return choice


def loaded_library() -> Any:
    """The ctypes library the binding loaded."""
    from unicorn.unicorn_py3.unicorn import uclib

    return uclib


def uc_handle(uc: Any) -> int:
    """The address of the binding's engine (uc_struct)."""
    return uc._uch if isinstance(uc._uch, int) else uc._uch.value


class SystemCpu:
    """The engine's system-CPU functions for one unicorn instance (patches 0004-0006, 0013):
    IDT delivery in the CPU loop, SYSCALL, the INTR line and its acknowledge callback, NMIs."""

    #: int ack(void *opaque): the vector the CPU takes now, or -1.
    ACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    EVENT_VECTORS = 256

    def __init__(self, uc: Any) -> None:
        lib = loaded_library()
        self._lib = lib
        self._uc = uc_handle(uc)
        for name, restype, argtypes in (
            ("vmmarch_system_mode", None, [ctypes.c_void_p]),
            ("vmmarch_take_shutdown", ctypes.c_bool, [ctypes.c_void_p]),
            ("vmmarch_event_counts", ctypes.POINTER(ctypes.c_uint64), [ctypes.c_void_p]),
            ("vmmarch_irq_set_ack", None, [ctypes.c_void_p, self.ACK, ctypes.c_void_p]),
            ("vmmarch_irq_request", None, [ctypes.c_void_p, ctypes.c_int]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self._nmi = getattr(lib, "vmmarch_nmi_request", None)  # patch 0013
        if self._nmi is not None:
            self._nmi.restype, self._nmi.argtypes = None, [ctypes.c_void_p]
        self._arch_capabilities = getattr(lib, "vmmarch_set_arch_capabilities", None)  # 0014
        if self._arch_capabilities is not None:
            self._arch_capabilities.restype = ctypes.c_int
            self._arch_capabilities.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
        self._ack: Any = None  # the ctypes callback must outlive the engine's use of it
        counts = lib.vmmarch_event_counts(self._uc)
        self.counts = ctypes.cast(counts, ctypes.POINTER(
            ctypes.c_uint64 * (2 * self.EVENT_VECTORS))).contents

    @staticmethod
    def available() -> bool:
        """The loaded library is an engine with the system CPU."""
        return hasattr(loaded_library(), "vmmarch_irq_request")

    @staticmethod
    def reports_arch_capabilities() -> bool:
        """The loaded library gives the guest IA32_ARCH_CAPABILITIES as the VMM sets it."""
        return hasattr(loaded_library(), "vmmarch_set_arch_capabilities")

    def set_arch_capabilities(self, value: int) -> None:
        """What RDMSR of IA32_ARCH_CAPABILITIES gives the guest (needs
        ``reports_arch_capabilities``); after the instance's first memory map."""
        if self._arch_capabilities is None or self._arch_capabilities(self._uc, value) != 0:
            raise BackendError("this engine cannot set IA32_ARCH_CAPABILITIES")

    def enable(self, ack: Callable[[], int]) -> None:
        """Exceptions, INT n and SYSCALL as the CPU does them from now on, and external
        interrupts acknowledged by ``ack`` (the vector, or -1: nothing after all)."""
        self._ack = self.ACK(lambda _: ack())
        self._lib.vmmarch_irq_set_ack(self._uc, self._ack, None)
        self._lib.vmmarch_system_mode(self._uc)

    def take_shutdown(self) -> bool:
        """A triple fault ended the last run (the flag is cleared)."""
        return bool(self._lib.vmmarch_take_shutdown(self._uc))

    def interrupt_line(self, raised: bool) -> None:
        """Raise or lower the CPU's INTR line; from any thread."""
        self._lib.vmmarch_irq_request(self._uc, 1 if raised else 0)

    def nmi(self) -> bool:
        """Request a non-maskable interrupt, from any thread; False when the library cannot."""
        if self._nmi is None:
            return False
        self._nmi(self._uc)
        return True

    def delivered(self) -> dict[tuple[bool, int], int]:
        """Deliveries so far: (external, vector) -> count."""
        out = {}
        for index, count in enumerate(self.counts):
            if count:
                out[(index >= self.EVENT_VECTORS, index % self.EVENT_VECTORS)] = int(count)
        return out


#: QEMU's access flags for a watchpoint (include/hw/core/cpu.h, BP_MEM_READ/BP_MEM_WRITE), as
#: the engine takes and reports them.
ENGINE_WATCH_KINDS = {WatchKind.READ: 0x01, WatchKind.WRITE: 0x02, WatchKind.ACCESS: 0x03}


class DebugCpu:
    """The engine's debugger stops for one unicorn instance (patches 0011, 0012): breakpoints,
    single steps and watchpoints by QEMU's own machinery, each ending emu_start."""

    def __init__(self, uc: Any) -> None:
        lib = loaded_library()
        self._lib = lib
        self._uc = uc_handle(uc)
        for name, restype, argtypes in (
            ("vmmarch_debug_set", None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                                         ctypes.c_size_t, ctypes.c_bool]),
            ("vmmarch_take_debug_stop", ctypes.c_bool, [ctypes.c_void_p]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self._watch = hasattr(lib, "vmmarch_watch_set")  # patch 0012
        if self._watch:
            lib.vmmarch_watch_set.restype = None
            lib.vmmarch_watch_set.argtypes = [
                ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
            lib.vmmarch_take_watch_hit.restype = ctypes.c_int
            lib.vmmarch_take_watch_hit.argtypes = [ctypes.c_void_p,
                                                   ctypes.POINTER(ctypes.c_uint64)]

    @staticmethod
    def available() -> bool:
        return hasattr(loaded_library(), "vmmarch_debug_set")

    def set_debug(self, debug: GuestDebug) -> bool:
        """Apply ``debug`` (its planted int3s aside); False when the library cannot watch."""
        self.set(sorted(debug.breakpoints), debug.single_step)
        return self.watch([(w.address, w.length, ENGINE_WATCH_KINDS[w.kind])
                           for w in sorted(debug.watchpoints, key=lambda w: w.address)])

    def watch_hit(self, watchpoints: frozenset[Watchpoint]) -> Watchpoint | None:
        """Which of ``watchpoints`` the last stop was for."""
        hit = self.take_watch_hit()
        if hit is None:
            return None
        return next((w for w in watchpoints if w.address == hit[1]), None)

    def set(self, breakpoints: Sequence[int], single_step: bool) -> None:
        """Stop before any instruction at ``breakpoints`` (guest-virtual), or after each one."""
        addresses = (ctypes.c_uint64 * max(len(breakpoints), 1))(*breakpoints)
        self._lib.vmmarch_debug_set(self._uc, addresses, len(breakpoints), single_step)

    def take_stop(self) -> bool:
        """A breakpoint or a step ended the last run (the flag is cleared)."""
        return bool(self._lib.vmmarch_take_debug_stop(self._uc))

    def watch(self, watchpoints: Sequence[tuple[int, int, int]]) -> bool:
        """Stop right after an access to any (address, length, BP_MEM_* kind); False when the
        library has no watchpoints (patch 0012)."""
        if not self._watch:
            return not watchpoints
        n = max(len(watchpoints), 1)
        addresses = (ctypes.c_uint64 * n)(*(w[0] for w in watchpoints))
        lengths = (ctypes.c_uint64 * n)(*(w[1] for w in watchpoints))
        kinds = (ctypes.c_int * n)(*(w[2] for w in watchpoints))
        self._lib.vmmarch_watch_set(self._uc, addresses, lengths, kinds, len(watchpoints))
        return True

    def take_watch_hit(self) -> tuple[int, int] | None:
        """(BP_MEM_* kind, watched address) of the watchpoint the last stop was for."""
        if not self._watch:
            return None
        address = ctypes.c_uint64()
        kind = int(self._lib.vmmarch_take_watch_hit(self._uc, ctypes.byref(address)))
        return (kind, address.value) if kind else None


class PostedPorts:
    """The engine's posted port I/O for one unicorn instance (patch 0010, vcpu.PostedPortIo):
    byte reads answered and byte writes queued inside the CPU, without a hook."""

    QUEUE = 4096  # uc_priv.h VMMARCH_QUEUE: one collect empties a full queue

    def __init__(self, uc: Any) -> None:
        lib = loaded_library()
        self._lib = lib
        self._uc = uc_handle(uc)
        for name, restype, argtypes in (
            ("vmmarch_port_post", None,
             [ctypes.c_void_p, ctypes.c_uint16, ctypes.c_int, ctypes.c_int]),
            ("vmmarch_port_collect", ctypes.c_uint32,
             [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32]),
            ("vmmarch_port_posted_ins", ctypes.c_uint64, [ctypes.c_void_p]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self._buffer = (ctypes.c_uint32 * self.QUEUE)()

    @staticmethod
    def available() -> bool:
        return hasattr(loaded_library(), "vmmarch_port_post")

    def post(self, port: int, read: int | None, queue: bool) -> None:
        self._lib.vmmarch_port_post(self._uc, port, -1 if read is None else read & 0xFF,
                                    1 if queue else 0)

    def collect(self) -> list[tuple[int, bytes]]:
        """The queued writes as (port, bytes) runs, oldest first."""
        count = self._lib.vmmarch_port_collect(self._uc, self._buffer, self.QUEUE)
        if not count:
            return []
        # A record is port << 8 | byte (uc_priv.h), little-endian: the byte, then the port.
        raw = memoryview(self._buffer).cast("B")[: 4 * count]
        low, high = bytes(raw[1::4]), bytes(raw[2::4])
        if low.count(low[0]) == count and high.count(high[0]) == count:
            # One port, the usual case (a console's THR): no per-byte work in Python.
            return [(high[0] << 8 | low[0], bytes(raw[0::4]))]
        runs: list[tuple[int, bytearray]] = []
        for record in self._buffer[:count]:
            port = record >> 8
            if not runs or runs[-1][0] != port:
                runs.append((port, bytearray()))
            runs[-1][1].append(record & 0xFF)
        return [(port, bytes(data)) for port, data in runs]

    def reads(self) -> int:
        return int(self._lib.vmmarch_port_posted_ins(self._uc))


@dataclass(frozen=True)
class Status:
    """What ``vmm-arch engine`` reports: the plan, the series, the cache, the last failure."""

    choice: Choice
    series: tuple[libbuild.Patch, ...]
    cache: str
    failure: tuple[str, str] | None  # (cause, when) of a failed build this last day
    setting: str  # $VMMARCH_ENGINE as given ("" when unset)


def status() -> Status:
    patches = libbuild.series()
    return Status(plan(), patches, str(libbuild.engine_root()),
                  libbuild.recent_failure(libbuild.series_digest(patches)),
                  os.environ.get(ENGINE_VARIABLE, ""))


def build(force: bool, quiet: bool = False) -> libbuild.Engine:
    """Build the engine now (``vmm-arch engine build``): from the cache when it passes its load
    check unless ``force``; BackendUnavailableError naming the cause when it cannot be built."""
    try:
        with status_line("building the CPU engine", quiet) as progress:
            return libbuild.build(progress, force=force)
    except libbuild.BuildError as e:
        raise BackendUnavailableError(f"the CPU engine could not be built: {e}") from None
