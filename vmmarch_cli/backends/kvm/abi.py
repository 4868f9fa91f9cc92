"""The KVM ABI: ctypes mirrors of linux/kvm.h and asm/kvm.h, and the ioctl numbers.

Structures are declared in the header's field order under the header's names; a test compiles
the real headers and checks every size and the kvm_run offsets. Nothing outside ``backends.kvm``
imports this module.
"""

from __future__ import annotations

import ctypes
import functools
import struct

from ioctl_opt import IO, IOR, IOW, IOWR

c_u8 = ctypes.c_uint8
c_u16 = ctypes.c_uint16
c_u32 = ctypes.c_uint32
c_u64 = ctypes.c_uint64
c_s64 = ctypes.c_int64

KVM_API_VERSION = 12
KVMIO = 0xAE


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_u32),
        ("flags", c_u32),
        ("guest_phys_addr", c_u64),
        ("memory_size", c_u64),
        ("userspace_addr", c_u64),
    ]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_u64),
        ("limit", c_u32),
        ("selector", c_u16),
        ("type", c_u8),
        ("present", c_u8),
        ("dpl", c_u8),
        ("db", c_u8),
        ("s", c_u8),
        ("l", c_u8),
        ("g", c_u8),
        ("avl", c_u8),
        ("unusable", c_u8),
        ("padding", c_u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_u64), ("limit", c_u16), ("padding", c_u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_u64),
        ("cr2", c_u64),
        ("cr3", c_u64),
        ("cr4", c_u64),
        ("cr8", c_u64),
        ("efer", c_u64),
        ("apic_base", c_u64),
        ("interrupt_bitmap", c_u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_u8 * 16) * 8),
        ("fcw", c_u16),
        ("fsw", c_u16),
        ("ftwx", c_u8),
        ("pad1", c_u8),
        ("last_opcode", c_u16),
        ("last_ip", c_u64),
        ("last_dp", c_u64),
        ("xmm", (c_u8 * 16) * 16),
        ("mxcsr", c_u32),
        ("pad2", c_u32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_u32), ("reserved", c_u32), ("data", c_u64)]


class kvm_msrs(ctypes.Structure):
    """Header only: ioctl numbers are computed from the fixed part (variable-length array)."""

    _fields_ = [("nmsrs", c_u32), ("pad", c_u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_u32),
        ("index", c_u32),
        ("flags", c_u32),
        ("eax", c_u32),
        ("ebx", c_u32),
        ("ecx", c_u32),
        ("edx", c_u32),
        ("padding", c_u32 * 3),
    ]


#: The same layouts as struct formats, for converting many fields in one C call (convert.py,
#: KvmVcpu.set_cpuid); tests/backends/test_kvm_abi.py checks each against the ctypes class and the
#: kernel's sizeof.
KVM_SEGMENT_FORMAT = "QIH10s"  # base, limit, selector, the flag bytes type .. unusable, padding
KVM_DTABLE_FORMAT = "QH6x"
#: kvm_sregs up to (not including) interrupt_bitmap: 8 segments, GDT, IDT, 7 registers.
KVM_SREGS_HEAD = struct.Struct("<" + KVM_SEGMENT_FORMAT * 8 + KVM_DTABLE_FORMAT * 2 + "7Q")
KVM_CPUID_ENTRY2 = struct.Struct("<7I12x")
#: kvm_msr_entry: index, reserved (zero), data.
KVM_MSR_ENTRY = struct.Struct("<I4xQ")
#: kvm_regs: the 16 GPRs in GPR_NAMES order, RIP, RFLAGS.
KVM_REGS = struct.Struct("<18Q")


class kvm_cpuid2(ctypes.Structure):
    _fields_ = [("nent", c_u32), ("padding", c_u32)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # sic, the header's spelling

KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", c_u32 * 1024)]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", c_u32), ("level", c_u32)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_u32), ("pad", c_u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class _events_exception(ctypes.Structure):
    _fields_ = [("injected", c_u8), ("nr", c_u8), ("has_error_code", c_u8),
                ("pending", c_u8), ("error_code", c_u32)]


class _events_interrupt(ctypes.Structure):
    _fields_ = [("injected", c_u8), ("nr", c_u8), ("soft", c_u8), ("shadow", c_u8)]


class _events_nmi(ctypes.Structure):
    _fields_ = [("injected", c_u8), ("pending", c_u8), ("masked", c_u8), ("pad", c_u8)]


class _events_smi(ctypes.Structure):
    _fields_ = [("smm", c_u8), ("pending", c_u8), ("smm_inside_nmi", c_u8),
                ("latched_init", c_u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", c_u32),
        ("flags", c_u32),
        ("smi", _events_smi),
        ("triple_fault_pending", c_u8),
        ("reserved", c_u8 * 26),
        ("exception_has_payload", c_u8),
        ("exception_payload", c_u64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", c_u32), ("flags", c_u32), ("args", c_u64 * 4), ("pad", c_u8 * 64)]


# --- snapshots (backends/kvm/snapshot.py) ----------------------------------------------------


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", c_u64 * 4), ("dr6", c_u64), ("dr7", c_u64), ("flags", c_u64),
                ("reserved", c_u64 * 9)]


KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_u32), ("reserved", c_u32), ("value", c_u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", c_u32), ("flags", c_u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", c_u64 * 16)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class kvm_irqchip(ctypes.Structure):
    """The chip's state is a union of struct kvm_pic_state and struct kvm_ioapic_state in 512
    bytes; a snapshot keeps it whole, so it is declared as the bytes."""

    _fields_ = [("chip_id", c_u32), ("pad", c_u32), ("chip", c_u8 * 512)]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [("count", c_u32), ("latched_count", c_u16), ("count_latched", c_u8),
                ("status_latched", c_u8), ("status", c_u8), ("read_state", c_u8),
                ("write_state", c_u8), ("write_latch", c_u8), ("rw_mode", c_u8),
                ("mode", c_u8), ("bcd", c_u8), ("gate", c_u8), ("count_load_time", c_s64)]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", c_u32),
                ("reserved", c_u32 * 9)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [("clock", c_u64), ("flags", c_u32), ("pad0", c_u32), ("realtime", c_u64),
                ("host_tsc", c_u64), ("pad", c_u32 * 4)]


class kvm_msr_list(ctypes.Structure):
    _fields_ = [("nmsrs", c_u32)]  # followed by nmsrs __u32 indices (msr_list_buffer)


# --- kvm_run (the shared page mmap'ed from the vCPU fd) ---------------------------------------


class _run_io(ctypes.Structure):
    _fields_ = [("direction", c_u8), ("size", c_u8), ("port", c_u16), ("count", c_u32),
                ("data_offset", c_u64)]


class _run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_u64), ("data", c_u8 * 8), ("len", c_u32), ("is_write", c_u8)]


