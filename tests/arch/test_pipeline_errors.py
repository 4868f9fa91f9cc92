"""A pipeline step that fails says which step, on which target, and why: the backend's own
error is chained and its exit status kept."""

from __future__ import annotations

import pytest

from vmmarch_cli import backends
from vmmarch_cli.arch.x86_64 import e820
from vmmarch_cli.arch.x86_64.pipeline import VCPU_STEPS, BootPlan, configure
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.errors import EX_SOFTWARE, BackendError, PipelineStepError
from vmmarch_cli.memory import MmapGuestMemory

pytestmark = pytest.mark.usefixtures("kvm")


def test_a_failing_vcpu_step_names_the_step_and_the_vcpu() -> None:
    hv = backends.open_backend("kvm", quiet=True)
    memory = MmapGuestMemory(e820.ram_layout(64 << 20))
    vm = hv.create_vm(memory)
    try:
        good, gone = vm.create_vcpu(0), vm.create_vcpu(1)
        gone.close()  # the backend refuses every call on it: a real failure of a real step
        plan = BootPlan(entry=0x100_0000, cmdline=b"console=ttyS0\0",
                        protocol=BootProtocol.LINUX64, ram_regions=tuple(vm.memory.regions()),
                        cpu_count=2)
        with pytest.raises(PipelineStepError) as raised:
            configure(plan, vm.memory, [good, gone], vm.supported_cpuid())
    finally:
        vm.close()
        hv.close()
        memory.close()
    error = raised.value
    assert (error.step, error.target) == (VCPU_STEPS[0][0], "cpu1")
    assert isinstance(error.__cause__, BackendError)
    assert str(error) == f"cpuid on cpu1: {error.__cause__}"  # KVM_SET_CPUID2 failed: ...
    assert error.exit_status == EX_SOFTWARE
