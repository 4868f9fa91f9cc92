"""The emulated local APIC and I/O APIC (backends/emulate/apic.py) against the SDM's rules,
on a fake clock (timer modes and divisors, priorities, EOI, self-IPIs, I/O APIC routing), and
the apictimer guest (periodic timer, ISR, EOI, masking, a self-IPI) on both backends."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmmarch_cli.backends.emulate import apic
from vmmarch_cli.memory import MmapGuestMemory
from vmmarch_cli.vcpu import LAPIC_PAGE_SIZE, Lapic

from conftest import needs_unicorn, run_cli

HZ = 1_000_000_000  # one tick per ns at divide-by-1: easy arithmetic


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def _apic(clock: Clock) -> apic.LocalApic:
    page = bytearray(LAPIC_PAGE_SIZE)
    page[apic.APIC_ID + 3] = 0  # APIC ID 0
    m = apic.LocalApic(Lapic(bytes(page)), HZ, clock)
    m.write(apic.APIC_SVR, 4, apic.SVR_ENABLED | 0xFF)
    return m


def test_one_shot_timer_counts_down_and_fires_once() -> None:
    clock = Clock()
    m = _apic(clock)
    m.write(apic.APIC_TIMER_DIVIDE, 4, 0b1011)  # divide by 1
    m.write(apic.APIC_LVT_TIMER, 4, 0xEC)  # one-shot, vector 0xEC
    m.write(apic.APIC_TIMER_INITIAL, 4, 1000)
    clock.ns = 400
    assert m.read(apic.APIC_TIMER_CURRENT, 4) == 600
    m.tick(clock.ns)
    assert m.pending() is None
    clock.ns = 1000
    m.tick(clock.ns)
    assert m.pending() == 0xEC and m.deadline() is None
    assert m.read(apic.APIC_TIMER_CURRENT, 4) == 0


def test_periodic_timer_reloads_and_divider_scales() -> None:
    clock = Clock()
    m = _apic(clock)
    m.write(apic.APIC_TIMER_DIVIDE, 4, 0b0011)  # divide by 16 (SDM figure 10-10)
    m.write(apic.APIC_LVT_TIMER, 4, 1 << apic.TIMER_MODE_SHIFT | 0xEC)
    m.write(apic.APIC_TIMER_INITIAL, 4, 100)  # 1600 ns a period
    assert m.deadline() == 1600
    clock.ns = 3300  # two periods have passed: one interrupt, next deadline on the grid
    m.tick(clock.ns)
    assert m.pending() == 0xEC and m.deadline() == 4800


def test_masked_timer_does_not_interrupt() -> None:
    clock = Clock()
    m = _apic(clock)
    m.write(apic.APIC_LVT_TIMER, 4, apic.LVT_MASKED | 0xEC)
    m.write(apic.APIC_TIMER_INITIAL, 4, 10)
    clock.ns = 10**6
    m.tick(clock.ns)
    assert m.pending() is None


def test_priority_isr_and_eoi() -> None:
    m = _apic(Clock())
    m.raise_vector(0x31)
    m.raise_vector(0x51)
    assert m.pending() == 0x51  # the highest vector first (SDM 10.8.3)
    m.accept(0x51)
    assert m.pending() is None  # 0x31's class is below the in-service 0x51's
    m.write(apic.APIC_EOI, 4, 0)
    assert m.pending() == 0x31
    m.write(apic.APIC_TPR, 4, 0x40)
    assert m.pending() is None  # class 3 is masked by TPR class 4
    assert m.read(apic.APIC_PPR, 4) == 0x40


def test_self_ipi_and_software_disable() -> None:
    m = _apic(Clock())
    m.write(apic.APIC_ICR_LOW, 4, 1 << apic.ICR_SHORTHAND_SHIFT | 0xFB)  # self, fixed
    assert m.pending() == 0xFB
    assert not m.read(apic.APIC_ICR_LOW, 4) & apic.ICR_DELIVERY_STATUS  # "sent"
    m.write(apic.APIC_SVR, 4, 0xFF)  # software-disabled: nothing is presented
    assert m.pending() is None


def test_registers_read_back_and_read_only_ones_stay() -> None:
    m = _apic(Clock())
    assert m.read(apic.APIC_VERSION, 4) == apic.VERSION_VALUE
    m.write(apic.APIC_VERSION, 4, 0)
    assert m.read(apic.APIC_VERSION, 4) == apic.VERSION_VALUE
    m.write(apic.APIC_LDR, 4, 0x0100_0000)
    assert m.read(apic.APIC_LDR, 4) == 0x0100_0000
    assert m.read(apic.APIC_LDR + 3, 1) == 0x01  # byte access within the register
    assert m.page().register(apic.APIC_LDR) == 0x0100_0000


def test_ioapic_routes_rising_edges_of_unmasked_pins() -> None:
    delivered: list[int] = []
    io = apic.IoApic(1, delivered.append)
    io.write(apic.IOREGSEL, 4, apic.IOAPIC_VER)
    assert io.read(apic.IOWIN, 4) == apic.IOAPIC_VERSION_VALUE
    io.set_irq(4, True)  # masked at reset: nothing
    io.set_irq(4, False)
    io.write(apic.IOREGSEL, 4, apic.IOAPIC_REDTBL + 2 * 4)
    io.write(apic.IOWIN, 4, 0x24)  # pin 4 -> vector 0x24, unmasked, edge
    assert io.read(apic.IOWIN, 4) == 0x24
    io.set_irq(4, True)
    io.set_irq(4, True)  # still high: no new edge
    io.set_irq(4, False)
    io.set_irq(4, True)
    assert delivered == [0x24, 0x24]


def test_ioapic_unmasking_a_high_line_delivers_it() -> None:
    delivered: list[int] = []
    io = apic.IoApic(1, delivered.append)
    io.set_irq(3, True)
    io.write(apic.IOREGSEL, 4, apic.IOAPIC_REDTBL + 2 * 3)
    io.write(apic.IOWIN, 4, 0x23)
    assert delivered == [0x23]


# --- the apictimer guest on both backends ---------------------------------------------------

CHECK_LINE = re.compile(r"^CHECK (\w+) ([0-9a-f]{16}) (ok|FAIL)$", re.M)


def _apictimer(guests: dict[str, Path], backend: str) -> tuple[int, dict[str, tuple[str, str]]]:
    p = run_cli("boot", str(guests["apictimer"]), "--backend", backend, "--timeout", "60")
    return p.returncode, {n: (v, ok) for n, v, ok in CHECK_LINE.findall(p.stdout)}


@needs_unicorn
def test_timer_ipi_and_eoi_on_the_emulator(guests: dict[str, Path]) -> None:
    status, checks = _apictimer(guests, "emulate")
    assert len(checks) == 6 and status == 0, checks


@needs_unicorn
@pytest.mark.usefixtures("kvm")
def test_same_apic_behaviour_as_kvm(guests: dict[str, Path]) -> None:
    from vmmarch_cli.backends.kvm.system import host_needs_ring0_workarounds

    _, emulated = _apictimer(guests, "emulate")
    status, on_kvm = _apictimer(guests, "kvm")
    differ = {n for n in on_kvm if on_kvm[n] != emulated.get(n)}
    # Measured on kvm_pvm: a handler reading the ISR finds its vector's bit clear (the host
    # delivers the interrupt without the in-service state the SDM describes, 10.8.4).
    expected = {"timer_in_service"} if host_needs_ring0_workarounds() else set()
    assert differ == expected, {n: (on_kvm[n], emulated.get(n)) for n in differ}
    assert status == len(expected)


@needs_unicorn
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_the_io_apic_id_register_says_what_the_madt_and_mp_table_say(cpus: int) -> None:
    from vmmarch_cli.arch.x86_64 import acpi, mptable
    from vmmarch_cli.backends.emulate.vm import EmulateVm

    with MmapGuestMemory([(0, 16 << 20)]) as memory:
        vm = EmulateVm(memory)
        try:
            for i in range(cpus):
                vm.create_vcpu(i)
            vm.ioapic.write(apic.IOREGSEL, 4, apic.IOAPIC_ID)
            register = vm.ioapic.read(apic.IOWIN, 4) >> 24
        finally:
            vm.close()
    madt = acpi.decode_madt(acpi.Table("APIC", 0, 1, acpi.madt(cpus)))
    in_madt = next(r["ioapic_id"] for r in madt if r["type"] == "io_apic")
    table = mptable.build(cpus, 0)
    in_mp = mptable.read(lambda a, n: table.data[a:a + n], 0)["ioapics"][0]["id"]
    assert register == in_madt == in_mp == cpus
