"""The boot protocols vmm-arch can enter a kernel by."""

from __future__ import annotations

from enum import StrEnum


class BootProtocol(StrEnum):
    """How the guest is entered; the CLI (``--boot-protocol``) and the JSON use these names."""

    #: The 64-bit Linux boot protocol (boot.rst, "64-bit Boot Protocol"): boot_params, long mode.
    LINUX64 = "linux64"
    #: The Xen PVH entry (docs/misc/pvh.pandoc): hvm_start_info, 32-bit protected mode, paging off.
    PVH = "pvh"
