"""One boot: backend, VM, memory, kernel, arch pipeline, devices, run loop, result.

vCPUs run one thread each; the main thread only waits for a stop condition (guest exit status,
reset, poweroff, panic, a fault, ``--expect`` matched, the timeout, or Ctrl-C) and then stops
every vCPU. The first stop condition wins; the result records it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from vmmarch_cli import backends, errors, loader, posted_io
from vmmarch_cli.arch.x86_64 import board, e820
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.config import BASE_CMDLINE, EMULATED_RING0_CMDLINE, BootConfig
from vmmarch_cli.console import Console
from vmmarch_cli.devices.bus import IoBus
from vmmarch_cli.devices.exit_port import ExitPort
from vmmarch_cli.devices.i8042 import I8042
from vmmarch_cli.devices.rtc import CmosRtc
from vmmarch_cli.devices.serial import Serial8250
from vmmarch_cli.loader import KernelFormat, KernelImage
from vmmarch_cli.loader.host_decompress import Decompress, Decompression
from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.stop import STATUS_FOR_REASON, StopReason
from vmmarch_cli.vcpu import (
    Debug,
    Halt,
    Hypervisor,
    InlinePortIo,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Regs,
    Shutdown,
    Sregs,
    Unknown,
    Vcpu,
    Vm,
)

if TYPE_CHECKING:
    from vmmarch_cli.arch.x86_64.pipeline import StepRecord
    from vmmarch_cli.crash import CodeWindow
    from vmmarch_cli.debugging import AllStop, Debugger, DebugWait
    from vmmarch_cli.snapshot.fileformat import Snapshot
    from vmmarch_cli.snapshot.writer import Writing


@dataclass(frozen=True)
class Fault:
    """Where a guest fault left the vCPU, for the crash report."""

    cpu: int
    reason: str
    instruction: bytes
    regs: Regs | None
    sregs: Sregs | None
    code: CodeWindow | None = None


@dataclass
class BootResult:
    reason: StopReason | None = None
    status: int = 0
    guest_status: int | None = None
    detail: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    kernel: KernelImage | None = None
    protocol: BootProtocol | None = None
    cmdline: str = ""
    backend: str = ""
    backend_reason: str = ""  # why this backend: --backend NAME, or what auto saw
    cpu_mask: tuple[str, ...] = ()
    fault: Fault | None = None
    console_tail: list[str] = field(default_factory=list)
    exits: Counter[str] = field(default_factory=Counter)
    unhandled_ports: dict[str, int] = field(default_factory=dict)
    injected_events: dict[str, int] = field(default_factory=dict)
    rip_samples: Counter[int] = field(default_factory=Counter)
    setup: list[StepRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Where the guest was saved (``config.snapshot``, once every --expect had matched).
    snapshot: Path | None = None


#: clearcpuid= is parsed into a 128-byte buffer (arch/x86/kernel/cpu/common.c,
#: cpu_parse_early_param); a longer list would be cut mid-name.
CLEARCPUID_MAX = 127


def build_cmdline(config: BootConfig, emulated_ring0: bool, leaked: list[str]) -> str:
    """The user's (or default) command line plus what the host's workarounds need.

    Each extra is added only if the user did not set that parameter themselves.
    """
    base = config.cmdline if config.cmdline is not None else BASE_CMDLINE
    parts = [base]
    given = f" {base} {config.append} "
    if emulated_ring0:
        parts += [p for p in EMULATED_RING0_CMDLINE.split()
                  if f" {p.split('=')[0]}=" not in given]
    if leaked and " clearcpuid=" not in given:
        value = ""
        for name in leaked:
            candidate = f"{value},{name}" if value else name
            if len(candidate) > CLEARCPUID_MAX:
                break
            value = candidate
        parts.append(f"clearcpuid={value}")
    if config.append:
        parts.append(config.append)
    return " ".join(p for p in parts if p)


def choose_protocol(kernel: KernelImage, requested: BootProtocol | None
                    ) -> tuple[BootProtocol, int]:
    """(protocol, entry address). ``None`` (auto) takes PVH when the ELF offers it, as
    Firecracker does since v1.12: it skips the 64-bit page-table handover entirely."""
    if requested == BootProtocol.PVH or (requested is None and kernel.pvh_entry is not None):
        if kernel.pvh_entry is None:
            raise errors.BadInputError(
                f"{kernel.path}: --boot-protocol pvh needs a Xen PVH entry note "
                "(XEN_ELFNOTE_PHYS32_ENTRY), which this kernel lacks; use --boot-protocol linux64"
            )
        return BootProtocol.PVH, kernel.pvh_entry
    return BootProtocol.LINUX64, kernel.entry


def choose_decompression(requested: Decompress, backend: str,
                         ring0_in_hardware: Callable[[], bool]) -> Decompression:
    """Where a bzImage's payload is decompressed (docs/decompression.md). ``auto`` takes the
    host wherever the guest's ring 0 does not run on hardware: on the emulate backend's software
    CPU, and on a KVM that emulates it (``ring0_in_hardware`` is asked only for ``auto``;
    ``prepare`` answers with backends.runs_ring0_in_hardware)."""
    if requested is not Decompress.AUTO:
        return Decompression(requested, requested, f"--decompress {requested}")
    if ring0_in_hardware():
        return Decompression(requested, Decompress.GUEST,
                             "auto: the guest's ring 0 runs on hardware")
    return Decompression(requested, Decompress.HOST,
                         f"auto: {backend} runs the guest's ring 0 in software")


def fallback_notice(kernel: KernelImage) -> str | None:
    """The one line a boot prints when the host was to decompress a bzImage and could not."""
    d = kernel.decompression
    if d is None or not d.fallback:
        return None
    return (f"vmm-arch: {kernel.path}: the host cannot decompress its payload ({d.fallback}); "
            "the kernel's own decompressor runs in the guest")


@dataclass
class Prepared:
    """A VM with the kernel loaded and every vCPU configured, not yet running."""

    hypervisor: Hypervisor
    vm: Vm
    vcpus: list[Vcpu]
    kernel: KernelImage
    protocol: BootProtocol
    plan_entry: int
    cmdline: str
    cpu_mask: frozenset[str]
    setup: list[StepRecord]
    timings: dict[str, float]
    backend: backends.Pick  # which backend, and why (--backend auto: backends.pick)
    restored: Snapshot | None = None  # the snapshot the VM started from (config.restore)


class _Loading:
    """``loader.load_kernel`` on a thread of its own: reading the kernel into guest memory (tens
    of milliseconds of page faults, outside the GIL) overlaps opening the backend."""

    def __init__(self, kernel: Path, memory: MmapGuestMemory,
                 decompression: Decompression) -> None:
        self._kernel: KernelImage | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._load, args=(kernel, memory, decompression),
            name="kernel-load", daemon=True)
        self._thread.start()

    def _load(self, path: Path, memory: MmapGuestMemory, decompression: Decompression) -> None:
        try:
            self._kernel = loader.load_kernel(path, memory, decompression)
        except BaseException as e:  # handed to the caller of result()
            self._error = e

    def join(self) -> None:
        """Wait for the thread: guest memory must outlive every write into it."""
        self._thread.join()

    def result(self) -> KernelImage:
        self.join()
        if self._error is not None:
            raise self._error
        assert self._kernel is not None
        return self._kernel


@contextmanager
def prepare(config: BootConfig, quiet: bool = False) -> Iterator[Prepared]:
    """Open the backend (which reports on stderr unless ``quiet``), build the VM, load the
    kernel and run the arch pipeline. A bzImage the host was to decompress but could not is
    reported on stderr in one line (unless ``quiet``) once everything else has succeeded.

    The kernel is read into guest memory while the backend opens; a backend that cannot open
    is still the error reported, whatever the kernel. With ``config.restore`` the VM starts from
    that snapshot instead (``_restored``)."""
    if config.restore is not None:
        with _restored(config, quiet) as prepared:
            yield prepared
        return
    # Here, not at the top: a restore runs no pipeline (~8 ms of imports).
    from vmmarch_cli.arch.x86_64.pipeline import BootPlan, configure, probe_cpuid_mask

    t0 = time.monotonic()
    chosen = backends.resolve(config.backend)
    decompression = choose_decompression(
        config.decompress, chosen.name, lambda: backends.runs_ring0_in_hardware(chosen.name))
    memory = MmapGuestMemory(e820.ram_layout(config.mem_size))
    loading = _Loading(config.kernel, memory, decompression)
    try:
        hv = backends.open_backend(chosen.name, quiet)
        try:
            # The host's own mask says whether its ring 0 is emulated (it reads /sys and /proc).
            host_mask = hv.default_cpu_mask()
            limit = hv.max_vcpus()
            if config.cpus > limit:
                raise errors.BackendUnavailableError(
                    f"--cpus {config.cpus}: the {hv.name} backend runs at most {limit} vCPU"
                    f"{'s' if limit > 1 else ''} per VM here")
            mask = config.cpu_mask if config.cpu_mask is not None else host_mask
            vm = hv.create_vm(memory)
            try:
                # What does not depend on the kernel, while it is still being read (measured:
                # the CPUID model took 7-13 ms of the ~25 ms the copy of Debian's takes).
                vcpus = [vm.create_vcpu(i) for i in range(config.cpus)]
                supported = vm.supported_cpuid()
                leaked = (probe_cpuid_mask(vcpus[0], supported, mask, config.cpus)
                          if mask else [])
                t1 = time.monotonic()
                kernel = loading.result()
                initrd = (0, 0)
                if config.initrd is not None:
                    initrd = loader.load_initrd(config.initrd, memory, kernel)
                cmdline = build_cmdline(config, bool(mask and host_mask), leaked)
                raw_cmdline = loader.check_cmdline(cmdline, kernel)
                protocol, entry = choose_protocol(kernel, config.boot_protocol)
                t2 = time.monotonic()
                plan = BootPlan(
                    entry=entry,
                    protocol=protocol,
                    cmdline=raw_cmdline,
                    ram_regions=tuple(memory.regions()),
                    cpu_count=config.cpus,
                    cpu_mask=mask,
                    initrd_address=initrd[0],
                    initrd_size=initrd[1],
                    setup_header=kernel.setup_header,
                    kernel_alignment=kernel.kernel_alignment,
                )
                records = configure(plan, memory, vcpus, supported)
                t3 = time.monotonic()
                # "load" is what the kernel load still took once the backend was open.
                timings = {"open": t1 - t0, "load": t2 - t1, "setup": t3 - t2}
                notice = fallback_notice(kernel)
                if notice is not None and not quiet:
                    print(notice, file=sys.stderr, flush=True)
                yield Prepared(hv, vm, vcpus, kernel, protocol, entry, cmdline, mask, records,
                               timings, chosen)
            finally:
                vm.close()
        finally:
            hv.close()
    finally:
        loading.join()
        memory.close()


#: What a snapshot's description says of the machine (``snapshot_machine``), read back by
#: ``_restored`` and ``vmm-arch resume``.
KERNEL_FIELDS = ("path", "format", "entry", "load_start", "load_end", "pvh_entry")


def snapshot_machine(prepared: Prepared, config: BootConfig) -> dict[str, Any]:
    kernel = prepared.kernel
    return {
        "mem_size": config.mem_size,
        "cpus": len(prepared.vcpus),
        "kernel": {name: getattr(kernel, name) for name in KERNEL_FIELDS},
        "protocol": str(prepared.protocol),
        "entry": prepared.plan_entry,
        "cmdline": prepared.cmdline,
        "cpu_mask": sorted(prepared.cpu_mask),
    }


@dataclass(frozen=True)
class SnapshotMachine:
    """The machine a snapshot's description names (``snapshot_machine`` writes it)."""

    backend: str
    mem_size: int
    cpus: int
    kernel: KernelImage
    protocol: BootProtocol
    entry: int
    cmdline: str
    cpu_mask: frozenset[str]


