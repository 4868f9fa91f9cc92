"""A stopped guest into a snapshot file, and a snapshot into a new VM before it first runs.

What a snapshot keeps (sections of the file, fileformat.py):

* ``vm``: the VM's own state (the emulate backend's I/O APIC), from ``SnapshotVm``;
* ``cpu<N>``: each vCPU's state, from ``SnapshotVcpu``;
* ``cpu<N> readback``: the same vCPU as the neutral interface reads it (readback.py), JSON, for
  ``dump-regs`` to show and compare without a restore;
* ``device <port>``: each device on the port bus with state (UART, i8042, RTC), as JSON;
* guest RAM, as the memory image.

Its description names the backend and the engine build that made it, the machine (RAM size,
vCPUs) and the kernel that booted, for the checks a restore makes and for ``vmm-arch resume``
to report.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping, Sequence
from io import BufferedReader
from pathlib import Path
from typing import Any, Protocol, cast

from vmmarch_cli import files
from vmmarch_cli.devices.bus import IoBus
from vmmarch_cli.devices.i8042 import I8042, I8042State
from vmmarch_cli.devices.rtc import CmosRtc, RtcState
from vmmarch_cli.devices.serial import Serial8250, SerialState
from vmmarch_cli.errors import BackendUnavailableError
from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.readback import readback
from vmmarch_cli.snapshot import fileformat, image, refs
from vmmarch_cli.snapshot.fileformat import Snapshot, SnapshotError
from vmmarch_cli.snapshot.writer import Writing
from vmmarch_cli.vcpu import SnapshotVcpu, SnapshotVm, Vcpu, Vm

#: Device kinds by class, and the state record each keeps.
DEVICES: dict[type, tuple[str, type]] = {
    Serial8250: ("uart", SerialState),
    I8042: ("i8042", I8042State),
    CmosRtc: ("rtc", RtcState),
}
VM_SECTION = "vm"


class StatefulDevice(Protocol):
    """A device with a state record (``DEVICES``): ``save`` gives it, ``restore`` takes it."""

    def save(self) -> Any: ...
    def restore(self, state: Any) -> None: ...


def cpu_section(index: int) -> str:
    return f"cpu{index}"


def device_section(port: int) -> str:
    return f"device {port:#x}"


def readback_section(index: int) -> str:
    return f"cpu{index} readback"


def readbacks(snapshot: Snapshot) -> list[dict[str, Any]]:
    """Each vCPU's state as its backend reported it when the snapshot was taken
    (readback.py: what ``dump-regs`` shows), from the snapshot alone."""
    try:
        cpus = int(snapshot.description["machine"]["cpus"])
        return [json.loads(_section(snapshot, readback_section(i))) for i in range(cpus)]
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{snapshot.path}: its vCPU state does not parse: {e}") from None


def require_snapshots(backend: str, vm: Vm, vcpus: Sequence[Vcpu]) -> None:
    """Refuse, before the guest runs, a backend that could not save it at the end."""
    if not isinstance(vm, SnapshotVm) or not all(isinstance(v, SnapshotVcpu) for v in vcpus):
        raise BackendUnavailableError(f"the {backend} backend cannot take snapshots yet")
    refusal = vm.snapshot_refusal()
    if refusal is not None:
        raise BackendUnavailableError(refusal)


def save(path: Path, backend: str, vm: Vm, vcpus: Sequence[Vcpu], memory: MmapGuestMemory,
         bus: IoBus, machine: Mapping[str, Any], sync: bool = True,
         ref_files: Sequence[Path] = (), background: bool = False) -> Writing | None:
    """Write what ``vm`` (stopped: no vCPU runs) holds to ``path`` (``sync``: on disk before it
    is renamed into place; fileformat.write). Pages equal to pages of ``ref_files`` are kept
    by reference to them (refs.py). Raises BackendUnavailableError when the backend cannot,
    BadInputError when ``path`` cannot be written.

    With ``background`` (a cache entry) the state is taken now and the file is written by a
    child process that outlives the caller (writer.py); None then means another process is
    writing it."""
    require_snapshots(backend, vm, vcpus)
    assert isinstance(vm, SnapshotVm)
    sections: dict[str, bytes] = {VM_SECTION: vm.save_state()}
    for v in vcpus:
        assert isinstance(v, SnapshotVcpu)
        sections[cpu_section(v.index)] = v.save_state()
        # After save_state: on KVM it completes an exit's I/O first.
        sections[readback_section(v.index)] = json.dumps(readback(v)).encode()
    for port, device in bus.devices():
        kind = DEVICES.get(type(device))
        if kind is not None:
            state = dataclasses.asdict(cast(StatefulDevice, device).save())
            sections[device_section(port)] = json.dumps({"kind": kind[0], **state}).encode()
    description: dict[str, Any] = {"backend": backend, "engine": vm.snapshot_identity(),
                                   "machine": machine}
    source = image.MemorySource([(host, length) for _, length, host in memory.host_regions()])
    if background:
        return Writing.start(path, lambda: _write(path, description, sections, source, sync,
                                                  ref_files))
    _write(path, description, sections, source, sync, ref_files)
    return None


def _write(path: Path, description: dict[str, Any], sections: Mapping[str, bytes],
           source: image.MemorySource, sync: bool, ref_files: Sequence[Path]) -> None:
    """The file: the memory image, with the pages ``ref_files`` hold kept by reference."""
    memory_runs = image.runs(source)
    kept = [ref for ref in (refs.find(source, memory_runs, f) for f in ref_files)
            if ref is not None]
    if kept:
        description[refs.MEMORY_REFS] = [ref.as_json() for ref in kept]
        memory_runs = refs.without(memory_runs, kept)
    try:
        fileformat.write(path, description, sections, source, sync, memory_runs)
    except OSError as e:
        raise files.output_error(path, e) from None


class MemoryCheck:
    """The memory image's CRC on a thread of its own (zlib sums without the GIL), beside the
    restore's other work; ``result`` waits for it and raises what it found."""

    def __init__(self, snapshot: Snapshot, f: BufferedReader) -> None:
        self._error: SnapshotError | None = None
        self._thread = threading.Thread(target=self._check, args=(snapshot, f),
                                        name="snapshot-crc", daemon=True)
        self._thread.start()

    def _check(self, snapshot: Snapshot, f: BufferedReader) -> None:
        try:
            fileformat.check_memory(snapshot, f)
        except SnapshotError as e:
            self._error = e

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def map_memory(snapshot: Snapshot, f: BufferedReader, memory: MmapGuestMemory) -> None:
    """Put the snapshot's guest RAM (the file open as ``f``) under ``memory``, copy-on-write."""
    if memory.size != snapshot.memory_length:
        raise SnapshotError(f"{snapshot.path}: holds {snapshot.memory_length >> 20} MiB of "
                            f"guest RAM; this VM has {memory.size >> 20} MiB")
    memory.map_private(f.fileno(), snapshot.memory_offset)  # the mappings keep the file
    refs.map_refs(refs.parse(snapshot.description, str(snapshot.path)), memory,
                  str(snapshot.path))


