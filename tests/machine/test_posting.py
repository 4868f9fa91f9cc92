"""The posting contract (devices/bus.py, ``Posting``), checked on the UART in every state a few
register accesses reach: a posted read returns what a read would, and changes nothing; a queued
write does exactly what the device's ``write_queued`` does later. A vCPU relies on both to
answer reads and queue writes without calling the device (posted_io.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vmmarch_cli.devices.serial import (
    UART_IER,
    UART_IER_RDI,
    UART_IER_THRI,
    UART_IIR,
    UART_LCR,
    UART_LCR_DLAB,
    UART_MCR,
    UART_MCR_LOOP,
    UART_MCR_OUT2,
    UART_RX,
    UART_TX,
    Serial8250,
)

Step = Callable[[Serial8250], object]

#: Accesses that move the UART between the states its posting depends on.
STEPS: dict[str, Step] = {
    "ier=0": lambda u: u.write(UART_IER, 1, 0),
    "ier=thri": lambda u: u.write(UART_IER, 1, UART_IER_THRI),
    "ier=rdi": lambda u: u.write(UART_IER, 1, UART_IER_RDI),
    "ier=both": lambda u: u.write(UART_IER, 1, UART_IER_THRI | UART_IER_RDI),
    "thr": lambda u: u.write(UART_TX, 1, ord("x")),
    "read iir": lambda u: u.read(UART_IIR, 1),
    "dlab on": lambda u: u.write(UART_LCR, 1, 0x03 | UART_LCR_DLAB),
    "dlab off": lambda u: u.write(UART_LCR, 1, 0x03),
    "loop on": lambda u: u.write(UART_MCR, 1, UART_MCR_OUT2 | UART_MCR_LOOP),
    "loop off": lambda u: u.write(UART_MCR, 1, UART_MCR_OUT2),
    "receive": lambda u: u.feed(b"a"),
    "read rx": lambda u: u.read(UART_RX, 1),
}


@dataclass
class Uart:
    """A UART with what it sent and every level its IRQ line took."""

    out: bytearray = field(default_factory=bytearray)
    levels: list[bool] = field(default_factory=list)
    device: Serial8250 = field(init=False)

    def __post_init__(self) -> None:
        self.device = Serial8250(self.out.extend, self.levels.append)

    def state(self) -> tuple[object, ...]:
        """Everything observable: registers, output, the IRQ line's history."""
        registers = {k: v for k, v in vars(self.device).items() if not callable(v)}
        registers["_rx"] = tuple(self.device._rx)
        return (sorted(registers.items()), bytes(self.out), tuple(self.levels))


def reached(steps: Sequence[str]) -> Uart:
    uart = Uart()
    for name in steps:
        STEPS[name](uart.device)
    return uart


def paths() -> list[tuple[str, ...]]:
    return [p for n in range(4) for p in itertools.product(STEPS, repeat=n)]


def test_the_steps_reach_states_that_post_and_that_do_not() -> None:
    postings = [reached(p).device.posting() for p in paths()]
    assert any(UART_TX in p.queued for p in postings)
    assert any(p.reads and UART_TX not in p.queued for p in postings)
    assert any(not p.reads and not p.queued for p in postings)


def test_a_posted_read_returns_what_a_read_does_and_changes_nothing() -> None:
    checked = 0
    for path in paths():
        posting = reached(path).device.posting()
        for offset, value in posting.reads.items():
            uart = reached(path)
            before = uart.state()
            assert uart.device.read(offset, 1) == value, (path, offset)
            assert uart.state() == before, (path, offset)
            checked += 1
    assert checked > 1000


def test_a_queued_write_changes_nothing_but_what_write_queued_does() -> None:
    checked = 0
    for path in paths():
        posting = reached(path).device.posting()
        for offset in posting.queued:
            for byte in (0x00, 0x41, 0xFF):
                direct, queued = reached(path), reached(path)
                levels = list(direct.levels)
                direct.device.write(offset, 1, byte)
                # No effect the guest could see before the write reaches the device: the IRQ
                # line stays where it was...
                assert direct.levels == levels, (path, offset, byte)
                queued.device.write_queued(offset, bytes((byte,)))
                assert direct.state() == queued.state(), (path, offset, byte)
                # ...and the device posts the same, so the vCPU may go on queueing.
                assert direct.device.posting() == posting, (path, offset, byte)
                checked += 1
    assert checked > 1000
