"""Posted port I/O: the device registers a vCPU may read and write without an exit.

A kernel's console writes poll the UART's line status and write its data register, two port
accesses a byte, ~33,000 in a boot of Debian's kernel: each a trip from the CPU into Python on
the emulate backend. A device says which of its registers read the same without side effects
and which writes only produce output, in its present state (devices/bus.py, ``Posting``); a
vCPU that can (vcpu.PostedPortIo) then answers those reads itself and queues those writes.
This keeps the two in step: the queued writes reach the device, in order, before anything else
touches it, and whatever touched it is asked again what it posts. While the guest runs, the
queues are also emptied every ``INTERVAL`` so that the console streams.

Everything here runs under the run's device lock (machine.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from vmmarch_cli.devices.bus import IoBus, Posting, PostingDevice
from vmmarch_cli.vcpu import PostedPortIo, Vcpu

#: Seconds between deliveries of queued writes while the guest runs (console latency).
INTERVAL = 0.002

Post = tuple[int | None, bool]  # (the byte reads return or None, writes queued)
NOT_POSTED: Post = (None, False)


class PostedIo:
    def __init__(self, bus: IoBus, vcpus: Sequence[Vcpu]) -> None:
        self._bus = bus
        self._vcpus = [v for v in vcpus if isinstance(v, PostedPortIo) and v.can_post()]

        self._posted: dict[int, Post] = {}  # port -> what the vCPUs were told
        self._ports: dict[int, set[int]] = {}  # device base port -> its ports posted
        self._postings: dict[int, Posting] = {}  # device base port -> its last Posting
        self.queued_writes = 0
        self.active = False
        for base, device in bus.posting_devices():
            self._update(base, device)

    def deliver(self) -> None:
        """Hand the queued writes to their devices, oldest first."""
        for vcpu in self._vcpus:
            for port, data in vcpu.collect_posted():
                self.queued_writes += len(data)
                self._bus.write_queued(port, data)

    def accessed(self, port: int) -> None:
        """After an access that exited: ``port``'s device may post something else now. With
        no vCPU that posts there is nothing to update (the lookup below cost ~15 us an access,
        0.5 s of a boot on the unicorn wheel)."""
        if not self._vcpus:
            return
        found = self._bus.posting_at(port)
        if found is not None:
            self._update(*found)

    def reads(self) -> int:
        return sum(v.posted_reads() for v in self._vcpus)

    def _update(self, base: int, device: PostingDevice) -> None:
        posting: Posting = device.posting()
        if self._postings.get(base) == posting:
            return  # most exits leave it as it was
        self._postings[base] = posting
        wanted: dict[int, Post] = {}
        for offset, value in posting.reads.items():
            wanted[base + offset] = (value, offset in posting.queued)
        for offset in posting.queued:
            wanted.setdefault(base + offset, (None, True))
        for port in set(wanted) | self._ports.get(base, set()):
            post = wanted.get(port, NOT_POSTED)
            if self._posted.get(port, NOT_POSTED) != post:
                self._posted[port] = post
                for vcpu in self._vcpus:
                    self.active |= vcpu.post_port(port, *post)
        self._ports[base] = set(wanted)
