"""The parts of unicorn's CPU that its API does not reach, and QEMU's own interrupt delivery.

unicorn hands every exception to a hook instead of the guest's IDT, and its API cannot change
the CPL (in 64-bit mode a CS write sets the selector only). QEMU's delivery code is still in the
library and exported: ``x86_cpu_do_interrupt_x86_64`` delivers the exception in flight exactly
as QEMU's TCG does (gate, IST or TSS.RSP0 stack switch, error code, CS/SS, IF, CPL; SDM vol. 3A
6.14). Called from inside unicorn's interrupt hook, it turns unicorn back into a CPU that
delivers exceptions. Measured on unicorn 2.1.4 by a research script before use:
``/tmp``-free facts, repeated by tests/backends/test_emulate_delivery.py:

* the hook sees RIP at the faulting instruction for faults, after it for INT n / INT3;
* the error code is in CPUX86State (``error_code``), never in the API; CR2 is set for #PF;
* unicorn never clears ``old_exception``, so a second fault would be promoted to #DF; QEMU's
  delivery resets it;
* QEMU's delivery must not itself fault: it would longjmp across the Python frames. The caller
  checks first (gate present, DPL for INT n, stacks and tables mapped).

Field offsets are found at run time from values planted through the API, in the order of
QEMU's target/i386/cpu.h (``error_code, exception_is_int, exception_next_eip, dr[8],
cpu_breakpoint[4], old_exception``) and checked once per process against a live exception.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vmmarch_cli.arch.x86_64 import gdt
from vmmarch_cli.backends.emulate.binding import uc_const, x86
from vmmarch_cli.backends.emulate.library import uc_handle
from vmmarch_cli.errors import BackendError
from vmmarch_cli.vcpu import ATTR_MASK, DescriptorTable, Segment, Sregs

_DRS = [getattr(x86, f"UC_X86_REG_DR{i}") for i in range(8)]
#: How far past CPUState to look for the planted values (CPUX86State sits inside X86CPU) in
#: the wheel's build. The engine's CPU state is larger (patch 0015's jump cache puts env past
#: 192 KiB) and it tells its layout instead (patch 0009).
_SCAN = 0x20000
#: Offsets from dr[0] (cpu.h: int error_code; int exception_is_int; target_ulong
#: exception_next_eip; target_ulong dr[8]; void *cpu_breakpoint[4]; int old_exception).
_ERROR_CODE = -16
_IS_INT = -12
_NEXT_EIP = -8
_OLD_EXCEPTION = 8 * 8 + 4 * 8
#: CPUState (include/hw/core/cpu.h): uint32_t halted; uint32_t can_do_io; int32_t exception_index.
_HALTED_BEFORE_INDEX = 8
#: How far into uc_struct to look for a planted value (use_exits sits at 0x594 and
#: context_content at 0x7dc in unicorn 2.1.4's build; the struct itself is ~14 KiB).
_UC_STRUCT_SCAN = 0x1000


def _library() -> Any:
    from unicorn.unicorn_py3.unicorn import uclib  # the loaded libunicorn (ctypes.CDLL)

    lib: Any = uclib
    lib.qemu_get_cpu_x86_64.restype = ctypes.c_void_p
    lib.qemu_get_cpu_x86_64.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.x86_cpu_do_interrupt_x86_64.restype = None
    lib.x86_cpu_do_interrupt_x86_64.argtypes = [ctypes.c_void_p]
    lib.do_interrupt_x86_hardirq_x86_64.restype = None
    lib.do_interrupt_x86_hardirq_x86_64.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.x86_update_hflags_x86_64.restype = None
    lib.x86_update_hflags_x86_64.argtypes = [ctypes.c_void_p]
    lib.cpu_exit.restype = None
    lib.cpu_exit.argtypes = [ctypes.c_void_p]
    return lib


class SegmentCache(ctypes.Structure):
    """QEMU's SegmentCache (target/i386/cpu.h): selector, base, limit, flags, where flags is
    the descriptor's high dword layout (DESC_* below)."""

    _fields_ = [("selector", ctypes.c_uint32), ("base", ctypes.c_uint64),
                ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


#: env->segs[] order (cpu.h R_ES .. R_GS) and the descriptor bits SYSCALL loads (SDM vol. 2B,
#: SYSCALL: flat 64-bit code and flat data, DPL 0), in QEMU's DESC_* positions.
R_CS, R_SS, R_FS = 1, 2, 4
#: env->regs[] order (cpu.h R_EAX, R_ECX, R_EDX, R_EBX, ...).
R_EAX, R_ECX, R_EDX, R_EBX = 0, 1, 2, 3
#: env->hflags sits right before env->segs (cpu.h: ... cc_op, df, hflags, hflags2, segs[6]);
#: HF_INHIBIT_IRQ is set for the one instruction after STI or MOV SS (SDM 6.8.3), when the
#: CPU takes no external interrupt.
HFLAGS_BEFORE_SEGS = 8
HF_INHIBIT_IRQ = 1 << 3
HF_CS64 = 1 << 15  # cpu.h HF_CS64_SHIFT
#: SegmentCache.flags is the descriptor's high dword: our attribute word (type, S, DPL, P at
#: bits 0-7; AVL, L, D/B, G at 12-15) sits at bits 8-23.
DESC_FLAGS_SHIFT = 8
DESC_FLAGS_MASK = ATTR_MASK << DESC_FLAGS_SHIFT
#: The flat 64-bit kernel segments in that form.
KERNEL_CODE64 = gdt.CODE64_FLAGS << DESC_FLAGS_SHIFT
KERNEL_DATA = gdt.DATA_FLAGS << DESC_FLAGS_SHIFT


@dataclass(frozen=True)
class Layout:
    """Offsets of the fields used here (one library build: one layout): from CPUState, and
    from uc_struct for the last two."""

    dr: int
    exception_index: int
    env: int  # CPUX86State, whose first field is RAX (regs[R_EAX])
    segs: int  # env->segs[6], from CPUState
    eip: int  # env->eip, from CPUState
    halted: int  # CPUState.halted
    hflags: int  # env->hflags
    invalid_error: int  # uc_struct.invalid_error (Kick)
    no_exit_request: int | None  # uc_struct.no_exit_request; None: found per instance
    tsc_offset: int | None = None  # env->tsc_offset; None: not told (the wheel)


class EngineLayout(ctypes.Structure):
    """What the engine's vmmarch_layout() fills in (patch 0009): the compiler's offsetof of
    each field, so no scratch instance has to find them."""

    _fields_ = [(name, ctypes.c_uint32) for name in (
        "size", "dr", "exception_index", "halted", "env", "segs", "eip", "hflags",
        "invalid_error", "no_exit_request", "tsc_offset")]


def _cpu_state(uc: Any) -> int:
    cpu = _library().qemu_get_cpu_x86_64(uc._uch, -1)  # unicorn leaves cpu_index at -1
    if not cpu:
        raise BackendError("unicorn exposes no x86_64 CPU state (not a 64-bit x86 instance)")
    return int(cpu)


@contextlib.contextmanager
def _planting(uc: Any, registers: list[int], marks: list[int]) -> Iterator[bytes]:
    """``marks`` written through the API into ``registers`` for the body, as the bytes they
    make in memory; the registers are restored afterwards."""
    saved = [uc.reg_read(r) for r in registers]
    for r, v in zip(registers, marks, strict=True):
        uc.reg_write(r, v)
    try:
        yield struct.pack(f"<{len(marks)}Q", *marks)
    finally:
        for r, v in zip(registers, saved, strict=True):
            uc.reg_write(r, v)


def _planted(uc: Any, cpu: int, registers: list[int], marks: list[int], span: int,
             what: str) -> int:
    """Where ``marks``, written through the API into ``registers``, sit in unicorn's CPU state
    (searched from CPUState over ``span`` bytes)."""
    with _planting(uc, registers, marks) as planted:
        offset = ctypes.string_at(cpu, span).find(planted)
    if offset < 0:
        raise BackendError(f"unicorn's {what} were not found in its CPU state: this unicorn "
                           "version is not supported for exception delivery")
    return offset


def _holds(uc: Any, cpu: int, registers: list[int], marks: list[int], offset: int) -> bool:
    """Whether ``marks``, written into ``registers``, are at ``offset`` of the CPU state."""
    with _planting(uc, registers, marks) as planted:
        return ctypes.string_at(cpu + offset, len(planted)) == planted


_DR_MARKS = [0x5AFE_0000_D0D0_0000 + i for i in range(8)]


def _find_dr(uc: Any, cpu: int, span: int) -> int:
    return _planted(uc, cpu, _DRS, _DR_MARKS, span, "debug registers")


#: SegmentCaches from env->segs[0]: segs[6], ldt, tr, gdt, idt (cpu.h); then target_ulong cr[5].
_GDT_CACHE, _IDT_CACHE, _CACHES = 8, 9, 10


def _tables_and_control(segs: int) -> tuple[DescriptorTable, DescriptorTable, tuple[int, ...]]:
    caches = (SegmentCache * _CACHES).from_address(segs)
    crs = (ctypes.c_uint64 * 5).from_address(segs + _CACHES * ctypes.sizeof(SegmentCache))
    gdt, idt = caches[_GDT_CACHE], caches[_IDT_CACHE]
    return (DescriptorTable(gdt.base, gdt.limit), DescriptorTable(idt.base, idt.limit),
            tuple(crs))


@functools.cache
def layout() -> Layout:
    """The offsets: from the engine when it says them (patch 0009), else found in scratch
    instances (``_scanned_layout``)."""
    lib = _library()
    if not hasattr(lib, "vmmarch_layout"):
        return _scanned_layout()
    told = EngineLayout()
    lib.vmmarch_layout(ctypes.byref(told))
    if told.size != ctypes.sizeof(EngineLayout):
        raise BackendError("the engine's layout record has another size: rebuild it "
                           "(vmm-arch engine build --force)")
    return Layout(dr=told.dr, exception_index=told.exception_index, env=told.env,
                  segs=told.segs, eip=told.eip, halted=told.halted, hflags=told.hflags,
                  invalid_error=told.invalid_error, no_exit_request=told.no_exit_request,
                  tsc_offset=told.tsc_offset)


def _scanned_layout(span: int = _SCAN) -> Layout:
    """Find the offsets once, in a scratch instance, and check them against a live INT n and
    a live HLT. ``span``: how many bytes of the CPU state to search (read: they must exist)."""
    from vmmarch_cli.backends.emulate.binding import Uc

    uc = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
    code = 0x1000
    uc.mem_map(code, 0x1000)
    uc.mem_write(code, bytes.fromhex("cd77" "cd78" "f4" "90"))  # int 0x77; int 0x78; hlt; nop
    cpu = _cpu_state(uc)
    dr = _find_dr(uc, cpu, span)
    seen: list[tuple[int, set[int], int, int]] = []

    def hook(uc: Any, vector: int, _: object) -> None:
        blob = ctypes.string_at(cpu, dr)
        offsets = {o for o in range(0, dr - 4, 4)
                   if struct.unpack_from("<i", blob, o)[0] == vector}
        is_int = ctypes.c_int32.from_address(cpu + dr + _IS_INT).value
        next_eip = ctypes.c_uint64.from_address(cpu + dr + _NEXT_EIP).value
        seen.append((vector, offsets, is_int, next_eip))
        ctypes.c_int32.from_address(cpu + dr + _OLD_EXCEPTION).value = -1

    uc.hook_add(uc_const.UC_HOOK_INTR, hook)
    uc.emu_start(code, 0)  # stops at the HLT
    if [(v, i, n) for v, _, i, n in seen] != [(0x77, 1, code + 2), (0x78, 1, code + 4)]:
        raise BackendError("unicorn's exception state is not laid out as this backend expects: "
                           "this unicorn version is not supported for exception delivery")
    common = seen[0][1] & seen[1][1]
    if len(common) != 1:
        raise BackendError("unicorn's exception index was not found unambiguously: this "
                           "unicorn version is not supported for exception delivery")
    exception_index = common.pop()
    segs = _find_segs(uc, cpu, dr)
    found = Layout(dr=dr, exception_index=exception_index, env=_find_env(uc, cpu, dr),
                   segs=segs,
                   eip=_planted(uc, cpu, [x86.UC_X86_REG_RIP], [0x0000_7FED_CBA9_8760], dr,
                                "instruction pointer"),
                   halted=exception_index - _HALTED_BEFORE_INDEX,
                   hflags=segs - HFLAGS_BEFORE_SEGS, invalid_error=_invalid_error_offset(),
                   no_exit_request=None)
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0x12_3450_00, 0x7F, 0))
    uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0x23_4560_00, 0xFFF, 0))
    uc.reg_write(x86.UC_X86_REG_CR2, 0xDEAD_B000)
    uc.reg_write(x86.UC_X86_REG_CR3, 0x777_7000)
    gdt, idt, crs = _tables_and_control(cpu + found.segs)
    if ((gdt.base, gdt.limit, idt.base, idt.limit, crs[2], crs[3])
            != (0x12_3450_00, 0x7F, 0x23_4560_00, 0xFFF, 0xDEAD_B000, 0x777_7000)):
        raise BackendError("unicorn's descriptor tables and control registers are not laid "
                           "out as this backend expects: this unicorn version is not supported")
    halted = ctypes.c_uint32.from_address(cpu + found.halted)
    after_hlt = halted.value
    uc.emu_start(code + 5, 0, 0, 1)  # the NOP: a burst that ends by its count
    if (after_hlt, halted.value) != (1, 0):
        raise BackendError("unicorn's halted flag was not found where this backend expects it: "
                           "this unicorn version is not supported")
    return found


