"""What a boot is asked to do, as one frozen value built from the command line or the API."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vmmarch_cli.arch.x86_64 import layout
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.loader.errors import InvalidMemorySize
from vmmarch_cli.loader.host_decompress import Decompress

MIN_MEM = 16 * layout.MiB
#: 1 TiB: far beyond this machine, but below anything that overflows the 52-bit address space.
MAX_MEM = 1 << 40
DEFAULT_MEM = 256 * layout.MiB

#: The command line every boot starts from (Firecracker's defaults, adapted): serial console from
#: the first printk, reset through the keyboard controller, no PCI scan, reboot on panic at once
#: (a panic must never look like a hang), i8042 probing kept short.
BASE_CMDLINE = (
    "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 pci=off nomodule "
    "i8042.noaux i8042.nomux i8042.dumbkbd"
)
#: Added when the backend hides CPU features for a ring-0 emulator (docs/limited-kvm.md):
#: - the MDS/TAA mitigations execute ``verw`` on every return to user space, which such an
#:   emulator rejects;
#: - three tracing initcalls are pure set-up work that the emulator runs for minutes, measured
#:   with initcall_debug on Debian's 6.1 cloud kernel: trace_eval_init 122 s,
#:   tracer_init_tracefs (its tracefs work blocks init_kprobe_trace) 236 s, and
#:   ftrace_check_for_weak_functions (37,697 symbol lookups that hold the only CPU) about 90 s.
#:   Skipping them leaves tracefs without event files; nothing else in the boot needs them.
#: - load_system_certificate_list (61 s: X.509 parsing of the built-in keys, used only to check
#:   module signatures, and vmm-arch boots with ``nomodule``) and slab_sysfs_init (42 s:
#:   /sys/kernel/slab) are skipped too, and ``cryptomgr.notests`` skips the crypto self-tests
#:   (crypto_algapi_init ran them for over 6 minutes).
EMULATED_RING0_CMDLINE = (
    "mitigations=off "
    "initcall_blacklist=trace_eval_init,tracer_init_tracefs,ftrace_check_for_weak_functions,"
    "load_system_certificate_list,slab_sysfs_init "
    "cryptomgr.notests"
)

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": layout.MiB, "k": layout.KiB, "m": layout.MiB, "g": layout.GiB, "t": 1 << 40}


def parse_mem_size(text: str) -> int:
    """``256M``, ``4G``, ``512MiB``, ``1048576K``; a bare number is MiB (as QEMU's ``-m``)."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidMemorySize(
            f"memory size {text!r} is not a number with an optional K/M/G/T suffix"
        )
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if size % 4096:
        raise InvalidMemorySize(f"memory size {text!r} is not a multiple of 4 KiB")
    if not MIN_MEM <= size <= MAX_MEM:
        raise InvalidMemorySize(
            f"memory size {text!r} is outside {MIN_MEM >> 20} MiB .. {MAX_MEM >> 40} TiB"
        )
    return size


@dataclass(frozen=True)
class BootConfig:
    kernel: Path
    backend: str = "auto"  # a backend name, or backends.AUTO
    initrd: Path | None = None
    cmdline: str | None = None  # None: BASE_CMDLINE (+ the backend's extras)
    append: str = ""
    mem_size: int = DEFAULT_MEM
    cpus: int = 1
    cpu_mask: frozenset[str] | None = None  # None: the backend's default for this host
    timeout: float | None = None
    expect: tuple[str, ...] = field(default=())
    boot_protocol: BootProtocol | None = None  # None: auto (machine.choose_protocol)
    decompress: Decompress = Decompress.AUTO  # a bzImage's payload: by the host or the guest
    profile_hz: float = 0.0  # sample the guest RIP this often (0: off)
    snapshot: Path | None = None  # save the guest here when --expect stops the run
    #: The snapshot is a cache entry (``vmm-arch run``): written without an fsync (~40 ms of a
    #: first run). A crash may then leave it torn, which its CRCs find at the next restore,
    #: and it is taken again; a user's ``--snapshot FILE`` is synced before it is renamed.
    snapshot_cached: bool = False
    #: Files whose pages the snapshot may keep by reference instead of in its image
    #: (snapshot/refs.py): only files vmm-arch keeps unchanged (``vmm-arch run``'s busybox).
    snapshot_refs: tuple[Path, ...] = ()
    restore: Path | None = None  # start from this snapshot instead of loading ``kernel``
