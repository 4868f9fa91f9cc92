"""The hypervisor-neutral interface: what a backend must offer the arch pipeline and the machine.

Everything here is plain data or a ``typing.Protocol``. Nothing is KVM-specific: segments carry
the architectural 16-bit attribute word (the GDT descriptor's flags, Intel SDM vol. 3A 3.4.5),
limits are in bytes, the LAPIC is the architectural 1 KiB xAPIC register page (SDM vol. 3A
10.4.1, table 10-1), and exits name what the guest did, not how a hypervisor reported it.
A backend translates to its native form once, at its own boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

# --- registers -----------------------------------------------------------------------------

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)


@dataclass(frozen=True)
class Regs:
    """General-purpose registers, RIP and RFLAGS."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2  # bit 1 is reserved and always 1 (SDM vol. 1 3.4.3)


# Segment.attributes, bit by bit: the descriptor's bits 40-55 (SDM vol. 3A 3.4.5, figure 3-8)
# without the limit's bits 19:16 (word bits 8-11), which is also KVM's layout.
ATTR_TYPE = 0xF  # tables 3-1 (code/data) and 3-2 (system)
ATTR_TYPE_ACCESSED = 1 << 0  # code/data: set by the CPU on every load
ATTR_TYPE_BUSY = 1 << 1  # TSS: set by LTR
ATTR_S = 1 << 4  # code/data (1) or system (0)
ATTR_DPL_SHIFT = 5
ATTR_DPL_MASK = 0x3
ATTR_P = 1 << 7
ATTR_AVL = 1 << 12
ATTR_L = 1 << 13  # 64-bit code
ATTR_DB = 1 << 14
ATTR_G = 1 << 15  # limit in 4 KiB units
ATTR_MASK = 0xF0FF
# Type values (SDM tables 3-1 and 3-2).
TYPE_DATA_RW = 0x2
TYPE_CODE_XR = 0xA
TYPE_LDT = 0x2
TYPE_TSS_BUSY = 0xB  # a busy 64-bit TSS in IA-32e mode, a busy 32-bit TSS outside it


@dataclass(frozen=True)
class Segment:
    """A segment register with its hidden part.

    ``attributes`` is the descriptor's flag word: bits 0-7 are the access byte (type, S, DPL, P),
    bits 12-15 are AVL, L, D/B, G (SDM vol. 3A 3.4.5). ``limit`` is in bytes, already scaled by G.
    A null/unusable segment has P (bit 7) clear.
    """

    selector: int = 0
    base: int = 0
    limit: int = 0
    attributes: int = 0

    @property
    def present(self) -> bool:
        return bool(self.attributes & ATTR_P)


@dataclass(frozen=True)
class DescriptorTable:
    """GDTR or IDTR: a linear base and a limit in bytes (the last valid byte offset)."""

    base: int = 0
    limit: int = 0


@dataclass(frozen=True)
class Sregs:
    """Segment, descriptor-table and control registers, EFER and the APIC base MSR."""

    cs: Segment = Segment()
    ds: Segment = Segment()
    es: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    ss: Segment = Segment()
    tr: Segment = Segment()
    ldt: Segment = Segment()
    gdt: DescriptorTable = DescriptorTable()
    idt: DescriptorTable = DescriptorTable()
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass(frozen=True)
class Fpu:
    """The x87 and SSE state (the FXSAVE image's fields, arch/x86_64/fxsave.py); the defaults
    are the values after FNINIT and reset (SDM vol. 1 8.1.5, 10.2.3.1): control word 0x37F,
    MXCSR 0x1F80, every x87 register empty (abridged tag 0), registers zero. ``st`` holds the
    x87 registers in stack order (ST0 first), 80 bits each; ``xmm`` XMM0-XMM15."""

    fcw: int = 0x37F
    mxcsr: int = 0x1F80
    fsw: int = 0
    ftw: int = 0  # abridged tag word: bit i set when physical register R(i) is not empty
    st: tuple[int, ...] = (0,) * 8
    xmm: tuple[int, ...] = (0,) * 16