def restore_vm(snapshot: Snapshot, backend: str, vm: Vm, vcpus: Sequence[Vcpu]) -> None:
    """Give a new VM and its vCPUs (none has run) the snapshot's state."""
    if not isinstance(vm, SnapshotVm) or not all(isinstance(v, SnapshotVcpu) for v in vcpus):
        raise BackendUnavailableError(f"the {backend} backend cannot restore snapshots yet")
    refusal = vm.snapshot_refusal()
    if refusal is not None:
        raise BackendUnavailableError(refusal)
    made_by = snapshot.description.get("engine")
    if made_by != vm.snapshot_identity():
        raise SnapshotError(f"{snapshot.path}: taken on {made_by}; this {backend} backend runs "
                            f"{vm.snapshot_identity()} (take the snapshot again)")
    vm.restore_state(_section(snapshot, VM_SECTION))
    for v in vcpus:
        assert isinstance(v, SnapshotVcpu)
        v.restore_state(_section(snapshot, cpu_section(v.index)))


def restore_devices(snapshot: Snapshot, bus: IoBus) -> None:
    """Give the devices on ``bus`` (new, the guest not started) the snapshot's state."""
    for port, device in bus.devices():
        kind = DEVICES.get(type(device))
        if kind is None:
            continue
        name, record = kind
        try:
            fields = json.loads(_section(snapshot, device_section(port)))
            if fields.pop("kind") != name:
                raise ValueError(f"not a {name}")
            state = record(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in fields.items()})
            cast(StatefulDevice, device).restore(state)
        except (ValueError, KeyError, TypeError) as e:
            raise SnapshotError(f"{snapshot.path}: the device at port {port:#x} does not "
                                f"restore: {e}") from None


def _section(snapshot: Snapshot, name: str) -> bytes:
    data = snapshot.sections.get(name)
    if data is None:
        raise SnapshotError(f"{snapshot.path}: has no {name} state (another machine's "
                            "snapshot?)")
    return data