_CONTEXT_MARKS = (0x5A17_C0DE, 0x6B28_D1EF)


def _uc_struct_field(uc: Any, control: int, restore: int, what: str) -> int:
    """The offset in unicorn's engine state (uc_struct, include/uc_priv.h) of the int that
    the uc_ctl write ``control`` sets: two values planted through it, found once each; the
    field is set to ``restore`` afterwards."""
    handle = uc_handle(uc)
    found: list[set[int]] = []
    for mark in _CONTEXT_MARKS:
        uc.ctl(control, uc_const.UC_CTL_IO_WRITE, ctypes.c_int(mark))
        blob = ctypes.string_at(handle, _UC_STRUCT_SCAN)
        packed = struct.pack("<I", mark)
        found.append({o for o in range(0, len(blob) - 3, 4) if blob[o:o + 4] == packed})
    uc.ctl(control, uc_const.UC_CTL_IO_WRITE, ctypes.c_int(restore))
    common = found[0] & found[1]
    if len(common) != 1:
        raise BackendError(f"unicorn's {what} was not found in its engine state: this unicorn "
                           "version is not supported")
    return common.pop()


def exit_checks_at_block_start_only(uc: Any) -> None:
    """Make unicorn look for a stop request only where QEMU does, at the start of a translation
    block, before any code is translated.

    unicorn 2.1.4 also checks after every guest load and store (tcg-op.c, check_exit_request),
    and a stop seen there restarts the instruction from its beginning: after a store, the
    instruction runs twice (a ``lock inc`` counts twice, a spinlock is taken twice and never
    freed). An emu_stop from another thread lands there at random;
    tests/backends/test_emulate_stop.py counts the repeats. unicorn's own switch for this
    (``no_exit_request``, meant for ARM IT blocks) has no API: it is found beside
    ``context_content``, which UC_CTL_CONTEXT_MODE sets
    to any value, and checked against its neighbours before it is written. What is given up:
    a stop from a code or memory hook waits for the next block (this backend's hooks that
    stop then end the run, or are not installed in this mode).
    """
    handle = uc_handle(uc)
    told = layout().no_exit_request
    if told is not None:  # the engine says where it is
        ctypes.c_bool.from_address(handle + told).value = True
        return
    context = _uc_struct_field(uc, uc_const.UC_CTL_CONTEXT_MODE, uc_const.UC_CTL_CONTEXT_CPU,
                               "context mode")
    # uc_struct (include/uc_priv.h): int context_content; int cpu_context_size; uint64_t
    # next_pc (8-aligned); bool hook_insert, first_tb, no_exit_request, init_done.
    next_pc = (context + 8 + 7) & ~7
    at = handle + next_pc + 8 + 2
    flags = ctypes.string_at(at - 2, 4)  # hook_insert, first_tb, no_exit_request, init_done
    if flags[0] != 0 or flags[2] != 0 or flags[3] != 1:
        raise BackendError("unicorn's engine state is not laid out as this backend expects: "
                           "this unicorn version is not supported")
    ctypes.c_bool.from_address(at).value = True


