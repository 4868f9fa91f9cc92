"""A guest or an input cannot crash vmm-arch: device fuzzing, flooding, and a soak of boots
whose file descriptors, threads and memory must not grow."""

from __future__ import annotations

import io
import itertools
import os
import threading
from pathlib import Path

import pytest

from vmmarch_cli import machine
from vmmarch_cli.config import BootConfig
from vmmarch_cli.console import MAX_LINE, TAIL_LINES, Console
from vmmarch_cli.devices.bus import IoBus
from vmmarch_cli.devices.i8042 import I8042
from vmmarch_cli.devices.rtc import CmosRtc
from vmmarch_cli.devices.serial import Serial8250


def test_every_value_to_every_uart_register() -> None:
    out = bytearray()
    levels: list[bool] = []
    uart = Serial8250(out.extend, levels.append)
    for reg in range(8):
        for value in range(256):
            uart.write(reg, 1, value)
            for r in range(8):
                assert 0 <= uart.read(r, 1) <= 0xFF
    assert len(out) <= 256  # only THR writes with DLAB clear produce output
    # the IRQ line only ever toggles: never two equal levels in a row
    assert all(a != b for a, b in itertools.pairwise(levels))


def test_every_value_to_the_other_devices() -> None:
    resets: list[bool] = []
    kbd, rtc = I8042(lambda: resets.append(True)), CmosRtc()
    for value in range(256):
        for dev, offsets in ((kbd, (0, 4)), (rtc, (0, 1))):
            for off in offsets:
                dev.write(off, 1, value)
                assert 0 <= dev.read(off, 1) <= 0xFF
    assert resets == [True]  # only 0xfe to port 0x64 resets


def test_unhandled_ports_float_high_and_are_counted() -> None:
    bus = IoBus()
    assert bus.read(0x1234, 1) == 0xFF and bus.read(0x1234, 4) == 0xFFFF_FFFF
    bus.write(0x1234, 2, 7)
    assert bus.unhandled == {("in", 0x1234): 2, ("out", 0x1234): 1}


def test_console_memory_is_bounded_under_a_flood() -> None:
    sink = io.BytesIO()
    console = Console(sink, lambda kind, text: None)
    for _ in range(2000):
        console.write(b"x" * 10_000)  # one endless line
        console.write(b"short line\n")
    assert len(console.tail) == TAIL_LINES
    assert all(len(line) <= MAX_LINE for line in console.tail)
    assert console.bytes_seen == sink.tell() == 2000 * 10_011  # streamed in full


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.usefixtures("kvm")
def test_soak_library_api(guests: dict[str, Path]) -> None:
    config = BootConfig(kernel=guests["bootcheck"], backend="kvm", timeout=60)
    machine.run(config, io.BytesIO())  # warm-up: imports, ctypes classes
    fds, threads, rss = _fds(), threading.active_count(), _rss_kib()
    for _ in range(100):
        result = machine.run(config, io.BytesIO())
        assert result.status == 0
    assert _fds() == fds
    assert threading.active_count() == threads
    assert _rss_kib() - rss < 16 * 1024  # KiB: no per-boot leak of guest memory (256 MiB each)


@pytest.mark.usefixtures("kvm")
def test_soak_cli(guests: dict[str, Path]) -> None:
    import json
    import subprocess
    import sys

    from conftest import ROOT

    # A small parent runs the 100 boots, so that a child's peak RSS (which counts what it
    # shares with its parent between fork and exec) is the VMM's own, not pytest's.
    driver = (
        "import json, os, subprocess, sys\n"
        "peaks = []\n"
        "for _ in range(100):\n"
        "    p = subprocess.Popen([sys.executable, '-m', 'vmmarch_cli', 'boot', sys.argv[1],\n"
        "                          '--quiet', '--timeout', '60'], stdout=subprocess.DEVNULL)\n"
        "    _, status, usage = os.wait4(p.pid, 0)\n"
        "    assert os.waitstatus_to_exitcode(status) == 0\n"
        "    peaks.append(usage.ru_maxrss)\n"
        "print(json.dumps(peaks))\n"
    )
    out = subprocess.run([sys.executable, "-c", driver, str(guests["bootcheck"])], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=600).stdout
    peaks = json.loads(out)
    # A 256 MiB guest that touches a few pages costs the interpreter plus those pages (about
    # 25 MiB here), and the 100th boot no more than the first.
    assert len(peaks) == 100
    assert max(peaks) < 64 * 1024  # KiB
    assert peaks[-1] < peaks[0] + 4 * 1024
