"""``gdb``: the gdb stub's costs (issue 19's targets), against QEMU's gdbstub in the same run.

* ``stepi``: one client (a raw remote-protocol client, the same for both sides: no gdb in the
  timing) attaches before the first guest instruction and sends ``s`` 200 times; each step's
  round trip is the time from the packet to its stop reply. vmm-arch steps the pvhcheck guest
  on the emulate backend and on KVM; QEMU (``-s -S``, TCG, microvm) steps the same ELF from its
  own first instruction (its firmware's).
* ``attached``: Debian's kernel to the init marker on the emulate backend, with a client
  attached that continues at once (no breakpoints), against the same boot without ``--gdb``.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench import harness, inputs, peers
from bench.cases import Context, Settings
from bench.cases.milestones import EMULATE_TIMEOUT, MILESTONES
from bench.stats import CaseResult, Sample, Table, paired_row

NAME = "gdb"
DEFAULTS = Settings(runs=5, warmup=0)
QUICK = Settings(runs=1, warmup=0, quick=True)
STEPS = 200
CONNECT_SECONDS = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Client:
    """A minimal remote-protocol client: acks off, one packet at a time."""

    def __init__(self, port: int) -> None:
        deadline = time.monotonic() + CONNECT_SECONDS
        while True:
            try:
                self._sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        # As gdb does (its TCP transport sets TCP_NODELAY): an ack and the next packet are two
        # small writes, and Nagle's algorithm would hold the second ~40 ms for a delayed ACK.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self._sock.sendall(self._frame(b"QStartNoAckMode"))
        self._read()
        self._sock.sendall(b"+")

    @staticmethod
    def _frame(payload: bytes) -> bytes:
        return b"$" + payload + b"#" + b"%02x" % (sum(payload) & 0xFF)

    def _read(self) -> bytes:
        while True:
            start = self._buffer.find(b"$")
            end = self._buffer.find(b"#", start)
            if start >= 0 and end >= 0 and len(self._buffer) >= end + 3:
                payload, self._buffer = self._buffer[start + 1:end], self._buffer[end + 3:]
                return payload
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the stub closed the connection")
            self._buffer += chunk

    def ask(self, payload: bytes) -> bytes:
        self._sock.sendall(self._frame(payload))
        return self._read()

    def send(self, payload: bytes) -> None:
        self._sock.sendall(self._frame(payload))

    def close(self) -> None:
        self._sock.close()


def _steps(argv: list[str], port: int, detach: bytes) -> float:
    """The median round trip of STEPS single steps, in seconds."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=inputs.vmm_arch_env(), start_new_session=True)
    try:
        client = _Client(port)
        times = []
        for _ in range(STEPS):
            began = time.perf_counter()
            reply = client.ask(b"s")
            times.append(time.perf_counter() - began)
            if not reply.startswith(b"T05"):
                raise RuntimeError(f"a step answered {reply!r}")
        client.send(detach)
        client.close()
        return statistics.median(times)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _vmm_arch_steps(guest: Path, backend: str) -> float:
    port = _free_port()
    argv = inputs.vmm_arch_argv("boot", str(guest), "--backend", backend, "--timeout", "120",
                                "--gdb", f"127.0.0.1:{port}", "-q")
    return _steps(argv, port, b"D")


def _qemu_steps(qemu: str, guest: Path) -> float:
    port = _free_port()
    argv = peers.direct_boot(qemu, machine=peers.MICROVM, kernel=guest, initrd=None,
                             append="", accel="tcg", cpu="max")
    argv += ["-gdb", f"tcp:127.0.0.1:{port}", "-S"]
    return _steps(argv, port, b"k")  # QEMU stops the guest on detach: kill it


def _boot(kernel: Path, initrd: Path, gdb: bool) -> Sample:
    port = _free_port()
    extra = ["--gdb", f"127.0.0.1:{port}"] if gdb else []
    argv = inputs.vmm_arch_argv("boot", str(kernel), "--initrd", str(initrd), "--backend",
                                "emulate", "--timeout", str(int(EMULATE_TIMEOUT - 30)), *extra)
    attach = None
    if gdb:
        def go() -> None:
            client = _Client(port)
            client.send(b"c")  # no breakpoints: the guest runs, gdb stays attached
            time.sleep(EMULATE_TIMEOUT)  # keep the connection open until the run ends
        attach = threading.Thread(target=go, daemon=True)
        attach.start()
    run = harness.measure(argv, MILESTONES, timeout=EMULATE_TIMEOUT, env=inputs.vmm_arch_env())
    if "marker" not in run.milestones:
        raise RuntimeError(f"the boot (gdb={gdb}) missed the marker: {run.describe_tail()}")
    return {"marker": run.milestones["marker"]}


def run(ctx: Context) -> CaseResult:
    s = ctx.settings
    guest = inputs.guest("pvhcheck")
    qemu = ctx.inputs.qemu()
    stock = ctx.inputs.stock()
    emulate: list[Sample] = []
    kvm: list[Sample] = []
    peer: list[Sample | None] = []
    with_gdb: list[Sample] = []
    without: list[Sample | None] = []
    total = s.warmup + s.runs
    for i in range(total):
        ctx.say(f"gdb: round {i + 1}/{total}")
        e = {"stepi_s": _vmm_arch_steps(guest, "emulate")}
        k = {"stepi_s": _vmm_arch_steps(guest, "kvm")}
        q = {"stepi_s": _qemu_steps(qemu.path, guest)} if qemu is not None else None
        a = _boot(stock.vmlinux, stock.initrd, gdb=True)
        b = _boot(stock.vmlinux, stock.initrd, gdb=False)
        if i >= s.warmup:
            emulate.append(e)
            kvm.append(k)
            peer.append(q)
            with_gdb.append(a)
            without.append(b)
    steps = Table(f"stepi round trip (median of {STEPS} steps a run)", "vmm-arch",
                  "QEMU TCG gdbstub")
    steps.rows.append(paired_row("stepi_s", "s", emulate, peer, target="<= 0.001 s",
                                 note="vmm-arch --backend emulate"))
    steps.rows.append(paired_row("stepi_s", "s", kvm, peer, target="<= 0.001 s",
                                 note="vmm-arch --backend kvm"))
    steps.notes.append("the same raw client for both: packet 's' to its stop reply")
    if qemu is None:
        steps.notes.append(f"no peer: {ctx.inputs.qemu_error}")
    attached = Table("Debian's kernel to the init marker, emulate", "with gdb attached",
                     "without gdb")
    attached.rows.append(paired_row("marker", "s", with_gdb, without, target="<= 1.05x",
                                    note="attached, continued at once, no breakpoints"))
    return CaseResult(NAME, [steps, attached])