#: What emu_start reports after a kick (``Kick``): uc_hook_add's "hook exists", which
#: emulation itself never produces.
KICK_ERROR = uc_const.UC_ERR_HOOK_EXIST


class Kick:
    """End a running emu_start at the next translation block start, from any thread, without
    uc_emu_stop.

    uc_emu_stop sets unicorn's ``stop_request`` at once, and while it is set unicorn skips every
    instruction hook after the first in its list (each hook loop ends with "if stop_request:
    break"), for the rest of the running block: a SYSCALL, IN, OUT or CPUID in that block then
    runs as unicorn's own no-op or default. A stop from another thread in user mode made system
    calls vanish (a read(2) returned 0, its number), about once a boot. A kick instead marks
    the run as ended with an error unicorn never reports itself (``invalid_error``, in
    uc_struct: unicorn ends emu_start when it is set once the CPU loop returns) and asks the CPU
    loop to return (QEMU's ``cpu_exit``: the next block start sees it). No hook is skipped, and
    the guest stops between two blocks, as with the stop. emu_start then fails with
    ``KICK_ERROR``, which the caller takes as "kicked". A fault of the guest's own that
    unicorn reports in the same instant may be taken for the kick: the instruction then
    faults again in the next burst, where it is reported.
    """

    def __init__(self, uc: Any) -> None:
        self._lib = _library()
        self._cpu = ctypes.c_void_p(_cpu_state(uc))
        handle = uc_handle(uc)
        self._error = ctypes.c_int32.from_address(handle + layout().invalid_error)

    def __call__(self) -> None:
        if self._error.value == uc_const.UC_ERR_OK:  # an error of the guest's own comes first
            self._error.value = KICK_ERROR
        self._lib.cpu_exit(self._cpu)


