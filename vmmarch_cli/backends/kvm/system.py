"""/dev/kvm: opening it, ioctls through libc, capability and API checks.

ioctls go through ``ctypes`` rather than ``fcntl.ioctl``: ctypes releases the GIL for the call
(vCPU threads run ``KVM_RUN`` in parallel) and hands EINTR back to us instead of retrying, which
is how a stop request interrupts a running vCPU.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from vmmarch_cli.backends.kvm import abi
from vmmarch_cli.errors import BackendError, BackendUnavailableError

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

KVM_DEVICE = Path(os.environ.get("VMMARCH_KVM_DEVICE", "/dev/kvm"))

#: Capabilities the backend cannot work without, and why.
REQUIRED_CAPS = {
    abi.KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY (guest RAM from a host mapping)",
    abi.KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    abi.KVM_CAP_EXT_CPUID: "KVM_CAP_EXT_CPUID (KVM_SET_CPUID2)",
    abi.KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP (in-kernel PIC, IOAPIC and LAPIC)",
    abi.KVM_CAP_PIT2: "KVM_CAP_PIT2 (in-kernel PIT)",
    abi.KVM_CAP_VCPU_EVENTS: "KVM_CAP_VCPU_EVENTS (exception injection)",
    abi.KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT (stopping a running vCPU)",
}


#: The bare libc call for hot paths: returns -1 and leaves errno for ctypes.get_errno().
raw_ioctl = _ioctl


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | None = None) -> int:
    """One ioctl; ``arg`` is an integer or a structure passed by address. Raises OSError."""
    if isinstance(arg, ctypes.Structure):
        pointer: int | None = ctypes.addressof(arg)
    else:
        pointer = arg
    ret: int = _ioctl(fd, request, pointer)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def checked(fd: int, request: int, arg: int | ctypes.Structure | None, what: str) -> int:
    """An ioctl whose failure is the hypervisor's, reported as a ``BackendError`` naming it."""
    try:
        return ioctl(fd, request, arg)
    except OSError as e:
        raise BackendError(f"{what} failed: {e.strerror} (errno {e.errno})") from None


def open_kvm(device: Path = KVM_DEVICE) -> int:
    """Open /dev/kvm and check the API version and every required capability."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackendUnavailableError(
            f"{device} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
            "or use --backend emulate"
        ) from None
    except PermissionError:
        raise BackendUnavailableError(
            f"{device} is not readable and writable by this user: add yourself to the kvm group "
            "or run as root"
        ) from None
    except OSError as e:
        raise BackendUnavailableError(f"cannot open {device}: {e.strerror}") from None
    try:
        try:
            version = ioctl(fd, abi.KVM_GET_API_VERSION)
        except OSError as e:
            raise BackendUnavailableError(
                f"{device} does not answer KVM_GET_API_VERSION ({e.strerror}): not a KVM device"
            ) from None
        if version != abi.KVM_API_VERSION:
            raise BackendUnavailableError(
                f"{device} speaks KVM API version {version}; vmm-arch needs {abi.KVM_API_VERSION}"
            )
        for cap, name in REQUIRED_CAPS.items():
            if ioctl(fd, abi.KVM_CHECK_EXTENSION, cap) <= 0:
                raise BackendUnavailableError(f"{device} lacks {name}, which vmm-arch needs")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_extension(fd: int, cap: int) -> int:
    try:
        return ioctl(fd, abi.KVM_CHECK_EXTENSION, cap)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return 0
        raise


def host_needs_ring0_workarounds() -> bool:
    """True on a KVM that emulates guest ring-0 code instead of running it in hardware.

    Detected, not guessed: the PVM module (``kvm_pvm``) is loaded, or the host CPU offers
    neither VMX nor SVM while /dev/kvm works (so KVM cannot be hardware-assisted).
    """
    if Path("/sys/module/kvm_pvm").exists():
        return True
    try:
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("flags")), ""
        )
    except OSError:
        return False
    words = set(flags.split())
    return "vmx" not in words and "svm" not in words
