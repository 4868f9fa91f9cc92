"""An 8250/16550A UART, enough for Linux's 8250 driver with interrupts.

Registers and bits: the TI PC16550D datasheet (SNLS378), tables 2-4, and Linux's
include/uapi/linux/serial_reg.h names. Transmission is instant: the transmitter is always
empty, so writing THR re-raises the THRE interrupt at once, and enabling THRE in IER raises it
(as the datasheet's "THRE interrupt ... when enabled while THR is empty").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vmmarch_cli.devices.bus import Posting

# Register offsets (DLAB=0 unless noted).
UART_RX = 0  # in: receive buffer
UART_TX = 0  # out: transmit holding
UART_DLL = 0  # DLAB=1
UART_IER = 1
UART_DLM = 1  # DLAB=1
UART_IIR = 2  # in
UART_FCR = 2  # out
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_IER_RDI = 0x01  # received data available
UART_IER_THRI = 0x02  # transmitter holding register empty
UART_IIR_NO_INT = 0x01
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_FIFO_ENABLED = 0xC0
UART_FCR_ENABLE_FIFO = 0x01
UART_LCR_DLAB = 0x80
UART_MCR_LOOP = 0x10
UART_MCR_OUT2 = 0x08
UART_LSR_DR = 0x01
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_MSR_DCD = 0x80
UART_MSR_DSR = 0x20
UART_MSR_CTS = 0x10



@dataclass(frozen=True)
class SerialState:
    """Everything a UART holds (a snapshot's record of it)."""

    ier: int
    lcr: int
    mcr: int
    scr: int
    fcr: int
    dll: int
    dlm: int
    thre_pending: bool
    rx: tuple[int, ...]
    level: bool


class Serial8250:
    def __init__(self, output: Callable[[bytes], None], irq: Callable[[bool], None]) -> None:
        self._output = output
        self._irq = irq
        self._ier = 0
        self._lcr = 0x03  # 8N1
        self._mcr = UART_MCR_OUT2
        self._scr = 0
        self._fcr = 0
        self._dll = 0x0C  # 9600 baud
        self._dlm = 0
        self._thre_pending = False
        self._rx: deque[int] = deque()
        self._level = False

    def save(self) -> SerialState:
        return SerialState(self._ier, self._lcr, self._mcr, self._scr, self._fcr, self._dll,
                           self._dlm, self._thre_pending, tuple(self._rx), self._level)

    def restore(self, state: SerialState) -> None:
        """Take ``state`` before the guest runs; a line it held high is driven high again."""
        self._ier, self._lcr, self._mcr, self._scr = state.ier, state.lcr, state.mcr, state.scr
        self._fcr, self._dll, self._dlm = state.fcr, state.dll, state.dlm
        self._thre_pending = state.thre_pending
        self._rx = deque(state.rx)
        self._level = state.level
        if state.level:
            self._irq(True)

    def feed(self, data: bytes) -> None:
        """Bytes typed at the console (host -> guest)."""
        self._rx.extend(data)
        self._update_irq()

    def _iir(self) -> int:
        fifo = UART_IIR_FIFO_ENABLED if self._fcr & UART_FCR_ENABLE_FIFO else 0
        if self._ier & UART_IER_RDI and self._rx:
            return UART_IIR_RDI | fifo
        if self._ier & UART_IER_THRI and self._thre_pending:
            return UART_IIR_THRI | fifo
        return UART_IIR_NO_INT | fifo

    def _update_irq(self) -> None:
        level = not self._iir() & UART_IIR_NO_INT
        if level != self._level:
            self._level = level
            self._irq(level)

    def read(self, offset: int, size: int) -> int:
        value = self._read(offset)
        self._update_irq()
        return value

    def posting(self) -> Posting:
        """While the divisor latch is closed, loopback is off and nothing was received, LSR,
        MSR and IER read the same, without a side effect (the transmitter is always empty: see
        the module docstring; IER changes only by a write, which exits), and while the THRE
        interrupt is off, or on with THRE already pending, a write to THR only sends the byte
        (it sets THRE pending, which matters only once IER enables it, and enabling it sets it
        anyway). A kernel's console writes poll LSR and write THR: 2 exits a byte otherwise;
        Linux's 8250 console reads IER before each message, and its interrupt handler writes
        a FIFO's worth of bytes to THR."""
        if self._lcr & UART_LCR_DLAB or self._mcr & UART_MCR_LOOP or self._rx:
            return Posting()
        reads = {UART_LSR: self._read(UART_LSR), UART_MSR: self._read(UART_MSR),
                 UART_IER: self._ier}
        # With the THRE interrupt on, a write changes nothing either while THRE is already
        # pending (the line stays up): the driver's interrupt handler writes a FIFO's worth.
        sends_only = not self._ier & UART_IER_THRI or self._thre_pending
        queued = frozenset({UART_TX}) if sends_only else frozenset()
        return Posting(reads, queued)

    def write_queued(self, offset: int, data: bytes) -> None:
        if offset != UART_TX or not data:
            return
        self._output(data)
        self._thre_pending = True
        self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self._lcr & UART_LCR_DLAB
        if offset == UART_RX:
            if dlab:
                return self._dll
            return self._rx.popleft() if self._rx else 0
        if offset == UART_IER:
            return self._dlm if dlab else self._ier
        if offset == UART_IIR:
            iir = self._iir()
            if iir & 0x0F == UART_IIR_THRI:
                self._thre_pending = False  # reading IIR acknowledges THRE (datasheet table 4)
            return iir
        if offset == UART_LCR:
            return self._lcr
        if offset == UART_MCR:
            return self._mcr
        if offset == UART_LSR:
            return UART_LSR_THRE | UART_LSR_TEMT | (UART_LSR_DR if self._rx else 0)
        if offset == UART_MSR:
            if self._mcr & UART_MCR_LOOP:
                # Loopback: the modem outputs feed the inputs (the driver's UART detection).
                m = self._mcr
                return ((m & 0x2) << 3) | ((m & 0x1) << 5) | ((m & 0x4) << 4) | ((m & 0x8) << 4)
            return UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        return self._scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self._lcr & UART_LCR_DLAB
        if offset == UART_TX and not dlab:
            if self._mcr & UART_MCR_LOOP:
                self._rx.append(value)
            else:
                self._output(bytes((value,)))
            self._thre_pending = True
        elif offset == UART_TX:
            self._dll = value
        elif offset == UART_IER and dlab:
            self._dlm = value
        elif offset == UART_IER:
            if value & UART_IER_THRI and not self._ier & UART_IER_THRI:
                self._thre_pending = True
            self._ier = value & 0x0F
        elif offset == UART_FCR:
            self._fcr = value
        elif offset == UART_LCR:
            self._lcr = value
        elif offset == UART_MCR:
            self._mcr = value & 0x1F
        elif offset == UART_SCR:
            self._scr = value
        self._update_irq()