@functools.cache
def _invalid_error_offset() -> int:
    """uc_struct.invalid_error, found through its neighbour (uc_priv.h: uint64_t invalid_addr;
    int invalid_error; int use_exits, which UC_CTL_UC_USE_EXITS sets) and checked in a scratch
    instance: a kick from inside a hook must end emu_start with KICK_ERROR before the next
    instruction."""
    from vmmarch_cli.backends.emulate.binding import Uc, UcError

    uc = Uc(uc_const.UC_ARCH_X86, uc_const.UC_MODE_64)
    code, probe = 0x1000, 0x2000
    uc.mem_map(code, 0x2000)  # the engine exists from here (unicorn starts it lazily)
    if ctypes.string_at(_cpu_state(uc) + _STOPPED, 1) != b"\1":  # stopped until the first run
        raise BackendError("unicorn's CPU flags are not laid out as this backend expects: "
                           "this unicorn version is not supported")
    use_exits = _uc_struct_field(uc, uc_const.UC_CTL_UC_USE_EXITS, 0, "exits switch")
    offset = use_exits - 4
    handle = uc_handle(uc)
    # Read-only first: an unmapped read leaves its address in invalid_addr, 8 bytes before.
    unmapped = 0x5A17_0000
    uc.mem_write(probe, bytes.fromhex("488b04250000175a"))  # mov rax, [0x5a170000]
    with contextlib.suppress(UcError):  # UC_ERR_READ_UNMAPPED, as intended
        uc.emu_start(probe, 0)
    if offset % 8 or ctypes.c_uint64.from_address(handle + offset - 8).value != unmapped:
        raise BackendError("unicorn's engine state is not laid out as this backend expects: "
                           "this unicorn version is not supported")
    error = ctypes.c_int32.from_address(handle + offset)
    lib, cpu = _library(), ctypes.c_void_p(_cpu_state(uc))
    flags = ctypes.string_at(_cpu_state(uc) + _STOPPED, _EXIT_REQUEST - _STOPPED + 1)
    lib.cpu_exit(cpu)
    exit_request = ctypes.string_at(_cpu_state(uc) + _EXIT_REQUEST, 1)
    if flags != b"\0\0\0\0" or exit_request != b"\1":  # after a run: stopped clear
        raise BackendError("unicorn's CPU flags are not laid out as this backend expects: "
                           "this unicorn version is not supported")
    uc.mem_write(code, bytes.fromhex("cd77" "cd78" "f4"))  # int 0x77; int 0x78; hlt
    seen: list[int] = []

    def hook(uc: Any, vector: int, _: object) -> None:
        seen.append(vector)
        if error.value == uc_const.UC_ERR_OK:
            error.value = KICK_ERROR
            lib.cpu_exit(cpu)

    uc.hook_add(uc_const.UC_HOOK_INTR, hook)
    outcome = None
    try:
        uc.emu_start(code, 0)
    except UcError as e:
        outcome = getattr(e, "errno", None)
    if (outcome, seen, uc.reg_read(x86.UC_X86_REG_RIP)) != (KICK_ERROR, [0x77], code + 2):
        raise BackendError("unicorn's run loop did not end as this backend expects after a "
                           "kick: this unicorn version is not supported")
    return offset