class _run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_u32), ("ndata", c_u32), ("data", c_u64 * 16)]


class _run_emulation_failure(ctypes.Structure):
    _fields_ = [("suberror", c_u32), ("ndata", c_u32), ("flags", c_u64), ("insn_size", c_u8),
                ("insn_bytes", c_u8 * 15)]


class _run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_u64), ("cpu", c_u32)]


class _run_system_event(ctypes.Structure):
    _fields_ = [("type", c_u32), ("ndata", c_u32), ("data", c_u64 * 16)]


class _run_debug(ctypes.Structure):
    """struct kvm_debug_exit_arch (x86)."""

    _fields_ = [("exception", c_u32), ("pad", c_u32), ("pc", c_u64), ("dr6", c_u64),
                ("dr7", c_u64)]


class _run_exit(ctypes.Union):
    _fields_ = [
        ("io", _run_io),
        ("debug", _run_debug),
        ("mmio", _run_mmio),
        ("internal", _run_internal),
        ("emulation_failure", _run_emulation_failure),
        ("fail_entry", _run_fail_entry),
        ("system_event", _run_system_event),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", c_u8),
        ("immediate_exit", c_u8),
        ("padding1", c_u8 * 6),
        ("exit_reason", c_u32),
        ("ready_for_interrupt_injection", c_u8),
        ("if_flag", c_u8),
        ("flags", c_u16),
        ("cr8", c_u64),
        ("apic_base", c_u64),
        ("exit", _run_exit),
        ("kvm_valid_regs", c_u64),
        ("kvm_dirty_regs", c_u64),
        ("s", ctypes.c_char * 2048),
    ]


class kvm_guest_debug(ctypes.Structure):
    """struct kvm_guest_debug with x86's kvm_guest_debug_arch (debugreg[8]: DR0-DR7)."""

    _fields_ = [("control", c_u32), ("pad", c_u32), ("debugreg", c_u64 * 8)]


# kvm_guest_debug.control (linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_HW_BP = 0x20000


# Exit reasons (linux/kvm.h KVM_EXIT_*).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# Capabilities (KVM_CAP_*).
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MP_STATE = 14
KVM_CAP_PIT2 = 33
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_IMMEDIATE_EXIT = 136

# ioctls on /dev/kvm
KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
KVM_GET_MSR_INDEX_LIST = IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, kvm_cpuid2)
# ioctls on a VM fd
KVM_CREATE_VCPU = IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)
KVM_IRQ_LINE = IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = IOR(KVMIO, 0x63, kvm_irqchip)  # sic: _IOR in linux/kvm.h
KVM_CREATE_PIT2 = IOW(KVMIO, 0x77, kvm_pit_config)
KVM_SET_CLOCK = IOW(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = IOR(KVMIO, 0x7C, kvm_clock_data)
KVM_GET_PIT2 = IOR(KVMIO, 0x9F, kvm_pit_state2)  # VM ioctls: the numbers are reused on vCPUs
KVM_SET_PIT2 = IOW(KVMIO, 0xA0, kvm_pit_state2)
# ioctls on a vCPU fd
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_SET_GUEST_DEBUG = IOW(KVMIO, 0x9B, kvm_guest_debug)
KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_GET_XSAVE = IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = IOW(KVMIO, 0xA7, kvm_xcrs)


@functools.cache
def _with_entries(header: type[ctypes.Structure], entry: type[ctypes.Structure],
                  count: int) -> type[ctypes.Structure]:
    """A header followed by ``count`` entries; the class is built once per count."""

    class Buffer(ctypes.Structure):
        _fields_ = [("header", header), ("entries", entry * count)]

    return Buffer


def msrs_buffer(count: int) -> tuple[kvm_msrs, ctypes.Array[kvm_msr_entry]]:
    """A kvm_msrs header followed in memory by ``count`` entries (one contiguous buffer)."""
    buf = _with_entries(kvm_msrs, kvm_msr_entry, count)()
    buf.header.nmsrs = count
    return buf.header, buf.entries


def cpuid_buffer(count: int) -> tuple[kvm_cpuid2, ctypes.Array[kvm_cpuid_entry2]]:
    buf = _with_entries(kvm_cpuid2, kvm_cpuid_entry2, count)()
    buf.header.nent = count
    return buf.header, buf.entries
