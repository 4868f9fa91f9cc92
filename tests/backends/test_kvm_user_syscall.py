"""What this KVM does with a guest user process's SYSCALL (examples/guests/usersyscall.S)."""

from __future__ import annotations

from vmmarch_cli.backends.kvm.system import host_needs_ring0_workarounds


def test_syscall_from_ring3_reaches_ring0_or_the_host_is_known_not_to(
    user_syscalls: tuple[bool, str],
) -> None:
    works, line = user_syscalls
    if host_needs_ring0_workarounds():
        # kvm_pvm: the entry runs with CS=0x33 (its own user code selector), at CPL 3.
        assert not works and line == "SYSCALL_CS 0000000000000033 FAIL", line
    else:
        assert works and line == "SYSCALL_CS 0000000000000008 ok", line