#: CPUState (include/hw/core/cpu.h): int nr_cores, nr_threads; QemuThread *thread; bool
#: created, stop, stopped, unplug, crash_occurred, exit_request. Checked in the scratch instance
#: of _invalid_error_offset (stopped before the first run, clear after it; cpu_exit sets
#: exit_request).
_STOPPED, _EXIT_REQUEST = 18, 21


def reset_request(uc: Any) -> ctypes.c_bool:
    """CPUState.stopped of ``uc``: QEMU sets it when the guest triple-faults (excp_helper.c,
    check_exception -> qemu_system_reset_request -> cpu_stop). unicorn has no exit for that:
    emu_start either returns as after a HLT or, when the CPU loop ended for another reason,
    spins in resume_all_vcpus while the CPU stays stopped. Clearing it lets that loop run to
    the next block start, where a kick ends emu_start."""
    return ctypes.c_bool.from_address(_cpu_state(uc) + _STOPPED)


def tsc_offset(uc: Any) -> ctypes.c_int64 | None:
    """env->tsc_offset of ``uc``: the guest's RDTSC is the host's TSC plus it (misc_helper.c,
    helper_rdtsc). None where the library does not say where it is (the wheel)."""
    offset = layout().tsc_offset
    return None if offset is None else ctypes.c_int64.from_address(_cpu_state(uc) + offset)


