"""A KVM VM: memory slots over the shared guest mappings, in-kernel irqchip and PIT, vCPUs."""

from __future__ import annotations

import os

from vmmarch_cli.arch.x86_64 import layout
from vmmarch_cli.backends.kvm import abi, snapshot
from vmmarch_cli.backends.kvm.system import check_extension, checked, ioctl
from vmmarch_cli.backends.kvm.vcpu import KvmVcpu, cpuid_from_kvm
from vmmarch_cli.vcpu import CpuidEntry, HostMemory

#: Room for KVM_GET_SUPPORTED_CPUID; KVM answers E2BIG if it has more leaves (none does today).
MAX_CPUID_ENTRIES = 256


class KvmVm:
    def __init__(self, kvm_fd: int, memory: HostMemory) -> None:
        self._kvm_fd = kvm_fd
        self.memory = memory
        self._vcpus: list[KvmVcpu] = []
        self._fd = -1
        try:
            self._fd = checked(kvm_fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            self._mmap_size = checked(kvm_fd, abi.KVM_GET_VCPU_MMAP_SIZE, None,
                                      "KVM_GET_VCPU_MMAP_SIZE")
            self._has_xsave = check_extension(kvm_fd, abi.KVM_CAP_XSAVE) > 0
            self._has_xcrs = check_extension(kvm_fd, abi.KVM_CAP_XCRS) > 0
            self._msrs: list[int] | None = None
            # The VMX real-mode TSS needs three pages of guest-physical space outside RAM.
            checked(self._fd, abi.KVM_SET_TSS_ADDR, layout.KVM_TSS_ADDRESS, "KVM_SET_TSS_ADDR")
            # The irqchip must exist before any vCPU (Documentation/virt/kvm/api.rst 4.24).
            checked(self._fd, abi.KVM_CREATE_IRQCHIP, None, "KVM_CREATE_IRQCHIP")
            pit = abi.kvm_pit_config()
            pit.flags = abi.KVM_PIT_SPEAKER_DUMMY  # port 0x61 answered in the kernel
            checked(self._fd, abi.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")
            for slot, (start, length, host) in enumerate(self.memory.host_regions()):
                region = abi.kvm_userspace_memory_region()
                region.slot, region.guest_phys_addr = slot, start
                region.memory_size, region.userspace_addr = length, host
                checked(self._fd, abi.KVM_SET_USER_MEMORY_REGION, region,
                        "KVM_SET_USER_MEMORY_REGION")
        except BaseException:
            self.close()
            raise

    def supported_cpuid(self) -> list[CpuidEntry]:
        header, entries = abi.cpuid_buffer(MAX_CPUID_ENTRIES)
        checked(self._kvm_fd, abi.KVM_GET_SUPPORTED_CPUID, header, "KVM_GET_SUPPORTED_CPUID")
        return [cpuid_from_kvm(entries[i]) for i in range(header.nent)]

    def create_vcpu(self, index: int) -> KvmVcpu:
        fd = checked(self._fd, abi.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU {index}")
        try:
            vcpu = KvmVcpu(index, fd, self._mmap_size, self._has_xsave, self._has_xcrs,
                           self._snapshot_msrs)
        except BaseException:
            os.close(fd)
            raise
        self._vcpus.append(vcpu)
        return vcpu

    # --- snapshots (vcpu.SnapshotVm; snapshot.py) --------------------------------------

    def snapshot_identity(self) -> str:
        return snapshot.identity(self.supported_cpuid())

    def snapshot_refusal(self) -> str | None:
        return snapshot.refusal(self._kvm_fd)

    def save_state(self) -> bytes:
        return snapshot.save_vm(self._fd)

    def restore_state(self, data: bytes) -> None:
        snapshot.restore_vm(self._fd, data)

    def _snapshot_msrs(self) -> list[int]:
        if self._msrs is None:
            self._msrs = snapshot.msrs_to_save(self._kvm_fd)
        return self._msrs

    def set_irq_line(self, irq: int, level: bool) -> None:
        line = abi.kvm_irq_level()
        line.irq, line.level = irq, int(level)
        ioctl(self._fd, abi.KVM_IRQ_LINE, line)

    def close(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
