"""backends/emulate/smp.py: which vCPUs an ICR write reaches (SDM vol. 3A 10.6.1-10.6.2), and
the CPU that the vCPUs take turns on. The stock kernel with 2 and 4 vCPUs is in
tests/stock/test_stock_emulate.py."""

from __future__ import annotations

import threading
import time

from vmmarch_cli.arch.x86_64 import lapic
from vmmarch_cli.backends.emulate import smp

# ICR low words as Linux writes them (arch/x86/kernel/smpboot.c, wakeup_secondary_cpu_via_init;
# apic_flat_64.c): INIT assert (level, assert), INIT de-assert, STARTUP to page 0x9a.
INIT_ASSERT = 0x0000_C500
INIT_DEASSERT = 0x0000_8500
STARTUP_9A = 0x0000_069A
FIXED_LOGICAL_FB = 0x0000_08FB  # vector 0xfb (call function), logical destination
ALL_BUT_SELF_FD = 0x000C_00FD  # shorthand 11: reschedule to everyone else


def test_init_and_startup_decode() -> None:
    init = smp.Ipi.decode(INIT_ASSERT, 2 << 24)
    assert init is not None and (init.mode, init.destination, init.logical) == \
        (lapic.APIC_MODE_INIT, 2, False)
    assert smp.Ipi.decode(INIT_DEASSERT, 2 << 24) is None  # ignored by a xAPIC
    sipi = smp.Ipi.decode(STARTUP_9A, 2 << 24)
    assert sipi is not None and (sipi.mode, sipi.vector) == (lapic.APIC_MODE_STARTUP, 0x9A)


def test_destinations() -> None:
    physical = smp.Ipi.decode(STARTUP_9A, 2 << 24)
    assert physical is not None
    assert physical.reaches(False, 2, 0) and not physical.reaches(False, 1, 0)
    broadcast = smp.Ipi.decode(STARTUP_9A, 0xFF << 24)
    assert broadcast is not None and all(broadcast.reaches(False, i, 0) for i in range(8))
    # Flat logical model: CPUs 1 and 3 (LDR bits 1 << 1 and 1 << 3).
    logical = smp.Ipi.decode(FIXED_LOGICAL_FB, 0b1010 << 24)
    assert logical is not None and logical.logical
    assert [i for i in range(4) if logical.reaches(False, i, 1 << i)] == [1, 3]
    others = smp.Ipi.decode(ALL_BUT_SELF_FD, 0)
    assert others is not None and others.reaches(False, 1, 0) and not others.reaches(True, 0, 1)


def test_cpu_is_handed_over_in_order_and_the_holder_is_asked_to_stop() -> None:
    cpu = smp.CpuLock(time_slice=0.01)
    order: list[str] = []
    kicked = threading.Event()
    cpu.acquire(kicked.set)  # the "running" vCPU

    def waiter(name: str) -> None:
        cpu.acquire(lambda: None)
        order.append(name)
        cpu.release()

    first = threading.Thread(target=waiter, args=("first",))
    first.start()
    time.sleep(0.05)  # first takes its ticket before second
    second = threading.Thread(target=waiter, args=("second",))
    second.start()
    assert kicked.wait(2), "a waiting vCPU must ask the running one to stop"
    cpu.release()
    first.join(5)
    second.join(5)
    assert order == ["first", "second"]