def halted_flag(uc: Any) -> ctypes.c_uint32:
    """CPUState.halted of ``uc`` (any x86 mode): 1 after emu_start returned because the guest
    ran HLT, 0 after a burst that ended by its instruction count; emu_start clears it."""
    return ctypes.c_uint32.from_address(_cpu_state(uc) + layout().halted)


def _find_segs(uc: Any, cpu: int, dr: int) -> int:
    """segs[R_FS].base holds FS_BASE: plant a value there and step back to segs[0]."""
    if ctypes.sizeof(SegmentCache) != 24:  # QEMU's SegmentCache on a 64-bit host
        raise BackendError("unicorn's segment registers are not laid out as this backend "
                           "expects: this unicorn version is not supported")
    offset = _planted(uc, cpu, [x86.UC_X86_REG_FS_BASE], [0x7EAD_BEEF_0FED_CBA8], dr,
                      "segment registers")
    return offset - SegmentCache.base.offset - R_FS * ctypes.sizeof(SegmentCache)


def _find_env(uc: Any, cpu: int, dr: int) -> int:
    """CPUX86State starts with RAX (regs[R_EAX])."""
    return _planted(uc, cpu, [x86.UC_X86_REG_RAX], [0x1234_5678_8765_4321], dr,
                    "general registers")


