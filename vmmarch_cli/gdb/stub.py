"""A gdb stub for one boot: gdb attaches before the guest's first instruction, reads and writes
registers and guest-virtual memory of every vCPU (vCPUs are gdb threads), sets breakpoints,
steps, continues, interrupts (Ctrl-C), detaches or kills (gdb manual, appendix E "Remote Serial
Protocol"). The guest runs only when gdb says so, all-stop (vmmarch_cli/debugging.py holds the
vCPUs; this module speaks to gdb). docs/gdb.md.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace

from vmmarch_cli.arch.x86_64 import msr, paging, regs
from vmmarch_cli.arch.x86_64.opcodes import OPCODE_INT3
from vmmarch_cli.debugging import DebugStop, Resumption, StopKind
from vmmarch_cli.errors import EX_UNAVAILABLE, BackendError, VmmArchError
from vmmarch_cli.gdb import registers, rsp
from vmmarch_cli.vcpu import GuestDebug, GuestMemory, Vcpu, WatchKind, Watchpoint

#: What ``k`` makes vmm-arch exit with: 128 + SIGKILL, as a shell reports a killed process.
EX_KILLED = 137
#: gdb's signal numbers in stop replies (gdb/signals.def): SIGTRAP for attaching, breakpoints
#: and steps, SIGINT for the client's Ctrl-C.
SIGTRAP = 5
SIGINT = 2
#: Z/z packet types (gdb manual E.4 "Packets"): 0 software, 1 hardware breakpoint; 2-4 are
#: watchpoints (write, read, access).
BREAKPOINT_TYPES = (b"0", b"1")
WATCHPOINT_TYPES = {b"2": WatchKind.WRITE, b"3": WatchKind.READ, b"4": WatchKind.ACCESS}
#: The stop reply's name for each (gdb manual E.3 "Stop Reply Packets").
WATCH_REPLY = {WatchKind.WRITE: b"watch", WatchKind.READ: b"rwatch",
               WatchKind.ACCESS: b"awatch"}
#: gdb's ``monitor`` commands (qRcmd): the selected vCPU's registers as dump-regs shows them,
#: and the boot tables (e820, MP, ACPI) decoded from guest memory.
MONITOR = ("regs", "tables")


class GdbError(VmmArchError):
    """The stub cannot listen where it was asked to (a port in use, a bad address)."""

    exit_status = EX_UNAVAILABLE


class KilledByDebugger(VmmArchError):
    """gdb sent ``k``: the boot ends without running the guest further."""

    exit_status = EX_KILLED


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
    """The ``Debugger`` of ``machine.run`` (debugging.py) for one gdb client."""

    def __init__(self, listener: socket.socket, wait: bool = True) -> None:
        self._listener = listener
        self._wait = wait  # hold the guest before its first instruction until gdb attaches
        self._conn: rsp.Connection | None = None
        self._vcpus: Sequence[Vcpu] = ()
        self._memory: GuestMemory | None = None
        self._thread = 0  # index of the vCPU g/p/m act on
        self._stop = DebugStop(0, StopKind.ATTACH)
        self._applied = GuestDebug()  # what every vCPU was last given (single_step aside)
        # int3s planted where the backend ran out of breakpoints (KVM's four):
        # virtual address -> (physical address, the byte that was there)
        self._planted: dict[int, tuple[int, int]] = {}
        self._monitor: Callable[[str, int], str | None] | None = None

    def attach(self, vcpus: Sequence[Vcpu], memory: GuestMemory,
               monitor: Callable[[str, int], str | None] | None = None) -> None:
        """The VM it debugs (before ``machine.run`` first calls ``serve``), and what answers
        gdb's ``monitor`` commands (the command and the selected vCPU -> text, or None)."""
        self._vcpus, self._memory, self._monitor = vcpus, memory, monitor

    # --- debugging.Debugger -----------------------------------------------------------

    def serve(self, stop: DebugStop) -> Resumption:
        """Tell gdb why the guest stopped (the reply to its continue or step), then answer it
        until it resumes, detaches or kills. ATTACH: a client that connects now (the first one,
        waited for unless ``wait`` is off, or a later one while the guest runs) asks itself."""
        self._stop = stop
        self._thread = stop.vcpu
        if stop.kind is StopKind.ATTACH and self._conn is None:
            if not self._wait:
                return Resumption()  # the guest runs; a client may attach later (poll)
            self._accept()
        conn = self._conn
        if conn is None:  # the client left while the guest ran: every vCPU stands now
            self._forget_breakpoints()
            return Resumption(detach=True)
        try:
            if stop.kind is not StopKind.ATTACH:
                conn.send(self._stop_reply())
            while True:
                packet = conn.receive()
                try:
                    reply, resume = self._handle(packet)
                except ValueError:  # malformed numbers or hex in a packet gdb would not send
                    reply, resume = b"E01", None
                if reply is not None:
                    conn.send(reply)
                    if packet == b"QStartNoAckMode":
                        conn.acks = False
                if resume is not None:
                    if resume.detach:
                        self._drop()
                    return resume
        except (rsp.Disconnected, rsp.ProtocolError, OSError):
            # The client went away (or broke the framing), even mid-reply: the guest runs
            # on, as after a detach.
            self._drop()
            return Resumption(detach=True)

    def sockets(self) -> list[int]:
        """The client's socket while one is connected, and the listener for the next one."""
        fds = [self._listener.fileno()]
        if self._conn is not None:
            fds.append(self._conn.fileno())
        return fds

    def poll(self) -> StopKind | None:
        """What arrived while the guest runs: a client's interrupt (INTERRUPT), a new client
        (ATTACH), the client leaving (INTERRUPT: ``serve`` then answers with a detach), or
        nothing that stops the guest (None). A second client while one is connected is turned
        away at once: the stub answers one at a time."""
        if select.select([self._listener], [], [], 0)[0]:
            sock, _ = self._listener.accept()
            if self._conn is not None:
                sock.close()
            else:
                self._conn = rsp.Connection(sock)
                return StopKind.ATTACH
        if self._conn is None:
            return None
        try:
            return StopKind.INTERRUPT if self._conn.poll_interrupt() else None
        except (rsp.Disconnected, OSError):
            self._conn.close()  # its breakpoints go in serve(), with every vCPU stopped
            self._conn = None
            return StopKind.INTERRUPT

    def _accept(self) -> None:
        sock, _ = self._listener.accept()
        self._conn = rsp.Connection(sock)

    def close(self) -> None:
        """The run is over: stop listening. The guest is gone with its memory: planted int3s
        are forgotten, not taken out."""
        self._planted.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._listener.close()

    def finish(self, status: int) -> None:
        """The guest ended: tell a gdb that continued (``W``: exited with ``status``), and
        stop listening."""
        if self._conn is not None:
            self._conn.acks = False  # the last packet: waiting for its ack could hang the exit
            with contextlib.suppress(OSError, rsp.Disconnected, rsp.ProtocolError):
                self._conn.send(b"W%02x" % (status & 0xFF))
        self.close()

    def _drop(self) -> None:
        self._forget_breakpoints()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- packets -------------------------------------------------------------------------

    def _handle(self, p: bytes) -> tuple[bytes | None, Resumption | None]:
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
        if p.startswith(b"qRcmd,"):
            return self._command(p[len(b"qRcmd,"):]), None
        if p[:1] in (b"Z", b"z"):
            return self._breakpoint(p[:1] == b"Z", p[1:]), None
        if p == b"vCont?":
            return b"vCont;c;C;s;S", None
        if p.startswith(b"vCont;"):
            return self._vcont(p[len(b"vCont;"):])
        if p[:1] in (b"s", b"S"):
            return self._step(self._thread)
        if p[:1] in (b"c", b"C"):
            return None, self._resumption()
        if p[:1] == b"D":
            return b"OK", Resumption(detach=True)
        if p == b"k" or p.startswith(b"vKill"):
            raise KilledByDebugger("killed by gdb (k)")
        return b"", None  # not supported: gdb falls back or says so

    def _command(self, text: bytes) -> bytes:
        """``monitor CMD``: the answer as console output packets (``O``), then ``OK``."""
        command = bytes.fromhex(text.decode()).decode(errors="replace").strip()
        answer = self._monitor(command, self._thread) if self._monitor is not None else None
        if answer is None:
            answer = f"unknown monitor command {command!r}; there are: {', '.join(MONITOR)}\n"
        assert self._conn is not None
        data = answer.encode()
        chunk = rsp.MAX_PACKET // 2 - 1  # two hex digits a byte, after the 'O'
        for at in range(0, len(data), chunk):
            self._conn.send(b"O" + data[at:at + chunk].hex().encode())
        return b"OK"

    def _breakpoint(self, insert: bool, text: bytes) -> bytes:
        """``Z``/``z`` types 0 and 1: the backend's own breakpoints (execution reaching the
        address). Where it has no more (KVM: four), a software breakpoint (``Z0``) becomes an
        int3 the stub writes into guest memory, and the backend reports reaching it as a debug
        stop. Types 2-4: watchpoints."""
        kind, _, rest = text.partition(b",")
        if kind in WATCHPOINT_TYPES:
            return self._watchpoint(insert, WATCHPOINT_TYPES[kind], rest)
        if kind not in BREAKPOINT_TYPES:
            return b"E01"
        address = int(rest.partition(b",")[0], 16)
        breakpoints = self._applied.breakpoints
        if not insert:
            self._unplant(address)
            self._apply(self._debug(breakpoints=breakpoints - {address}))
            return b"OK"
        if address in breakpoints or address in self._planted:
            return b"OK"
        if self._apply(self._debug(breakpoints=breakpoints | {address})):
            return b"OK"
        if kind != b"0" or not self._plant(address):
            return b"E01"  # a hardware breakpoint past the backend's, or nowhere to write
        if self._apply(self._debug()):
            return b"OK"
        self._unplant(address)
        return b"E01"

    def _watchpoint(self, insert: bool, kind: WatchKind, text: bytes) -> bytes:
        """``Z2``-``Z4``: a write, read or access watchpoint on ``ADDR,LENGTH``; E01 where the
        backend has none (KVM; the unicorn wheel)."""
        address, _, length = text.partition(b",")
        watch = Watchpoint(int(address, 16), int(length, 16), kind)
        if watch.length <= 0:
            return b"E01"
        watchpoints = self._applied.watchpoints
        wanted = watchpoints | {watch} if insert else watchpoints - {watch}
        return b"OK" if self._apply(self._debug(watchpoints=wanted)) else b"E01"

    def _debug(self, breakpoints: frozenset[int] | None = None,
               watchpoints: frozenset[Watchpoint] | None = None) -> GuestDebug:
        """What the vCPUs have now, with ``breakpoints`` or ``watchpoints`` instead, and the
        planted int3s as they are."""
        return GuestDebug(self._applied.breakpoints if breakpoints is None else breakpoints,
                          planted=frozenset(self._planted),
                          watchpoints=self._applied.watchpoints if watchpoints is None
                          else watchpoints)

    def _apply(self, debug: GuestDebug) -> bool:
        """Every vCPU is stopped: give each ``debug``; where the backend cannot (BackendError),
        give back what they had and say so."""
        try:
            for v in self._vcpus:
                v.set_guest_debug(debug)
        except BackendError:
            for v in self._vcpus:
                v.set_guest_debug(self._applied)
            return False
        self._applied = debug
        return True

    def _resumption(self, step: int | None = None) -> Resumption:
        return Resumption(self._applied, step)

    def _plant(self, address: int) -> bool:
        pieces = self._pieces(address, 1)
        if pieces is None or self._memory is None:
            return False
        physical = pieces[0][0]
        self._planted[address] = (physical, self._memory.read(physical, 1)[0])
        self._memory.write(physical, bytes((OPCODE_INT3,)))
        return True

    def _unplant(self, address: int) -> None:
        physical, original = self._planted.pop(address, (None, 0))
        if physical is not None and self._memory is not None:
            self._memory.write(physical, bytes((original,)))

    def _forget_breakpoints(self) -> None:
        """The client is gone: the guest runs on as it was, without our int3s."""
        for address in list(self._planted):
            self._unplant(address)
        self._applied = GuestDebug()

    def _step(self, index: int) -> tuple[bytes | None, Resumption | None]:
        """One instruction on vCPU ``index``; the others wait (a step never runs them)."""
        vcpu = self._vcpus[index]
        try:
            vcpu.set_guest_debug(replace(self._applied, single_step=True))
        except BackendError:
            return b"E01", None
        return None, self._resumption(step=index)

    def _vcont(self, actions: bytes) -> tuple[bytes | None, Resumption | None]:
        """``vCont;ACTION[:THREAD];...``: a step for some thread wins (gdb steps one and lets
        the others continue; here they wait for it); otherwise everything continues."""
        for action in actions.split(b";"):
            verb, _, thread = action.partition(b":")
            if verb[:1] in (b"s", b"S"):
                index = self._vcpu_of(thread) if thread else self._thread
                return (b"E01", None) if index is None else self._step(index)
            if verb[:1] not in (b"c", b"C"):
                return b"E01", None
        return None, self._resumption()

    def _stop_reply(self) -> bytes:
        signal = SIGINT if self._stop.kind is StopKind.INTERRUPT else SIGTRAP
        watch = self._stop.watch
        why = b"" if watch is None else b"%s:%x;" % (WATCH_REPLY[watch.kind], watch.address)
        return b"T%02x%sthread:%x;" % (signal, why, self._stop.vcpu + 1)

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
