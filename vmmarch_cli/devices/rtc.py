"""A CMOS real-time clock (Motorola MC146818A) at ports 0x70/0x71, reading the host's UTC time.

Without one, Linux's rtc-cmos and the early clock read wait on the update-in-progress bit and
time out. Registers: the MC146818A datasheet, "Address map"; Linux include/linux/mc146818rtc.h.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

RTC_SECONDS = 0x00
RTC_MINUTES = 0x02
RTC_HOURS = 0x04
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32  # the ACPI FADT's usual century register
RTC_REG_B_24H = 0x02  # 24-hour mode; DM=0 means BCD
RTC_REG_D_VRT = 0x80  # valid RAM and time
RTC_REG_A_DV_32K = 0x20  # divider: 32.768 kHz time base
CMOS_SIZE = 128


def _bcd(n: int) -> int:
    return ((n // 10) << 4) | (n % 10)


@dataclass(frozen=True)
class RtcState:
    """The index register and the CMOS RAM; the clock registers read the host's time."""

    index: int
    ram: tuple[int, ...]


class CmosRtc:
    def __init__(self) -> None:
        self._index = 0
        self._ram = bytearray(CMOS_SIZE)
        self._ram[RTC_REG_A] = RTC_REG_A_DV_32K
        self._ram[RTC_REG_B] = RTC_REG_B_24H
        self._ram[RTC_REG_D] = RTC_REG_D_VRT

    def save(self) -> RtcState:
        return RtcState(self._index, tuple(self._ram))

    def restore(self, state: RtcState) -> None:
        if len(state.ram) != CMOS_SIZE:
            raise ValueError(f"CMOS RAM is {CMOS_SIZE} bytes, not {len(state.ram)}")
        self._index, self._ram = state.index, bytearray(state.ram)

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF
        index = self._index
        t = time.gmtime()
        clock = {
            RTC_SECONDS: t.tm_sec, RTC_MINUTES: t.tm_min, RTC_HOURS: t.tm_hour,
            RTC_DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1, RTC_DAY_OF_MONTH: t.tm_mday,
            RTC_MONTH: t.tm_mon, RTC_YEAR: t.tm_year % 100, RTC_CENTURY: t.tm_year // 100,
        }
        if index in clock:
            return _bcd(clock[index])
        return self._ram[index]

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._index = value & 0x7F  # bit 7 is the NMI mask, not part of the index
        elif self._index not in (RTC_REG_C, RTC_REG_D):
            self._ram[self._index] = value & 0xFF
