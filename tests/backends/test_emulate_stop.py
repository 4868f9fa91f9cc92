"""Ending a running unicorn burst from another thread (backends/emulate/native.py).

Two defects of unicorn 2.1.4's own stop (uc_emu_stop), each measured here with a loop of our
own, and what the backend does instead:

* it is checked after every guest load and store, and a stop seen there restarts the
  instruction whose store was done: the instruction runs twice. With the mid-block checks off
  (``exit_checks_at_block_start_only``) every instruction runs once.
* while a stop is pending, unicorn skips every instruction hook after the first in its list for
  the rest of the running block: a SYSCALL in that block runs without its hook (the emulate
  backend's system call entry), as a no-op. ``native.Kick`` ends the burst without that flag.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import UNICORN_MISSING

if UNICORN_MISSING:
    pytest.skip("the emulate backend needs unicorn: pip install 'vmm-arch[emulate]'",
                allow_module_level=True)

from vmmarch_cli.backends.emulate import library, native
from vmmarch_cli.backends.emulate.binding import Uc, UcError, uc_const, x86

CODE, DATA = 0x1000, 0x8000


def _wheel_only() -> None:
    """For a statement about the unicorn wheel's own races (CI runs these tests again with
    VMMARCH_ENGINE=wheel): on the engine they may still exist, but its faster block starts make
    them too rare to show in a few seconds."""
    chosen = library.chosen()
    if chosen is None or chosen.kind is not library.Kind.WHEEL:
        pytest.skip("about the unicorn wheel; runs with VMMARCH_ENGINE=wheel")

ITERATIONS = 3_000_000
# xor rbx, rbx
# loop: lock inc qword [0x8000]; add qword [0x8008], 1; inc rbx; cmp rbx, ITERATIONS; jne loop
# hlt
LOOP = (bytes.fromhex("4831db" "f048ff042500800000" "4883042508800000" "01" "48ffc3" "4881fb")
        + struct.pack("<I", ITERATIONS) + bytes.fromhex("75e2" "f4"))


def _counts(block_start_only: bool) -> tuple[int, int, int, int]:
    """(iterations, lock inc count, add count, bursts) with unicorn's own timer stopping the
    loop every 200 us from its thread, each burst resumed where it stopped."""
    uc: Any = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
    uc.mem_map(CODE, 0x1000)
    uc.mem_map(DATA, 0x1000)
    uc.mem_write(CODE, LOOP)
    if block_start_only:
        native.exit_checks_at_block_start_only(uc)
    pc, bursts = CODE, 0
    while True:
        uc.emu_start(pc, 0, timeout=200)
        bursts += 1
        pc = int(uc.reg_read(x86.UC_X86_REG_RIP))
        if native.halted_flag(uc).value:
            break
    locked, added = struct.unpack("<QQ", uc.mem_read(DATA, 16))
    return int(uc.reg_read(x86.UC_X86_REG_RBX)), locked, added, bursts


def _interrupted_counts(block_start_only: bool) -> tuple[int, int, int, int]:
    """_counts from a run the timer did interrupt: on a loaded machine unicorn's timer thread
    may not get a CPU before the loop ends (one burst), so that run is repeated."""
    for _ in range(5):
        counts = _counts(block_start_only)
        if counts[3] >= 2:
            break
    return counts


def test_stops_from_another_thread_repeat_stores_in_stock_unicorn() -> None:
    """Why the switch exists: if this starts failing, unicorn changed and the note in
    docs/backends.md should be revisited. A statement about the unicorn wheel (CI runs these
    tests again with VMMARCH_ENGINE=wheel): the engine's faster block starts make the race too
    rare to show in a few seconds."""
    _wheel_only()
    iterations, locked, added, bursts = _interrupted_counts(block_start_only=False)
    assert bursts >= 2  # the timer did interrupt the loop (~100 times when idle)
    assert iterations == ITERATIONS
    assert locked > ITERATIONS or added > ITERATIONS


def test_with_mid_block_checks_off_every_instruction_runs_once() -> None:
    iterations, locked, added, bursts = _interrupted_counts(block_start_only=True)
    assert bursts >= 2
    assert (iterations, locked, added) == (ITERATIONS, ITERATIONS, ITERATIONS)


def test_the_switch_is_refused_on_an_unexpected_layout() -> None:
    """It writes one byte of unicorn's private state only after checking its neighbours; a
    second call finds the switch already on and refuses rather than guess. (The wheel only:
    the engine says where the switch is, patch 0009.)"""
    _wheel_only()
    uc: Any = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
    native.exit_checks_at_block_start_only(uc)
    with pytest.raises(Exception, match="not supported"):
        native.exit_checks_at_block_start_only(uc)


SYSCALLS = 20_000
# A block long enough for a stop to land in it before its SYSCALL (300 x add qword [0x8000],
# 1), then SYSCALL, counted in RBX:
# xor ebx, ebx; loop: <adds>; syscall; inc rbx; cmp rbx, SYSCALLS; jne loop; hlt
_BODY = (bytes.fromhex("488304250080000001") * 300 + bytes.fromhex("0f05" "48ffc3" "4881fb")
         + struct.pack("<I", SYSCALLS))
SYSCALL_LOOP = (bytes.fromhex("31db") + _BODY + bytes.fromhex("0f85")
                + struct.pack("<i", -(len(_BODY) + 6)) + bytes.fromhex("f4"))


def _syscall_hook_calls(stop: Callable[[Any], Callable[[], None]]) -> tuple[int, int, int]:
    """(SYSCALLs run, SYSCALL hook calls, bursts) with ``stop(uc)`` called every 200 us from
    another thread. A CPUID hook comes first in the hook list, as in the backend (IN, OUT and
    CPUID before SYSCALL)."""
    uc: Any = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
    uc.mem_map(CODE, 0x2000)
    uc.mem_map(DATA, 0x1000)
    uc.mem_write(CODE, SYSCALL_LOOP)
    calls = 0

    def on_syscall(uc: Any, _: object) -> None:
        nonlocal calls
        calls += 1

    uc.hook_add(uc_const.UC_HOOK_INSN, lambda uc, _: 0, None, 1, 0, x86.UC_X86_INS_CPUID)
    uc.hook_add(uc_const.UC_HOOK_INSN, on_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
    native.exit_checks_at_block_start_only(uc)
    stopper = stop(uc)
    done = threading.Event()

    def storm() -> None:
        while not done.wait(0.0002):
            stopper()

    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    pc, bursts = CODE, 0
    try:
        while True:
            try:
                uc.emu_start(pc, 0)
            except UcError as e:
                if getattr(e, "errno", None) != native.KICK_ERROR:
                    raise
            bursts += 1
            pc = int(uc.reg_read(x86.UC_X86_REG_RIP))
            if native.halted_flag(uc).value:
                break
    finally:
        done.set()
        thread.join()
    return int(uc.reg_read(x86.UC_X86_REG_RBX)), calls, bursts


def test_a_stop_from_another_thread_skips_syscall_hooks_in_stock_unicorn() -> None:
    """Why Kick exists: a stock kernel's system calls vanished with it (read(2) returned 0,
    its own number). If this starts failing, unicorn changed; revisit native.Kick."""
    _wheel_only()
    run, calls, bursts = _syscall_hook_calls(lambda uc: uc.emu_stop)
    assert bursts >= 10
    assert run == SYSCALLS
    assert calls < SYSCALLS


def test_a_kick_ends_bursts_and_every_syscall_reaches_its_hook() -> None:
    started = time.monotonic()
    run, calls, bursts = _syscall_hook_calls(native.Kick)
    assert bursts >= 10, f"{bursts} bursts in {time.monotonic() - started:.2f} s"
    assert (run, calls) == (SYSCALLS, SYSCALLS)


def test_a_kick_between_bursts_is_forgotten() -> None:
    """emu_start starts clean: a kick that came while nothing ran does not end the next burst
    (the backend repeats a kick until the burst it meant is over)."""
    uc: Any = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
    uc.mem_map(CODE, 0x1000)
    uc.mem_write(CODE, bytes.fromhex("48ffc3" "f4"))  # inc rbx; hlt
    native.Kick(uc)()
    uc.emu_start(CODE, 0)
    assert int(uc.reg_read(x86.UC_X86_REG_RBX)) == 1
    assert native.halted_flag(uc).value == 1
