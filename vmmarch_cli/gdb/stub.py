"""A gdb stub for one boot: gdb attaches before the guest's first instruction, reads and writes
registers and guest-virtual memory of every vCPU (vCPUs are gdb threads), then continues,
detaches or kills (gdb manual, appendix E "Remote Serial Protocol"). The guest runs only when
gdb says so; this first version has no breakpoints or stepping yet (docs/gdb.md).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from dataclasses import replace
from enum import StrEnum

from vmmarch_cli.arch.x86_64 import msr, paging, regs
from vmmarch_cli.errors import EX_UNAVAILABLE, VmmArchError
from vmmarch_cli.gdb import registers, rsp
from vmmarch_cli.vcpu import GuestMemory, Vcpu

#: What ``k`` makes vmm-arch exit with: 128 + SIGKILL, as a shell reports a killed process.
EX_KILLED = 137
#: gdb's signal numbers in stop replies (gdb/signals.def): SIGTRAP after attaching.
SIGTRAP = 5


class GdbError(VmmArchError):
    """The stub cannot listen where it was asked to (a port in use, a bad address)."""

    exit_status = EX_UNAVAILABLE


class KilledByDebugger(VmmArchError):
    """gdb sent ``k``: the boot ends without running the guest further."""

    exit_status = EX_KILLED


class Resume(StrEnum):
    CONTINUE = "continue"  # gdb waits for the guest to end (a W stop reply)
    DETACH = "detach"  # the guest runs on, gdb is gone


def parse_address(spec: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """``[HOST:]PORT`` (host 127.0.0.1 by default) or ``unix:PATH``; ValueError otherwise."""
    if spec.startswith("unix:"):
        path = spec[len("unix:"):]
        if not path:
            raise ValueError("unix: needs a path")
        return socket.AF_UNIX, path
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 0xFFFF:
        raise ValueError(f"{port!r} is not a TCP port")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


def listen(spec: str) -> tuple[socket.socket, str]:
    """A listening socket for ``spec`` (parse_address) and what gdb's ``target remote`` takes
    to reach it."""
    family, address = parse_address(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise GdbError(f"--gdb {spec}: cannot listen there: {e.strerror or e}") from None
    if isinstance(address, str):
        return sock, address
    return sock, f"{address[0]}:{sock.getsockname()[1]}"


class Stub:
    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._conn: rsp.Connection | None = None
        self._vcpus: Sequence[Vcpu] = ()
        self._memory: GuestMemory | None = None
        self._thread = 0  # index of the vCPU g/p/m act on

    def serve(self, vcpus: Sequence[Vcpu], memory: GuestMemory) -> Resume:
        """Wait for gdb, then answer it until it continues, detaches or kills."""
        self._vcpus, self._memory = vcpus, memory
        sock, _ = self._listener.accept()
        self._listener.close()
        conn = self._conn = rsp.Connection(sock)
        while True:
            try:
                packet = conn.receive()
                try:
                    reply, resume = self._handle(packet)
                except ValueError:  # malformed numbers or hex in a packet gdb would not send
                    reply, resume = b"E01", None
                if reply is not None:
                    conn.send(reply)
                    if packet == b"QStartNoAckMode":
                        conn.acks = False
            except (rsp.Disconnected, rsp.ProtocolError, OSError):
                # The client went away (or broke the framing), even mid-reply: the guest
                # runs on, as after a detach.
                resume = Resume.DETACH
            if resume is Resume.DETACH:
                conn.close()
                self._conn = None
            if resume is not None:
                return resume

    def finish(self, status: int) -> None:
        """The guest ended: tell a gdb that continued (``W``: exited with ``status``)."""
        if self._conn is not None:
            with contextlib.suppress(OSError, rsp.Disconnected, rsp.ProtocolError):
                self._conn.send(b"W%02x" % (status & 0xFF))
            self._conn.close()
            self._conn = None

    # --- packets -------------------------------------------------------------------------

    def _handle(self, p: bytes) -> tuple[bytes | None, Resume | None]:
        if p == b"\x03":
            return None, None  # already stopped
        if p.startswith(b"qSupported"):
            return (b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+" % rsp.MAX_PACKET,
                    None)
        if p == b"QStartNoAckMode":
            return b"OK", None
        if p.startswith(b"qXfer:features:read:target.xml:"):
            return self._xfer(p.split(b":", 4)[4]), None
        if p == b"?":
            return self._stop_reply(), None
        if p == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (v.index + 1) for v in self._vcpus), None
        if p == b"qsThreadInfo":
            return b"l", None
        if p == b"qC":
            return b"QC%x" % (self._thread + 1), None
        if p == b"qAttached":
            return b"1", None
        if p[:2] == b"Hg":
            return self._select(p[2:]), None
        if p[:1] == b"H":
            return b"OK", None
        if p[:1] == b"T":
            return (b"OK" if self._vcpu_of(p[1:]) is not None else b"E01"), None
        if p == b"g":
            return registers.encode_all(self._state()), None
        if p[:1] == b"p":
            return self._read_register(p[1:]), None
        if p[:1] == b"P":
            return self._write_register(p[1:]), None
        if p[:1] == b"G":
            return self._write_registers(p[1:]), None
        if p[:1] == b"m":
            return self._read_memory(p[1:]), None
        if p[:1] == b"M":
            return self._write_memory(p[1:]), None
        if p == b"vCont?":
            return b"", None  # no vCont: stepping is not there yet, and gdb wants it listed
        if p[:1] in (b"Z", b"z", b"s", b"S") or p.startswith(b"vCont;s"):
            # Not yet (docs/gdb.md). An error, not an empty reply: on an empty one gdb would
            # plant int3s with M instead, which nothing here would ever see or remove.
            return b"E01", None
        if p in (b"c", b"vCont;c") or p.startswith((b"vCont;c:", b"vCont;C", b"C")):
            return None, Resume.CONTINUE
        if p[:1] == b"D":
            return b"OK", Resume.DETACH
        if p == b"k" or p.startswith(b"vKill"):
            raise KilledByDebugger("killed by gdb (k)")
        return b"", None  # not supported: gdb falls back or says so

    def _stop_reply(self) -> bytes:
        return b"T%02xthread:%x;" % (SIGTRAP, self._thread + 1)

    def _xfer(self, span: bytes) -> bytes:
        try:
            offset, length = (int(x, 16) for x in span.split(b","))
        except ValueError:
            return b"E01"
        xml = registers.target_xml()
        chunk = xml[offset:offset + length]
        return (b"l" if offset + length >= len(xml) else b"m") + chunk

    def _vcpu_of(self, text: bytes) -> int | None:
        try:
            tid = int(text, 16)
        except ValueError:
            return None
        if tid in (0, -1):
            return self._thread
        return tid - 1 if 1 <= tid <= len(self._vcpus) else None

    def _select(self, text: bytes) -> bytes:
        """``Hg``: the vCPU g/p/m/M act on. (``Hc``, for continue and step, is acknowledged
        and changes nothing: continue runs every vCPU.)"""
        if text == b"-1":
            return b"OK"
        index = self._vcpu_of(text)
        if index is None:
            return b"E01"
        self._thread = index
        return b"OK"

    def _state(self) -> registers.CpuState:
        v = self._vcpus[self._thread]
        kgs = v.get_msrs([msr.MSR_KERNEL_GS_BASE])
        return registers.CpuState(v.get_regs(), v.get_sregs(), v.get_fpu(),
                                  kgs[0].value if kgs else 0)

    def _register_number(self, text: bytes) -> registers.Register | None:
        try:
            n = int(text, 16)
        except ValueError:
            return None
        return registers.REGISTERS[n] if 0 <= n < len(registers.REGISTERS) else None

    def _read_register(self, text: bytes) -> bytes:
        reg = self._register_number(text)
        return b"E01" if reg is None else registers.encode(reg, self._state())

    def _write_register(self, text: bytes) -> bytes:
        number, _, value = text.partition(b"=")
        reg = self._register_number(number)
        if reg is None or not reg.writable or len(value) != reg.bits // 4:
            return b"E01"
        v = self._vcpus[self._thread]
        field = "rflags" if reg.name == "eflags" else reg.name
        v.set_regs(replace(v.get_regs(), **{field: registers.decode(value)}))
        return b"OK"

    def _write_registers(self, text: bytes) -> bytes:
        """``G``: the whole file; the writable registers take their new values (where gdb sent
        'x's, or for the others, nothing changes)."""
        if len(text) != sum(r.bits // 4 for r in registers.REGISTERS):
            return b"E01"
        v = self._vcpus[self._thread]
        changes: dict[str, int] = {}
        at = 0
        for reg in registers.REGISTERS:
            field = text[at:at + reg.bits // 4]
            at += reg.bits // 4
            if reg.writable and b"x" not in field:
                changes["rflags" if reg.name == "eflags" else reg.name] = \
                    registers.decode(field)
        v.set_regs(replace(v.get_regs(), **changes))
        return b"OK"

    def _span(self, text: bytes) -> tuple[int, int] | None:
        try:
            address, length = (int(x, 16) for x in text.split(b","))
        except ValueError:
            return None
        return (address, length) if length <= rsp.MAX_PACKET // 2 else None

    def _physical(self, address: int) -> int | None:
        """The guest-physical address of guest-virtual ``address`` for the selected vCPU: its
        own page tables (4-level in long mode), or itself with paging off."""
        s = self._vcpus[self._thread].get_sregs()
        if s.cr0 & regs.X86_CR0_PG:
            if not s.efer & regs.EFER_LMA or s.cr4 & regs.X86_CR4_LA57:
                return None  # 32-bit and 5-level paging: not walked yet
            if not -(1 << 47) <= _signed64(address) < (1 << 47):
                return None  # not canonical (SDM vol. 1 3.3.7.1): no translation
        return paging.guest_physical(s, address, self._memory) if self._memory else None

    def _pieces(self, address: int, length: int) -> list[tuple[int, int]] | None:
        """(physical address, length) of each page-sized piece of a virtual range."""
        out: list[tuple[int, int]] = []
        while length:
            step = min(length, paging.PAGE_SIZE - address % paging.PAGE_SIZE)
            physical = self._physical(address)
            if physical is None or self._memory is None or \
                    not self._memory.contains(physical, step):
                return None
            out.append((physical, step))
            address, length = address + step, length - step
        return out

    def _read_memory(self, text: bytes) -> bytes:
        span = self._span(text)
        pieces = self._pieces(*span) if span is not None else None
        if pieces is None or self._memory is None:
            return b"E14"  # EFAULT: unmapped, outside RAM, or too long
        return b"".join(self._memory.read(a, n) for a, n in pieces).hex().encode()

    def _write_memory(self, text: bytes) -> bytes:
        head, _, data = text.partition(b":")
        span = self._span(head)
        try:
            payload = bytes.fromhex(data.decode())
        except ValueError:
            return b"E01"
        pieces = self._pieces(*span) if span is not None else None
        if pieces is None or self._memory is None or len(payload) != span[1]:  # type: ignore[index]
            return b"E14"
        at = 0
        for address, n in pieces:
            self._memory.write(address, payload[at:at + n])
            at += n
        return b"OK"


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value
