"""The error hierarchy: every failure vmm-arch reports falls into one of four kinds.

Each kind carries the CLI exit status it maps to (DESIGN.md, "Exit status of the CLI"); the
statuses follow BSD ``sysexits.h`` so a CI script can tell "the guest's test failed" from
"vmm-arch could not run it". Messages are one line that says what is wrong and what would fix it.
"""

from __future__ import annotations

# sysexits.h values (FreeBSD sysexits(3)).
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
# coreutils timeout(1) reports a timeout as 124.
EX_TIMEOUT = 124
# 128 + SIGINT, as a shell reports it.
EX_INTERRUPTED = 130
# virtme-ng's status for a kernel panic.
EX_PANIC = 255


class VmmArchError(Exception):
    """Root of every error vmm-arch raises on purpose."""

    exit_status = EX_SOFTWARE


class BadInputError(VmmArchError):
    """A kernel, initrd, cmdline or option value that vmm-arch refuses."""

    exit_status = EX_DATAERR


class BackendUnavailableError(VmmArchError):
    """The chosen hypervisor cannot be used here (missing device, permission, capability)."""

    exit_status = EX_UNAVAILABLE


class BackendError(VmmArchError):
    """The hypervisor refused a request it should have accepted (an ioctl failed)."""

    exit_status = EX_SOFTWARE


class GuestMemoryError(BadInputError):
    """An access outside every guest memory region."""


class PipelineStepError(VmmArchError):
    """An arch pipeline step failed: says which step on which target ("memory" or "cpuN"),
    chains the cause and keeps its exit status."""

    def __init__(self, step: str, target: str, cause: VmmArchError) -> None:
        super().__init__(f"{step} on {target}: {cause}")
        self.step = step
        self.target = target
        self.exit_status = cause.exit_status


class GuestFaultError(VmmArchError):
    """The guest stopped in a way it cannot recover from (triple fault, emulation failure)."""

    exit_status = EX_SOFTWARE
