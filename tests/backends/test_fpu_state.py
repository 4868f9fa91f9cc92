"""The whole x87 and SSE state through the neutral ``Fpu`` on both backends: what is set reads
back, also after the guest ran an instruction, and both backends read the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmmarch_cli import machine
from vmmarch_cli.arch.x86_64 import board
from vmmarch_cli.config import BootConfig
from vmmarch_cli.vcpu import Fpu, IoOut

from conftest import kvm_unusable_reason

ONE = 0x3FFF << 64 | 1 << 63  # 1.0 as an 80-bit extended real (SDM vol. 1 4.2.2)
MINUS_TWO = 0xC000 << 64 | 1 << 63
OUT_IMM8_AL = 0xE6  # out imm8, al (SDM vol. 2B, OUT)
STATE = Fpu(
    fcw=0x27F,  # round to nearest, double precision, all exceptions masked
    mxcsr=0x1FA0,
    fsw=0,  # TOP = 0: ST(i) is physical register R(i)
    ftw=0b0000_0011,  # ST0 and ST1 hold values, the rest are empty
    st=(ONE, MINUS_TWO, 0, 0, 0, 0, 0, 0),
    xmm=tuple((0x0123_4567_89AB_CDEF << 64 | i) for i in range(16)),
)


@pytest.mark.parametrize("backend", ["emulate", "kvm"])
def test_the_fpu_state_round_trips_and_survives_a_run(guests: dict[str, Path],
                                                     backend: str) -> None:
    if backend == "kvm" and (reason := kvm_unusable_reason()) is not None:
        pytest.skip(reason)
    config = BootConfig(kernel=guests["bootcheck"], backend=backend, cpu_mask=frozenset())
    with machine.prepare(config) as p:
        v = p.vcpus[0]
        assert v.get_fpu() == Fpu()  # the pipeline's FNINIT state
        v.set_fpu(STATE)
        assert v.get_fpu() == STATE
        # OUT to the exit port: an exit on every backend (KVM's in-kernel irqchip keeps a HLT)
        p.vm.memory.write(p.plan_entry, bytes((OUT_IMM8_AL, board.EXIT_PORT)))
        assert v.run() == IoOut(board.EXIT_PORT, 1, b"\0")
        assert v.get_fpu() == STATE