def described_machine(snapshot: Snapshot) -> SnapshotMachine:
    """The machine ``snapshot`` was taken of; SnapshotError (65) when its description lacks a
    part."""
    from vmmarch_cli.snapshot.fileformat import SnapshotError

    try:
        machine = snapshot.description["machine"]
        kernel = KernelImage(**{name: machine["kernel"][name] for name in KERNEL_FIELDS})
        return SnapshotMachine(
            backend=str(snapshot.description["backend"]),
            mem_size=int(machine["mem_size"]),
            cpus=int(machine["cpus"]),
            kernel=dataclasses.replace(kernel, format=KernelFormat(kernel.format)),
            protocol=BootProtocol(machine["protocol"]),
            entry=int(machine["entry"]),
            cmdline=str(machine["cmdline"]),
            cpu_mask=frozenset(str(feature) for feature in machine["cpu_mask"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{snapshot.path}: its description lacks {e}") from None


@contextmanager
def _restored(config: BootConfig, quiet: bool) -> Iterator[Prepared]:
    """``prepare`` for ``config.restore``: guest RAM is the snapshot's (mapped copy-on-write),
    the vCPUs and the VM take its state; nothing is loaded and the pipeline does not run."""
    from vmmarch_cli.snapshot import fileformat, guest
    from vmmarch_cli.snapshot.fileformat import SnapshotError

    assert config.restore is not None
    t0 = time.monotonic()
    with fileformat.open_file(config.restore) as f:  # one opening for all of it
        snapshot = fileformat.read_from(f, config.restore)
        taken = described_machine(snapshot)
        chosen = backends.resolve(config.backend)
        if chosen.name != taken.backend:
            raise SnapshotError(f"{snapshot.path}: taken on the {taken.backend} backend, not "
                                f"{chosen.name} (resume it with --backend {taken.backend})")
        checking = guest.MemoryCheck(snapshot, f)
        memory = MmapGuestMemory(e820.ram_layout(config.mem_size))
        try:
            guest.map_memory(snapshot, f, memory)
            hv = backends.open_backend(chosen.name, quiet)
            try:
                vm = hv.create_vm(memory)
                try:
                    vcpus = [vm.create_vcpu(i) for i in range(config.cpus)]
                    guest.restore_vm(snapshot, chosen.name, vm, vcpus)
                    t1 = time.monotonic()
                    checking.result()  # before the guest runs on what the file holds
                    timings = {"open": t1 - t0, "load": time.monotonic() - t1, "setup": 0.0}
                    yield Prepared(hv, vm, vcpus, taken.kernel, taken.protocol, taken.entry,
                                   taken.cmdline, taken.cpu_mask, [], timings, chosen,
                                   restored=snapshot)
                finally:
                    vm.close()
            finally:
                hv.close()
        finally:
            memory.close()


class _Run:
    """The state shared by the vCPU threads and the waiting main thread of one boot."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.done = threading.Event()
        self.lock = threading.Lock()  # guards the stop decision
        # Serialises device access between vCPUs, and with the main thread when it delivers
        # posted writes (posted_io.py); one vCPU alone needs no lock on its hot path.
        self.device_lock: AbstractContextManager[object] = nullcontext()
        self.reason: StopReason | None = None
        self.detail = ""
        self.guest_status: int | None = None
        self.fault: Fault | None = None
        self.exits: Counter[str] = Counter()
        self.allstop: AllStop | None = None  # a debugger holds the VM (debugging.py)

    def go_on(self) -> None:
        """After a stop that saved a snapshot, the guest goes on (``run``'s ``after_snapshot``):
        no reason yet, every vCPU free to run again."""
        with self.lock:
            self.reason, self.detail, self.guest_status = None, "", None
        self.done.clear()
        for vcpu in self.prepared.vcpus:
            vcpu.clear_stop()

    def stop(self, reason: StopReason, detail: str = "", guest_status: int | None = None
             ) -> None:
        """Record why the run ends (the first reason wins) and stop every vCPU. The stopping is
        repeated on every call (it is idempotent): a call cut short by a signal after it
        recorded its reason must not leave a vCPU running for the next call to skip."""
        with self.lock:
            if not self.reason:
                self.reason, self.detail, self.guest_status = reason, detail, guest_status
        for vcpu in self.prepared.vcpus:
            vcpu.request_stop()
        self.done.set()
        if self.allstop is not None:
            self.allstop.wake()


def run(
    config: BootConfig,
    console_sink: BinaryIO | None,
    console_log: BinaryIO | None = None,
    on_ready: Callable[[Prepared], None] | None = None,
    serial_sinks: Sequence[Callable[[bytes], None]] = (),
    quiet: bool = False,
    debugger: Debugger | None = None,
    before_start: Callable[[IoBus], None] | None = None,
    after_snapshot: Callable[[IoBus], None] | None = None,
) -> BootResult:
    """Boot ``config`` and return how it ended. Raises only for problems before the guest runs,
    and for what ``debugger`` raises to end the run (debugging.py: it holds the guest from
    before its first instruction, all-stop).

    ``serial_sinks`` receive what the guest writes to COM2, COM3, ... (``vmm-arch run`` puts
    the command's stdout and stderr there, apart from the kernel log on COM1).
    ``before_start`` sees the devices once everything is set up (a restored snapshot's state
    too), before the first instruction (runjob.py hands over a job there). With
    ``after_snapshot`` the guest goes on once it is saved (``config.snapshot``): the callback
    sees the devices first (the first ``vmm-arch run`` hands its job over there, instead of
    restoring what it just saved in a second VM), and the run then ends as one without
    ``--expect`` does.
    """
    start = time.monotonic()
    signals = _SignalsNoted()
    with signals, prepare(config, quiet) as prepared:
        if config.snapshot is not None:
            from vmmarch_cli.snapshot import guest

            guest.require_snapshots(prepared.backend.name, prepared.vm, prepared.vcpus)
        if on_ready is not None:
            on_ready(prepared)
        state = _Run(prepared)
        console = Console(console_sink, lambda kind, text: state.stop(kind, text),
                          config.expect, console_log)
        bus = _devices(prepared.vm, console, state, serial_sinks)
        if prepared.restored is not None:
            from vmmarch_cli.snapshot import guest

            guest.restore_devices(prepared.restored, bus)
        if before_start is not None:
            before_start(bus)
        posted = posted_io.PostedIo(bus, prepared.vcpus)
        if posted.active or len(prepared.vcpus) > 1:
            state.device_lock = threading.Lock()
        for v in prepared.vcpus:
            if isinstance(v, InlinePortIo):  # completes port I/O inside run: takes the bus
                v.attach_io(*_io_handlers(bus, state, posted))
        debug_wait = None
        if debugger is not None:
            # Imported here: a run without a debugger (nearly all) does not pay for it.
            from vmmarch_cli.debugging import AllStop, DebugWait

            state.allstop = AllStop(prepared.vcpus, state.done)

            def deliver() -> None:
                if posted.active:
                    with state.device_lock:
                        posted.deliver()

            debug_wait = DebugWait(debugger, state.allstop, deliver, posted_io.INTERVAL)
        running_at = time.monotonic()
        collecting = gc.isenabled()
        saved: Path | None = None
        taken = False
        writing: Writing | None = None
        while True:  # a second round only after a snapshot, with ``after_snapshot``
            threads = [
                threading.Thread(target=_vcpu_loop, args=(v, bus, state),
                                 name=f"vcpu{v.index}", daemon=True)
                for v in prepared.vcpus
            ]
            _run_round(config, prepared, state, threads, posted, signals, debug_wait,
                       collecting)
            console.flush()
            if config.snapshot is None or state.reason is not StopReason.EXPECT or taken:
                break
            from vmmarch_cli.snapshot import guest

            assert isinstance(prepared.vm.memory, MmapGuestMemory)
            # A cache entry the guest goes on from is written by a child that outlives the
            # run (writer.py); none when another run is writing that entry.
            background = config.snapshot_cached and after_snapshot is not None
            taken = True
            try:
                writing = guest.save(
                    config.snapshot, prepared.backend.name, prepared.vm, prepared.vcpus,
                    prepared.vm.memory, bus, snapshot_machine(prepared, config),
                    sync=not config.snapshot_cached, ref_files=config.snapshot_refs,
                    background=background)
            except OSError as e:  # the cache entry's lock or the fork (writer.py)
                if not background:
                    raise
                console.warnings.append(f"the snapshot was not saved: {e}")
                writing = None
            saved = config.snapshot if writing is not None or not background else None
            if after_snapshot is None:
                break
            after_snapshot(bus)
            state.go_on()
        if writing is not None:
            failed = writing.poll()
            if failed is not None:
                console.warnings.append(f"the snapshot was not saved: {failed}")
                saved = None
        end = time.monotonic()
        timings = dict(prepared.timings)
        timings["run"] = end - running_at
        timings["total"] = end - start
        if console.first_byte_at is not None:
            timings["first_console_byte"] = console.first_byte_at - start
        for name, at in console.milestones.items():
            timings[name] = at - start
        injected: Counter[str] = Counter()
        for v in prepared.vcpus:
            injected.update(v.injected_events)
        reason = state.reason or StopReason.INTERRUPTED  # set: the finally above stops it
        status = (state.guest_status if reason is StopReason.EXIT_PORT and
                  state.guest_status is not None else STATUS_FOR_REASON[reason])
        return BootResult(
            reason=reason,
            status=status,
            guest_status=state.guest_status,
            detail=state.detail,
            timings=timings,
            kernel=prepared.kernel,
            protocol=prepared.protocol,
            cmdline=prepared.cmdline,
            backend=prepared.backend.name,
            backend_reason=prepared.backend.reason,
            cpu_mask=tuple(sorted(prepared.cpu_mask)),
            fault=state.fault,
            console_tail=list(console.tail),
            exits=state.exits,
            unhandled_ports={f"{d} {p:#x}": n for (d, p), n in bus.unhandled.items()},
            injected_events=dict(injected),
            rip_samples=_merged_samples(prepared.vcpus),
            setup=prepared.setup,
            warnings=console.warnings,
            snapshot=saved,
        )


def _run_round(config: BootConfig, prepared: Prepared, state: _Run,
               threads: list[threading.Thread], posted: posted_io.PostedIo,
               signals: _SignalsNoted, debug_wait: DebugWait | None, collecting: bool) -> None:
    """Run the vCPU ``threads`` until the run stops (``state.reason`` says why), then join them:
    one round of ``run`` (a second one goes on after a snapshot)."""
    # The objects made so far live for the whole run: keep the cyclic collector off them,
    # and off the run itself, whose hot paths (port I/O, APIC) make garbage without cycles
    # (measured: ~10 ms of collections in a 1 s boot on the emulate backend).
    gc.freeze()
    gc.disable()
    sampler = None
    try:
        if debug_wait is not None:
            debug_wait.attach()  # the client has the guest before its first instruction
        # From here until the VM is closed a signal is noted, not raised (_SignalsNoted);
        # with a debugger it still raises KeyboardInterrupt, which is what ends the stub's
        # service of a client while the guest is stopped. One that arrives while the
        # threads start waits until they all run (they inherit the mask, as _vcpu_loop
        # wants it).
        if debug_wait is None:
            signals.note()
        with _signals_held():
            for t in threads:
                t.start()
            if config.profile_hz:
                sampler = threading.Thread(target=_sampler,
                                           args=(prepared.vcpus, state, config.profile_hz),
                                           name="profiler", daemon=True)
                sampler.start()
        # (With a debugger signals raise, so only _wait looks at the noted ones.)
        ended = (debug_wait.wait(state.done, config.timeout) if debug_wait is not None
                 else _wait(state, config.timeout, posted, signals.seen))
        if signals.seen:
            state.stop(StopReason.INTERRUPTED, SIGNAL_DETAIL)
        elif not ended:
            state.stop(StopReason.TIMEOUT, f"no stop condition within {config.timeout:g} s")
    except KeyboardInterrupt:  # before signals.note, or with a debugger
        state.stop(StopReason.INTERRUPTED, SIGNAL_DETAIL)
    finally:
        # Nothing may cut this short (a second Ctrl-C): the VM is closed next, and closing
        # it under a vCPU thread that still runs the guest crashes (measured). Without a
        # debugger a signal is only noted by now; with one, it is held meanwhile.
        with contextlib.suppress(KeyboardInterrupt), _signals_held():
            state.stop(StopReason.INTERRUPTED)  # the reason stays the first one
            for t in threads:
                if t.ident is not None:  # started
                    t.join()
            if sampler is not None:
                sampler.join()  # done is set: it ends after its current round of samples
        if state.allstop is not None:
            state.allstop.close()
            state.allstop = None
        gc.unfreeze()
        if collecting:
            gc.enable()
        posted.deliver()  # what the guest wrote last, before the instances close
        state.exits["posted_io"] = posted.reads() + posted.queued_writes


class IrqLines:
    """ISA interrupt lines shared by several devices: a line is high while any source drives it
    (a wired OR, as on the ISA bus with the 8250's OUT2 gating)."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._high: dict[int, set[int]] = {}
        self._ids = itertools.count()

    def source(self, irq: int) -> Callable[[bool], None]:
        key = next(self._ids)
        self._high.setdefault(irq, set())

        def drive(level: bool) -> None:
            sources = self._high[irq]
            was = bool(sources)
            if level:
                sources.add(key)
            else:
                sources.discard(key)
            if bool(sources) != was:
                self._vm.set_irq_line(irq, bool(sources))

        return drive


def _io_handlers(bus: IoBus, state: _Run, posted: posted_io.PostedIo
                 ) -> tuple[Callable[[int, int], int], Callable[[int, int, int], None]]:
    """The bus as direct calls, with the same locking and counting as the exits in _vcpu_loop,
    and posted writes delivered before each access (posted_io.py)."""
    exits = state.exits

    def read(port: int, size: int) -> int:
        exits["io"] += 1
        with state.device_lock:
            posted.deliver()
            value = bus.read(port, size)
            posted.accessed(port)
            return value

    def write(port: int, size: int, value: int) -> None:
        exits["io"] += 1
        with state.device_lock:
            posted.deliver()
            bus.write(port, size, value)
            posted.accessed(port)

    return read, write


#: How often the run's wait looks for a noted signal when nothing else wakes it (seconds).
SIGNAL_POLL_SECONDS = 0.05


def _wait(state: _Run, timeout: float | None, posted: posted_io.PostedIo,
          signals: Sequence[int]) -> bool:
    """Wait for the stop condition or a noted signal (False: ``timeout`` passed first),
    delivering posted writes every posted_io.INTERVAL meanwhile, so that the console streams."""
    interval = posted_io.INTERVAL if posted.active else SIGNAL_POLL_SECONDS
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = interval if deadline is None else min(interval, deadline - time.monotonic())
        if state.done.wait(max(wait, 0)) or signals:
            return True
        if posted.active:
            with state.device_lock:
                posted.deliver()
        if deadline is not None and time.monotonic() >= deadline:
            return False


def _sampler(vcpus: Sequence[Vcpu], state: _Run, hz: float) -> None:
    """Ask each vCPU where the guest is, ``hz`` times a second, until the run stops."""
    while not state.done.wait(1 / hz):
        for v in vcpus:
            v.sample()


def _merged_samples(vcpus: Sequence[Vcpu]) -> Counter[int]:
    total: Counter[int] = Counter()
    for v in vcpus:
        total.update(v.rip_samples)
    return total


def _unplugged(data: bytes) -> None:
    pass


def _devices(vm: Vm, console: Console, state: _Run,
             serial_sinks: Sequence[Callable[[bytes], None]] = ()) -> IoBus:
    bus = IoBus()
    lines = IrqLines(vm)
    # Every port the ACPI tables describe answers; one with no sink is a UART with nothing
    # plugged in (what the guest writes there goes nowhere).
    sinks = [console.write, *serial_sinks]
    for n, port in enumerate(board.SERIAL_PORTS):
        sink = sinks[n] if n < len(sinks) else _unplugged
        bus.add(port.base, board.SERIAL_PORT_COUNT, Serial8250(sink, lines.source(port.irq)))
    bus.add(board.I8042_BASE, board.I8042_PORT_COUNT,
            I8042(lambda: state.stop(StopReason.RESET, "i8042 reset (0xfe)")))
    bus.add(board.RTC_BASE, board.RTC_PORT_COUNT, CmosRtc())
    bus.add(board.EXIT_PORT, 1, ExitPort(lambda status: state.stop(
        StopReason.EXIT_PORT, f"guest wrote {status} to port {board.EXIT_PORT:#x}", status)))
    return bus


#: Signals only the main thread takes: the kernel then never picks a vCPU thread for them,
#: so Ctrl-C always wakes the thread that waits for the stop condition.
MAIN_THREAD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
SIGNAL_DETAIL = "interrupted by a signal (SIGINT, SIGTERM or SIGHUP)"


@contextmanager
def _signals_held() -> Iterator[None]:
    """MAIN_THREAD_SIGNALS wait (pending, not lost) until the block ends; then the first of
    them raises KeyboardInterrupt as usual."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class _SignalsNoted:
    """From ``note`` (the guest is about to run) until the block ends (the VM is closed),
    MAIN_THREAD_SIGNALS only note themselves in ``seen``, which the run's waits look at. Raised
    as KeyboardInterrupt they could land anywhere in the main thread: inside threading.Event's
    wait, after it took its own lock (a later ``set`` then waits for ever), or in the middle of
    the stop (the VM then closed under a running vCPU: a crash). Measured before: 3 crashes or
    hangs in 480 double Ctrl-Cs. Signals that come once the block has ended raise as usual."""

    def __init__(self) -> None:
        self.seen: list[int] = []  # appended by the handler: no lock is taken in it
        self._previous: dict[signal.Signals, Any] = {}

    def note(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread gets them (signal.signal refuses other threads)
        for number in MAIN_THREAD_SIGNALS:
            if number not in self._previous:  # a second round of the run keeps the first's
                self._previous[number] = signal.signal(number, self._noted)

    def _noted(self, number: int, frame: object) -> None:
        self.seen.append(number)

    def __enter__(self) -> _SignalsNoted:
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def _vcpu_loop(vcpu: Vcpu, bus: IoBus, state: _Run) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    exits = state.exits
    allstop = state.allstop
    try:
        while not state.done.is_set():
            if allstop is not None and not allstop.runnable(vcpu):
                allstop.park(vcpu)  # stopped for the debugger, with every other vCPU
                continue
            ex = vcpu.run()
            if isinstance(ex, IoOut):
                exits["io"] += 1
                size = ex.size
                with state.device_lock:
                    for i in range(0, len(ex.data), size):
                        bus.write(ex.port, size, int.from_bytes(ex.data[i : i + size], "little"))
            elif isinstance(ex, IoIn):
                exits["io"] += 1
                with state.device_lock:
                    data = b"".join(bus.read(ex.port, ex.size).to_bytes(ex.size, "little")
                                    for _ in range(ex.count))
                vcpu.complete_io_in(data)
            elif isinstance(ex, MmioRead):
                exits["mmio"] += 1
                vcpu.complete_mmio_read(b"\xff" * ex.size)
            elif isinstance(ex, MmioWrite):
                exits["mmio"] += 1
            elif isinstance(ex, Interrupted):
                if allstop is None:
                    return  # the run is over (a paused vCPU parks at the top instead)
            elif isinstance(ex, Debug):
                if allstop is not None:
                    allstop.debug_exit(vcpu, ex)
            elif isinstance(ex, Halt):
                state.stop(StopReason.HALT, f"cpu{vcpu.index} halted with interrupts off")
            elif isinstance(ex, Shutdown):
                if ex.reason == "reset":
                    state.stop(StopReason.RESET, "guest reset")
                else:
                    _fault(vcpu, state, ex.reason, b"")
            elif isinstance(ex, InternalError):
                _fault(vcpu, state, ex.reason, ex.instruction)
            elif isinstance(ex, Unknown):
                _fault(vcpu, state, ex.reason, b"")
    except errors.VmmArchError as e:
        _fault(vcpu, state, str(e), b"")


def _fault(vcpu: Vcpu, state: _Run, reason: str, instruction: bytes) -> None:
    regs: Regs | None
    sregs: Sregs | None
    code: CodeWindow | None = None
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        from vmmarch_cli.crash import read_code  # only at a fault

        code = read_code(state.prepared.vm.memory, sregs, regs.rip)
    except errors.VmmArchError:
        regs, sregs = None, None
    with state.lock:
        if state.fault is None:
            state.fault = Fault(vcpu.index, reason, instruction, regs, sregs, code)
    detail = f"cpu{vcpu.index}: {reason}"
    if instruction:
        detail += f" (instruction bytes {instruction.hex(' ')})"
    state.stop(StopReason.FAULT, detail)