@dataclass(frozen=True)
class MsrEntry:
    index: int
    value: int


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf (function) and subleaf (index); ``indexed`` says ECX selects the subleaf."""

    function: int
    index: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    indexed: bool = False


LAPIC_PAGE_SIZE = 1024  # the xAPIC registers that matter live in the first KiB (SDM table 10-1)


@dataclass(frozen=True)
class Lapic:
    """The local APIC register page: 32-bit registers at 16-byte strides (SDM vol. 3A 10.4.1)."""

    page: bytes = bytes(LAPIC_PAGE_SIZE)

    def register(self, offset: int) -> int:
        return int.from_bytes(self.page[offset : offset + 4], "little")

    def with_registers(self, values: Mapping[int, int]) -> Lapic:
        """A copy with each register at offset ``k`` set to ``values[k]`` (one copy for all)."""
        page = bytearray(self.page)
        for offset, value in values.items():
            page[offset : offset + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")
        return Lapic(bytes(page))


# --- exits ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IoOut:
    port: int
    size: int
    data: bytes  # ``count`` repetitions of ``size`` bytes for a rep outs


@dataclass(frozen=True)
class IoIn:
    port: int
    size: int
    count: int = 1


@dataclass(frozen=True)
class MmioWrite:
    address: int
    data: bytes


@dataclass(frozen=True)
class MmioRead:
    address: int
    size: int


@dataclass(frozen=True)
class Halt:
    pass


@dataclass(frozen=True)
class Shutdown:
    """A triple fault (or the architectural shutdown state it leads to)."""

    reason: str = "triple fault"


@dataclass(frozen=True)
class InternalError:
    """The hypervisor could not run or emulate what the guest did."""

    reason: str
    instruction: bytes = b""


@dataclass(frozen=True)
class Interrupted:
    """The run was cut short from the host side (stop request, signal)."""


@dataclass(frozen=True)
class Unknown:
    reason: str


class WatchKind(StrEnum):
    """What access a watchpoint stops on (gdb's Z2, Z3, Z4)."""

    WRITE = "write"
    READ = "read"
    ACCESS = "access"


@dataclass(frozen=True)
class Watchpoint:
    address: int  # guest-virtual
    length: int
    kind: WatchKind


@dataclass(frozen=True)
class Debug:
    """The vCPU stopped for the debugger (``set_guest_debug``): before the instruction at a
    breakpoint (``breakpoint`` True), right after an instruction that accessed a watched
    range (``watch``: which one), or after a single step; ``rip`` is where it is now."""

    rip: int
    breakpoint: bool
    watch: Watchpoint | None = None


VcpuExit = (
    IoOut | IoIn | MmioWrite | MmioRead | Halt | Shutdown | InternalError | Interrupted
    | Unknown | Debug
)


@dataclass(frozen=True)
class GuestDebug:
    """What stops a vCPU for the debugger (KVM_SET_GUEST_DEBUG's model): execution reaching a
    guest-virtual address in ``breakpoints``, and, with ``single_step``, each instruction.
    ``planted``: where the debugger itself wrote an ``int3`` into guest memory (when the
    backend ran out of breakpoints): an ``int3`` executed there stops the vCPU with ``Debug``
    (RIP on it) instead of raising the guest's own #BP. ``watchpoints``: accesses that stop
    the vCPU right after the instruction that made them."""

    breakpoints: frozenset[int] = frozenset()
    single_step: bool = False
    planted: frozenset[int] = frozenset()
    watchpoints: frozenset[Watchpoint] = frozenset()


# --- protocols -----------------------------------------------------------------------------


@runtime_checkable
class GuestMemory(Protocol):
    """Guest-physical memory with bounds-checked access.

    Every access that names a range outside RAM raises ``GuestMemoryError``; no caller ever
    computes a host address from a guest value.
    """

    @property
    def size(self) -> int:
        """Bytes of RAM (the sum of the regions)."""
        ...

    def regions(self) -> Sequence[tuple[int, int]]:
        """(guest-physical start, length) of each RAM region, sorted."""
        ...

    def read(self, address: int, length: int) -> bytes: ...

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None: ...

    def view(self, address: int, length: int) -> memoryview:
        """A writable view of a range inside one region (for zero-copy loading)."""
        ...

    def contains(self, address: int, length: int) -> bool: ...


class HostMemory(GuestMemory, Protocol):
    """Guest memory as host mappings a backend maps into its VM (KVM through
    ``userspace_addr``, an emulator through its pointer-mapping call). Whoever made it closes
    it, after the VMs that map it."""

    def host_regions(self) -> Sequence[tuple[int, int, int]]:
        """(guest start, length, host address) of each region."""
        ...

    def close(self) -> None: ...


class Vcpu(Protocol):
    """One virtual CPU. Setters take the whole state at once; backends translate it once."""

    index: int

    def get_regs(self) -> Regs: ...
    def set_regs(self, regs: Regs) -> None: ...
    def get_sregs(self) -> Sregs: ...
    def set_sregs(self, sregs: Sregs) -> None: ...
    def get_fpu(self) -> Fpu: ...
    def set_fpu(self, fpu: Fpu) -> None: ...
    def get_msrs(self, indices: Sequence[int]) -> list[MsrEntry]: ...
    def set_msrs(self, entries: Sequence[MsrEntry]) -> None:
        """Set every entry or raise: a partial write is an error."""
        ...

    def get_cpuid(self) -> list[CpuidEntry]: ...
    def set_cpuid(self, entries: Sequence[CpuidEntry]) -> None: ...
    def get_lapic(self) -> Lapic: ...
    def set_lapic(self, lapic: Lapic) -> None: ...
    def run(self) -> VcpuExit: ...
    def complete_io_in(self, data: bytes) -> None:
        """Hand the bytes of the last ``IoIn`` to the guest before the next ``run``."""
        ...

    def complete_mmio_read(self, data: bytes) -> None: ...
    def request_stop(self) -> None:
        """Make a running or the next ``run`` return ``Interrupted``; callable from any thread."""
        ...

    def clear_stop(self) -> None:
        """Forget an earlier ``request_stop``: the next ``run`` runs the guest again (a
        debugger resuming a paused VM). Call it only while ``run`` is not running."""
        ...

    def set_guest_debug(self, debug: GuestDebug) -> None:
        """Stop ``run`` with ``Debug`` where ``debug`` says, from the next ``run`` on (while
        ``run`` is not running). Resuming at a breakpoint's own address runs its instruction:
        a breakpoint stops the vCPU when execution reaches it, not again where it stopped.
        ``BackendError`` for what the backend cannot do (more breakpoints than it has)."""
        ...

    def sample(self) -> None:
        """Record the guest RIP now into ``rip_samples`` (``--profile``); from any thread."""
        ...

    @property
    def rip_samples(self) -> Mapping[int, int]:
        """RIP -> how many ``sample`` calls found the vCPU there."""
        ...

    @property
    def injected_events(self) -> Mapping[str, int]:
        """What the backend delivered to the guest itself, by name ("#PF", "interrupt 0x20"):
        for ``--verbose`` and the JSON."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class InlinePortIo(Protocol):
    """Optional: a vCPU that completes port I/O inside ``run`` by calling the VMM's devices
    (the emulate backend), instead of returning ``IoIn``/``IoOut`` exits."""

    def attach_io(self, read: Callable[[int, int], int],
                  write: Callable[[int, int, int], None]) -> None:
        """Complete every port access with ``read(port, size)`` and ``write(port, size,
        value)``, called on the vCPU's thread."""
        ...


@runtime_checkable
class PostedPortIo(Protocol):
    """Optional: port accesses a vCPU completes itself, without an exit or a call to the VMM, as
    the VMM posted them (the emulate backend's engine, patch 0010). A posted port's byte reads
    return the value given; its byte writes are queued in order until ``collect_posted``. The
    VMM posts only what has no other effect in the device's present state (devices/bus.py,
    ``Posting``), and collects before it touches the device again."""

    def can_post(self) -> bool:
        """Whether this vCPU completes posted accesses; fixed for its lifetime (the emulate
        backend on the unicorn wheel cannot, and every access exits as usual)."""
        ...

    def post_port(self, port: int, read: int | None, queue: bool) -> bool:
        """Answer byte reads of ``port`` with ``read`` (None: exit as usual) and queue its
        byte writes (``queue``); from any thread. False when this vCPU cannot (then it never
        will: every access exits as usual)."""
        ...

    def collect_posted(self) -> list[tuple[int, bytes]]:
        """The queued writes, oldest first, as (port, bytes) runs; one caller at a time."""
        ...

    def posted_reads(self) -> int:
        """How many reads were answered without an exit so far."""
        ...


@runtime_checkable
class SnapshotVcpu(Protocol):
    """A vCPU whose whole state a snapshot can keep (an optional capability; snapshot/)."""

    def save_state(self) -> bytes:
        """Everything this vCPU holds, taken while it does not run (between ``run`` calls)."""
        ...

    def restore_state(self, data: bytes) -> None:
        """Take ``save_state``'s bytes (from the same backend and engine) before the first
        ``run``; the guest then goes on as if it never stopped."""
        ...


@runtime_checkable
class SnapshotVm(Protocol):
    """A VM that can keep its own devices' state (interrupt controllers) in a snapshot."""

    def snapshot_identity(self) -> str:
        """What must be the same to restore this VM's vCPU state: the backend's build."""
        ...

    def snapshot_refusal(self) -> str | None:
        """Why this VM cannot take or restore snapshots here; None when it can."""
        ...

    def save_state(self) -> bytes: ...

    def restore_state(self, data: bytes) -> None: ...


class Vm(Protocol):
    """A virtual machine: memory, interrupt lines and vCPUs."""

    @property
    def memory(self) -> GuestMemory: ...

    def supported_cpuid(self) -> list[CpuidEntry]:
        """What the hypervisor can offer a guest, the starting point of the CPUID step."""
        ...

    def create_vcpu(self, index: int) -> Vcpu: ...
    def set_irq_line(self, irq: int, level: bool) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class HypervisorInfo:
    """What ``vmm-arch backends`` shows about a backend."""

    name: str
    usable: bool
    reason: str = ""
    facts: dict[str, str] = field(default_factory=dict)


class Hypervisor(Protocol):
    name: str

    def info(self) -> HypervisorInfo: ...

    def default_cpu_mask(self) -> frozenset[str]:
        """CPU features this host cannot run in a guest's ring 0, to hide from CPUID."""
        ...

    def max_vcpus(self) -> int:
        """The most vCPUs one VM of this backend can have."""
        ...

    def create_vm(self, memory: HostMemory) -> Vm:
        """A VM whose RAM is ``memory`` (the caller's: it stays open until the VM is closed,
        and the caller closes it)."""
        ...

    def close(self) -> None:
        """Release what opening the backend took (the KVM fd); its VMs are closed first."""
        ...


class HypervisorClass(Protocol):
    """A backend as the registry finds it (``vmmarch_cli.backends``): its class, asked about
    the host before anything is opened."""

    def __call__(self, quiet: bool = False) -> Hypervisor:
        """Open the backend; what it has to say while opening goes to stderr unless ``quiet``."""
        ...

    def probe(self, facts: bool = True) -> HypervisorInfo:
        """Whether it can run here, and why not (``vmm-arch backends``); opens nothing. Without
        ``facts`` only whether (``auto`` choosing a backend), which may cost less."""
        ...

    def runs_ring0_in_hardware(self) -> bool:
        """Whether guest kernel code runs on the CPU (not in an emulator) here."""
        ...
