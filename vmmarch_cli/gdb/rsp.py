"""The gdb remote serial protocol's framing (gdb manual, appendix E "Remote Serial Protocol",
E.1 "Overview"): packets are ``$payload#cc`` with cc the two-hex-digit sum of the payload bytes
mod 256, acknowledged with ``+`` (or ``-``: send it again) until the client turns acks off
(``QStartNoAckMode``); ``}`` escapes a byte as itself XOR 0x20; a lone 0x03 is an interrupt
(Ctrl-C). Nothing here knows what a packet means (stub.py does).
"""

from __future__ import annotations

import socket

ESCAPE = 0x7D  # '}'
ESCAPED = frozenset(b"#$}*")
INTERRUPT = 0x03
#: The largest packet the stub takes (it says so in qSupported's PacketSize).
MAX_PACKET = 0x4000


class ProtocolError(Exception):
    """The client broke the framing (an oversized packet); the connection is dropped."""


class Disconnected(Exception):
    """The client closed the connection."""


def checksum(payload: bytes) -> bytes:
    return b"%02x" % (sum(payload) & 0xFF)


def escape(payload: bytes) -> bytes:
    out = bytearray()
    for b in payload:
        if b in ESCAPED:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        out.append(next(it, 0) ^ 0x20 if b == ESCAPE else b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    body = escape(payload)
    return b"$" + body + b"#" + checksum(body)


class Connection:
    """One client on a connected socket: ``receive`` gives whole, checked packets (or
    INTERRUPT as ``b"\\x03"``), ``send`` frames one."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # An ack and a reply are two small writes: with Nagle's algorithm the second
            # waits for the client's delayed ACK of the first, ~40 ms on Linux (measured:
            # every --gdb boot started 40 ms late). QEMU's gdbstub turns it off too.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        self.acks = True  # until QStartNoAckMode

    def _byte(self) -> int:
        if not self._buffer:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise Disconnected
            self._buffer += chunk
        b = self._buffer[0]
        del self._buffer[0]
        return b

    def receive(self) -> bytes:
        while True:
            b = self._byte()
            if b == INTERRUPT:
                return bytes((INTERRUPT,))
            if b != ord("$"):
                continue  # acks from the client, noise between packets
            body = bytearray()
            while (b := self._byte()) != ord("#"):
                body.append(b)
                if len(body) > 2 * MAX_PACKET:
                    raise ProtocolError(f"a packet longer than {2 * MAX_PACKET} bytes")
            sent = bytes((self._byte(), self._byte())).lower()
            if sent != checksum(bytes(body)):
                if self.acks:
                    self._sock.sendall(b"-")
                continue  # the client sends it again
            if self.acks:
                self._sock.sendall(b"+")
            return unescape(bytes(body))

    def fileno(self) -> int:
        return self._sock.fileno()

    def poll_interrupt(self) -> bool:
        """Read what the client sent while the guest runs, without blocking: True when it
        holds an interrupt (0x03; anything else but acks is kept for ``receive``).
        Disconnected when the client has left."""
        self._sock.setblocking(False)
        try:
            chunk = self._sock.recv(4096)
        except BlockingIOError:
            chunk = None
        finally:
            self._sock.setblocking(True)
        if chunk == b"":
            raise Disconnected
        if chunk:
            self._buffer += chunk
        while bytes(self._buffer[:1]) in (b"+", b"-"):
            del self._buffer[0]
        if bytes(self._buffer[:1]) == bytes((INTERRUPT,)):
            del self._buffer[0]
            return True
        return bool(self._buffer)  # a packet while running: stop, and answer it stopped

    def send(self, payload: bytes) -> None:
        self._sock.sendall(frame(payload))
        if self.acks:
            while (b := self._byte()) != ord("+"):
                if b == ord("-"):
                    self._sock.sendall(frame(payload))

    def close(self) -> None:
        self._sock.close()
