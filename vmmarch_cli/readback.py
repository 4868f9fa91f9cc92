"""A vCPU's state as its backend reports it through the neutral ``Vcpu`` interface: what
``vmm-arch dump-regs`` shows and compares, and what a snapshot keeps beside the backend's own
state, so that a snapshot's vCPUs can be shown and compared without restoring them."""

from __future__ import annotations

from typing import Any

from vmmarch_cli.arch.x86_64 import lapic, msr
from vmmarch_cli.render import hex64, regs_dict, sregs_dict
from vmmarch_cli.vcpu import Vcpu

#: MSRs read back: the boot list plus the two the CPU state depends on.
READBACK_MSRS = (
    *(e.index for e in msr.boot_msrs()),
    msr.MSR_EFER,
    msr.MSR_IA32_APIC_BASE,
)


def readback(vcpu: Vcpu) -> dict[str, Any]:
    """Everything dump-regs shows, read from the vCPU (never from our own inputs), as JSON
    data (64-bit values as hex strings)."""
    fpu = vcpu.get_fpu()
    lap = vcpu.get_lapic()
    return {
        "index": vcpu.index,
        "regs": regs_dict(vcpu.get_regs()),
        "sregs": sregs_dict(vcpu.get_sregs()),
        "fpu": {"fcw": f"{fpu.fcw:#06x}", "mxcsr": f"{fpu.mxcsr:#010x}"},
        "msrs": {msr.MSR_NAMES.get(e.index, f"{e.index:#x}"): hex64(e.value)
                 for e in vcpu.get_msrs(READBACK_MSRS)},
        "lapic": {"lvt0": f"{lap.register(lapic.APIC_LVT0):#010x}",
                  "lvt1": f"{lap.register(lapic.APIC_LVT1):#010x}"},
        "cpuid": [
            {"function": f"{e.function:#x}", "index": f"{e.index:#x}", "eax": f"{e.eax:#010x}",
             "ebx": f"{e.ebx:#010x}", "ecx": f"{e.ecx:#010x}", "edx": f"{e.edx:#010x}"}
            for e in vcpu.get_cpuid()
        ],
    }