class NativeCpu:
    """One unicorn instance's CPU state, for the interrupt hook of its vCPU."""

    def __init__(self, uc: Any) -> None:
        self._lib = _library()
        self._layout = layout()
        self.cpu = _cpu_state(uc)
        # Checked where the layout says, not searched for: the engine's CPU state may be larger
        # than the search covers.
        if not _holds(uc, self.cpu, _DRS, _DR_MARKS, self._layout.dr):
            raise BackendError("unicorn's CPU state differs between instances: not supported")
        base = self.cpu + self._layout.dr
        self._error_code = ctypes.c_int32.from_address(base + _ERROR_CODE)
        self._is_int = ctypes.c_int32.from_address(base + _IS_INT)
        self._next_eip = ctypes.c_uint64.from_address(base + _NEXT_EIP)
        self._old_exception = ctypes.c_int32.from_address(base + _OLD_EXCEPTION)
        self._exception_index = ctypes.c_int32.from_address(
            self.cpu + self._layout.exception_index)
        self._eip = ctypes.c_uint64.from_address(self.cpu + self._layout.eip)
        self._hflags = ctypes.c_uint32.from_address(self.cpu + self._layout.hflags)
        self._segs = (SegmentCache * 6).from_address(self.cpu + self._layout.segs)
        #: env->regs[16] in QEMU's order (cpu.h R_EAX, R_ECX, R_EDX, R_EBX, R_ESP, ...), and
        #: env->cr[5]: read and written in place from inside a hook, without the binding's
        #: per-register dispatch (~2 us a register).
        self.gprs = (ctypes.c_uint64 * 16).from_address(self.cpu + self._layout.env)
        self.crs = (ctypes.c_uint64 * 5).from_address(
            self.cpu + self._layout.segs + _CACHES * ctypes.sizeof(SegmentCache))

    @property
    def error_code(self) -> int:
        return self._error_code.value & 0xFFFF_FFFF

    @property
    def software(self) -> bool:
        """INT n / INT3 / INTO (a trap whose frame RIP is the next instruction)."""
        return bool(self._is_int.value)

    def deliver(self) -> None:
        """Deliver the exception in flight through the guest's IDT, as QEMU does. Only from
        inside the interrupt (or invalid-instruction) hook, and only once the caller checked that
        the delivery cannot fault."""
        self._lib.x86_cpu_do_interrupt_x86_64(self.cpu)

    def deliver_instead(self, vector: int, error_code: int) -> None:
        """Deliver a fault ``vector`` with ``error_code`` in place of the one in flight (INT n
        through a gate its CPL may not use becomes #GP, SDM 6.12.1.1)."""
        self._exception_index.value = vector
        self._error_code.value = error_code
        self._is_int.value = 0
        self.deliver()

    @property
    def rip(self) -> int:
        return self._eip.value

    def set_rip(self, rip: int) -> None:
        """Move RIP from inside a hook. Not through uc_reg_write: that marks unicorn's next
        stop as one that needs no PC sync (uc.c, skip_sync_pc_on_exit) and the mark outlives
        the hook, so a later stop from another thread would leave RIP where an earlier block
        began: the guest re-runs instructions (unicorn 2.1.4)."""
        self._eip.value = rip

    @property
    def interrupt_shadow(self) -> bool:
        """The instruction after STI / MOV SS has not run yet: no external interrupt now."""
        return bool(self._hflags.value & HF_INHIBIT_IRQ)

    def interrupt(self, vector: int) -> None:
        """Deliver an external interrupt (between bursts, with RFLAGS.IF set and the gate
        checked, as for ``deliver``): what the CPU does when its local APIC presents one."""
        self._lib.do_interrupt_x86_hardirq_x86_64(self.cpu + self._layout.env, vector, 1)

    def enter_kernel(self, selector: int) -> None:
        """CS and SS as SYSCALL loads them from IA32_STAR[47:32] (flat, DPL 0, 64-bit code),
        and the CPL and mode flags recomputed from them (QEMU's x86_update_hflags). unicorn
        implements SYSCALL as a hook only; its API cannot change the CPL."""
        segs = self._segs
        segs[R_CS].selector, segs[R_CS].base = selector & 0xFFFC, 0
        segs[R_CS].limit, segs[R_CS].flags = 0xFFFF_FFFF, KERNEL_CODE64
        # SS.Selector = STAR[47:32] + 8: only CS has its RPL forced to 0 (SDM vol. 2B, SYSCALL)
        segs[R_SS].selector, segs[R_SS].base = (selector + 8) & 0xFFFF, 0
        segs[R_SS].limit, segs[R_SS].flags = 0xFFFF_FFFF, KERNEL_DATA
        self._update_hflags()

    def segments(self) -> dict[str, Segment]:
        """CS, DS, ES, FS, GS, SS, TR and LDT as the CPU holds them, hidden parts included (QEMU's
        segment caches: cpu.h ``segs[6], ldt, tr``), read directly: unicorn's API returns only
        selectors for CS..GS, and a walk of the GDT costs ~50 us per exception."""
        caches = (SegmentCache * 8).from_address(self.cpu + self._layout.segs)
        out = {}
        for index, name in enumerate(("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")):
            c = caches[index]
            out[name] = Segment(c.selector & 0xFFFF, c.base, c.limit,
                                (c.flags & DESC_FLAGS_MASK) >> DESC_FLAGS_SHIFT)
        return out

    def tables_and_control(self) -> tuple[DescriptorTable, DescriptorTable, tuple[int, ...]]:
        """GDTR, IDTR and CR0..CR4 (cpu.h: ``gdt, idt`` after ``tr``, then ``cr[5]``), read
        directly (eight API reads cost ~25 us per exception)."""
        return _tables_and_control(self.cpu + self._layout.segs)

    @property
    def code64(self) -> bool:
        """The CPU executes 64-bit code (EFER.LMA and CS.L: hflags CS64)."""
        return bool(self._hflags.value & HF_CS64)

    def load_segments(self, sregs: Sregs) -> None:
        """CS, DS, ES, FS, GS and SS exactly as ``sregs`` has them, hidden parts included (as
        KVM_SET_SREGS takes them), then the mode flags QEMU derives from them. unicorn's API
        cannot: in a 64-bit instance a selector write loads no descriptor."""
        for index, name in enumerate(("es", "cs", "ss", "ds", "fs", "gs")):  # cpu.h R_ES..R_GS
            seg, cache = getattr(sregs, name), self._segs[index]
            cache.selector, cache.base, cache.limit = seg.selector, seg.base, seg.limit
            cache.flags = (seg.attributes << DESC_FLAGS_SHIFT) & DESC_FLAGS_MASK
        self._update_hflags()

    def _update_hflags(self) -> None:
        """QEMU's x86_update_hflags: CPL and mode flags again from the segment caches, CR0 and
        EFER, after a segment was written here."""
        self._lib.x86_update_hflags_x86_64(self.cpu + self._layout.env)

    def forget(self) -> None:
        """The exception in flight was not delivered (the run stops): reset the #DF tracking
        that unicorn leaves set, as a delivery would."""
        self._old_exception.value = -1
