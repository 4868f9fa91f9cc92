"""``vmm-arch run`` from a snapshot: one guest booted once to where its init waits for a job,
saved in the cache; every run restores it and hands it the job.

The job (the command, its files and the host's time: initramfs.job) goes to the guest
through COM4's receiver (board.RUN_JOB_PORT), queued after the restore and before the first
instruction, where the waiting init reads it (initramfs.job_init_script). Each byte costs the
guest two port exits (~30 us), so a job larger than MAX_JOB boots afresh instead, its files in
the initramfs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from vmmarch_cli import files
from vmmarch_cli.arch.x86_64 import board
from vmmarch_cli.devices.bus import IoBus
from vmmarch_cli.devices.serial import Serial8250
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.initramfs import Job

#: The largest job sent through the UART: ~0.5 s of port exits at most.
MAX_JOB = 16 << 10
#: Bumped when what a cached snapshot holds changes meaning (the job init, the channel).
KEY_VERSION = b"vmm-arch run snapshot 1"


def fits(job: Job) -> bool:
    return len(job.header()) + len(job.archive) <= MAX_JOB


def snapshot_path(kernel: Path, busybox: Path, init: str, settings: Sequence[str]) -> Path:
    """Where the snapshot for this kernel and busybox (their files: path, size, mtime, inode),
    this job init and these settings (memory, vCPUs, command line, backend) lives in the cache.
    Files are named by their identity, not hashed: a run reads neither (the key is all a run
    from the snapshot computes before it restores)."""
    key = hashlib.sha256(KEY_VERSION)
    parts = [*_identity(kernel), *_identity(busybox), init, *settings]
    for part in parts:
        key.update(part.encode() + b"\0")
    return files.cache_dir() / "snapshots" / f"run-{key.hexdigest()[:24]}.snap"


def _identity(path: Path) -> list[str]:
    st = os.stat(path)
    return [str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), str(st.st_ino)]


def hand_over(job: Job) -> Callable[[IoBus], None]:
    """What queues ``job`` on the job UART of a restored guest before it runs (machine.run's
    ``before_start``)."""

    def deliver(bus: IoBus) -> None:
        for port, device in bus.devices():
            if port == board.RUN_JOB_PORT.base and isinstance(device, Serial8250):
                device.feed(job.header() + job.archive)
                return
        raise BadInputError(f"no UART at {board.RUN_JOB_PORT.name} to hand the job to")

    return deliver
