"""The KVM backend: /dev/kvm through real ioctls."""

from __future__ import annotations

import os

from vmmarch_cli.backends.kvm import abi
from vmmarch_cli.backends.kvm.system import (
    KVM_DEVICE,
    check_extension,
    host_needs_ring0_workarounds,
    open_kvm,
)
from vmmarch_cli.backends.kvm.vcpu import install_kick_handler
from vmmarch_cli.backends.kvm.vm import KvmVm
from vmmarch_cli.errors import BackendUnavailableError
from vmmarch_cli.vcpu import HostMemory, HypervisorInfo

#: Features whose instructions the ring-0 emulator of a PVM host rejects with
#: KVM_EXIT_INTERNAL_ERROR or turns into #UD; measured one by one on such a host
#: (../shared/reference/int3-and-emulation-failures.md, "other CPL0 instructions").
RING0_EMULATOR_MASK = frozenset({
    "cx16",        # lock cmpxchg16b (SLUB)
    "xsave", "osxsave",  # xrstor in FPU init; also hides AVX, which needs it
    "smap",        # clac/stac on every user access
    "popcnt",      # hweight alternatives
    "rdtscp", "rdpid",
    "invpcid",
    "movbe",       # #UD although the host has it
    "sse4_2",      # crc32q
    "ssse3", "sse4_1", "aes", "pclmulqdq", "sha_ni", "gfni", "vaes", "vpclmulqdq",
    "adx", "bmi1", "bmi2",
    "fsgsbase",    # rdgsbase/wrgsbase on every kernel entry
    "pku", "la57", "rtm", "hle", "waitpkg", "movdiri", "movdir64b", "rdseed",
    "avx", "avx2", "avx512f",
})


class KvmHypervisor:
    name = "kvm"

    def __init__(self, quiet: bool = False) -> None:
        self._fd = open_kvm()  # nothing to say while opening (``quiet`` is for other backends)

    @staticmethod
    def probe(facts: bool = True) -> HypervisorInfo:
        """Whether /dev/kvm is usable here, and why not, without keeping it open."""
        try:
            hv = KvmHypervisor()
        except BackendUnavailableError as e:
            return HypervisorInfo("kvm", False, str(e))
        try:
            return hv.info() if facts else HypervisorInfo("kvm", True)
        finally:
            hv.close()

    def info(self) -> HypervisorInfo:
        facts = {
            "device": str(KVM_DEVICE),
            "api_version": str(abi.KVM_API_VERSION),
            "max_vcpus": str(self.max_vcpus()),
            "xsave": "yes" if check_extension(self._fd, abi.KVM_CAP_XSAVE) else "no",
            "ring0": "emulated (PVM or no VMX/SVM): CPU mask and int3 fallback apply"
            if host_needs_ring0_workarounds() else "hardware",
        }
        return HypervisorInfo("kvm", True, "", facts)

    def default_cpu_mask(self) -> frozenset[str]:
        return RING0_EMULATOR_MASK if host_needs_ring0_workarounds() else frozenset()

    @staticmethod
    def runs_ring0_in_hardware() -> bool:
        """Guest kernel code runs on the CPU here (VMX/SVM), not in KVM's emulator."""
        return not host_needs_ring0_workarounds()

    def max_vcpus(self) -> int:
        # KVM_CAP_MAX_VCPUS; 0 from a kernel that predates it means KVM_CAP_NR_VCPUS
        # (Documentation/virt/kvm/api.rst 4.7, KVM_CREATE_VCPU).
        return (check_extension(self._fd, abi.KVM_CAP_MAX_VCPUS)
                or check_extension(self._fd, abi.KVM_CAP_NR_VCPUS))

    def create_vm(self, memory: HostMemory) -> KvmVm:
        install_kick_handler()
        return KvmVm(self._fd, memory)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
