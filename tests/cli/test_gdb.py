"""The gdb stub (``boot --gdb``) with Debian's gdb as the client, on both backends: gdb attaches
before the guest's first instruction, reads registers (system ones too) and memory through the
guest's page tables, writes a register and memory, lists the vCPUs as threads, stops at
breakpoints (``hbreak``, ``break``), steps (``stepi``, over port I/O too), then continues,
detaches or kills. Raw-socket cases for what gdb itself never sends (bad checksums, oversized
packets, a second client) and for Ctrl-C."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given
from hypothesis import strategies as st

from vmmarch_cli import loader
from vmmarch_cli.gdb import rsp

from conftest import ROOT, finish, kvm_unusable_reason

GDB = shutil.which("gdb")
pytestmark = pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt install gdb)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Booted:
    """``vmm-arch boot GUEST --gdb 127.0.0.1:PORT`` running, waiting for a client."""

    def __init__(self, guest: Path, backend: str, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.guest = guest
        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vmmarch_cli", "boot", str(guest), "--backend", backend,
             "--timeout", "60", "--gdb", f"127.0.0.1:{self.port}", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=None if env is None else {**os.environ, **env})
        assert self.process.stderr is not None
        line = self.process.stderr.readline()  # the stub listens before it says so
        assert f"waiting for gdb on 127.0.0.1:{self.port}" in line, line

    def gdb(self, *commands: str, symbols: bool = False) -> str:
        """gdb's output for ``commands``, with the guest's own symbols if ``symbols``."""
        argv = [str(GDB), "-nx", "-batch", "-ex", "set pagination off"]
        if symbols:
            argv += ["-ex", f"file {self.guest}"]
        argv += ["-ex", f"target remote 127.0.0.1:{self.port}"]
        for c in commands:
            argv += ["-ex", c]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return p.stdout + p.stderr

    def finish(self) -> tuple[int, str, str]:
        out, err = finish(self.process, 120)
        return self.process.returncode, out, err


@pytest.fixture(params=["emulate", "kvm"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "kvm":
        reason = kvm_unusable_reason()
        if reason is not None:
            pytest.skip(reason)
    return name


@pytest.fixture
def booted(guests: dict[str, Path], backend: str) -> Iterator[Booted]:
    b = Booted(guests["bootcheck"], backend)
    yield b
    if b.process.poll() is None:
        b.process.kill()
        b.process.wait()


def _entry_bytes(elf: Path, count: int) -> bytes:
    with elf.open("rb") as f:
        e = ELFFile(f)
        entry = e.header["e_entry"]
        for seg in e.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= entry < seg["p_vaddr"] + \
                    seg["p_filesz"]:
                at = entry - seg["p_vaddr"]
                return bytes(seg.data()[at:at + count])
    raise AssertionError("no segment holds the entry")


def test_gdb_reads_the_entry_state_writes_and_detaches(booted: Booted,
                                                       guests: dict[str, Path]) -> None:
    out = booted.gdb("info registers rip rsp cs cr0 cr3 efer fs_base k_gs_base mxcsr",
                     "x/4xb $pc", "set $rbx = 0x5afe", "p/x $rbx",
                     "set {unsigned char}($rsp - 8) = 0x7e", "x/1xb $rsp - 8",
                     "x/4xb 0xdead000000", "info threads", "detach")
    assert "rip            0x1000000" in out
    assert "cr0            0x80000011" in out  # PG, ET, PE: the 64-bit boot protocol's state
    assert "efer           0x500" in out  # LME | LMA
    want = " ".join(f"0x{b:02x}" for b in _entry_bytes(guests["bootcheck"], 4))
    assert f"0x1000000:\t{want.replace(' ', chr(9))}" in out
    assert "$1 = 0x5afe" in out
    assert ":\t0x7e" in out  # the byte written through the guest's page tables reads back
    assert "Cannot access memory at address 0xdead000000" in out
    assert "* 1    Thread 1" in out and "detached" in out
    status, stdout, _ = booted.finish()
    assert status == 0 and "BOOTCHECK" in stdout  # the guest ran on after detach


def test_continue_reports_the_guest_status(booted: Booted) -> None:
    out = booted.gdb("continue")
    assert "exited normally" in out  # W00: the guest wrote 0 to the exit port
    status, _, _ = booted.finish()
    assert status == 0


def test_kill_ends_vmm_arch_with_137(booted: Booted) -> None:
    booted.gdb("kill")
    status, _, err = booted.finish()
    assert status == 137 and "killed by gdb" in err and "Traceback" not in err


def test_vcpus_are_threads(guests: dict[str, Path], backend: str) -> None:
    b = Booted(guests["bootcheck"], backend, "--cpus", "2")
    try:
        out = b.gdb("info threads", "thread 2", "set $rbx = 0x2222", "thread 1", "p/x $rbx",
                    "thread 2", "p/x $rbx", "detach")
    finally:
        status, _, _ = b.finish()
    assert "* 1    Thread 1" in out and "  2    Thread 2" in out
    assert "$1 = 0x0" in out and "$2 = 0x2222" in out  # each thread is its own vCPU
    assert status == 0


def test_a_taken_port_is_one_line_and_69(guests: dict[str, Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "vmmarch_cli", "boot",
                            str(guests["bootcheck"]), "--backend", "emulate",
                            "--gdb", f"127.0.0.1:{port}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 69
    assert p.stderr.strip().splitlines() == [
        f"vmm-arch: error: --gdb 127.0.0.1:{port}: cannot listen there: Address already in use"]


def _packet(payload: bytes) -> bytes:
    return b"$" + payload + b"#" + b"%02x" % (sum(payload) & 0xFF)


def _ask(c: socket.socket, payload: bytes) -> bytes:
    """Send a packet on a raw connection (acks on), ack the reply, return its payload."""
    c.sendall(_packet(payload))
    data = b""
    while b"#" not in data or len(data) < data.index(b"#") + 3:
        data += c.recv(65536)
    assert data[:2] == b"+$", data
    c.sendall(b"+")
    return data[2:data.index(b"#")]


def test_bad_checksums_are_refused_and_an_oversized_packet_drops_the_client(
        guests: dict[str, Path]) -> None:
    b = Booted(guests["bootcheck"], "emulate")
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as c:
        c.sendall(b"$g#00")
        assert c.recv(1) == b"-"  # a bad checksum: the client must send it again
        c.sendall(_packet(b"?"))
        assert c.recv(1) == b"+"
        reply = c.recv(4096)
        assert reply.startswith(b"$T05thread:1;#")
        c.sendall(b"+")
        c.sendall(b"$" + b"m" * 0x10000)  # no end in sight: the stub lets the client go
        with contextlib.suppress(OSError):  # it closes with our bytes unread: a reset
            assert c.recv(4096) == b""
    status, stdout, _ = b.finish()
    assert status == 0 and "BOOTCHECK" in stdout  # and the guest runs on, as after detach


def test_one_client_at_a_time_and_a_later_one_takes_over(guests: dict[str, Path]) -> None:
    """While one client holds the stopped guest a second one gets no answer; once the first
    detaches and the guest runs, the second attaches: every vCPU stops again for it."""
    b = Booted(guests["spin"], "emulate")
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as first:
        assert _ask(first, b"?").startswith(b"T05")
        second = socket.create_connection(("127.0.0.1", b.port), timeout=30)
        second.sendall(_packet(b"?"))
        second.settimeout(1)
        with pytest.raises(TimeoutError):
            second.recv(1)  # queued: the stub answers one client at a time
        first.sendall(_packet(b"D"))
        assert first.recv(1) == b"+"
    second.settimeout(30)
    with second:
        assert second.recv(1) == b"+"  # taken once the first left and the guest ran
        reply = b""
        while b"#" not in reply:
            reply += second.recv(4096)
        assert reply.startswith(b"$T05thread:1;"), reply
        second.sendall(b"+")
        assert len(_ask(second, b"p10")) == 16  # the spinning guest's RIP
        second.sendall(_packet(b"c"))  # the guest runs: a third client is turned away now
        assert second.recv(1) == b"+"
        with socket.create_connection(("127.0.0.1", b.port), timeout=30) as third:
            assert third.recv(1) == b""  # closed by the stub
        second.sendall(b"\x03")
        stop = b""
        while b"#" not in stop:
            stop += second.recv(4096)
        assert b"T02" in stop
        second.sendall(b"+" + _packet(b"k"))
    status, _, err = b.finish()
    assert status == 137 and "Traceback" not in err


def test_gdb_no_wait_lets_the_guest_run_until_gdb_comes(guests: dict[str, Path]) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vmmarch_cli", "boot", str(guests["spin"]),
                             "--backend", "emulate", "--timeout", "60", "--gdb",
                             f"127.0.0.1:{port}", "--gdb-no-wait"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    assert f"gdb may attach on 127.0.0.1:{port}" in proc.stderr.readline()
    assert proc.stdout.readline().strip() == "SPIN"  # running before any client came
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        assert _ask(c, b"?").startswith(b"T05thread:1;")
        c.sendall(_packet(b"k"))
    finish(proc, 60)
    assert proc.returncode == 137


@given(st.binary(max_size=300))
def test_framing_round_trips(payload: bytes) -> None:
    framed = rsp.frame(payload)
    body, sent = framed[1:-3], framed[-2:]
    assert framed[:1] == b"$" and framed[-3:-2] == b"#"
    assert rsp.checksum(body) == sent and rsp.unescape(body) == payload
    assert not set(body) & {ord("#"), ord("$")}


def test_run_holds_debian_s_kernel_at_its_entry_for_gdb(stock: dict[str, Path]) -> None:
    """``run --gdb``: gdb finds the stock kernel at its PVH entry (paging off), continues, and
    hears the command's exit status."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmarch_cli", "run", str(stock["vmlinux"]), "--gdb",
         f"127.0.0.1:{port}", "--timeout", "600", "--", "sh", "-c", "echo hi; exit 7"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and "waiting for gdb" in proc.stderr.readline()
    entry = loader.parse_kernel(stock["vmlinux"]).image.pvh_entry
    assert entry is not None
    p = subprocess.run([str(GDB), "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{port}",
                        "-ex", "info registers rip cr0", "-ex", "continue"],
                       capture_output=True, text=True, timeout=600)
    out, _ = finish(proc, 600)
    assert f"rip            {entry:#x}" in p.stdout
    assert "cr0            0x11" in p.stdout  # PVH: protected mode, paging off
    assert "exited with code 07" in p.stdout
    assert proc.returncode == 7 and "hi" in out


@pytest.mark.parametrize("address", ["foo", "99999", "unix:"])
def test_a_malformed_address_is_a_usage_error(guests: dict[str, Path], address: str) -> None:
    p = subprocess.run([sys.executable, "-m", "vmmarch_cli", "boot", str(guests["bootcheck"]),
                        "--gdb", address], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 64 and "Invalid value for '--gdb'" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_unix_socket_works_too(guests: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "gdb.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vmmarch_cli", "boot",
                             str(guests["bootcheck"]), "--backend", "emulate",
                             "--gdb", f"unix:{path}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and str(path) in proc.stderr.readline()
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(path))
        c.sendall(_packet(b"qC"))
        assert c.recv(1) == b"+" and c.recv(64).startswith(b"$QC1#")
        c.sendall(b"+" + _packet(b"D"))
        assert c.recv(1) == b"+"  # and it leaves without acking the reply: as a detach
    out, _ = finish(proc, 60)
    assert proc.returncode == 0 and "BOOTCHECK" in out


def test_g_and_capital_g_round_trip_the_register_file(guests: dict[str, Path]) -> None:
    """``g`` reads every register (the x87 instruction and operand pointers as unavailable
    'x's); ``G`` with the same file and a new rbx changes rbx alone."""
    b = Booted(guests["bootcheck"], "emulate")
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as c:
        regs = _ask(c, b"g")
        assert b"x" * 40 in regs and b"x" * 41 not in regs  # fiseg..fop: 5 x 32 bits
        rbx = 16  # after rax (64 bits = 16 hex digits)
        changed = regs[:rbx] + (0x1234).to_bytes(8, "little").hex().encode() + regs[rbx + 16:]
        assert _ask(c, b"G" + changed) == b"OK"
        assert _ask(c, b"p1") == (0x1234).to_bytes(8, "little").hex().encode()
        assert _ask(c, b"g")[:rbx] == regs[:rbx]  # rax untouched
        assert _ask(c, b"G00") == b"E01"  # the wrong length
        c.sendall(_packet(b"D"))
    status, _, _ = b.finish()
    assert status == 0


def test_what_the_stub_cannot_do_is_an_error_not_silence(guests: dict[str, Path]) -> None:
    """An unknown breakpoint type or an empty watched range is an error (never an empty reply,
    which would make gdb write int3s or single-step the guest itself); garbage in a packet is
    E01, not a crash; a non-canonical address has no translation."""
    b = Booted(guests["bootcheck"], "emulate")
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as c:
        assert _ask(c, b"Z2,1001000,0") == b"E01" and _ask(c, b"Z9,1000000,1") == b"E01"
        assert _ask(c, b"P0=zzzzzzzzzzzzzzzz") == b"E01"
        assert _ask(c, b"m8000000000000000,4") == b"E14"
        assert _ask(c, b"m1000000,100000") == b"E14"  # more than a packet holds
        assert _ask(c, b"Mdead000000,2:9090") == b"E14"  # unmapped: nothing written
        assert _ask(c, b"M1000000,2:90") == b"E14"  # fewer bytes than it says
        assert _ask(c, b"qC") == b"QC1"  # still answering
        c.sendall(_packet(b"D"))
    status, _, _ = b.finish()
    assert status == 0


def _symbol(elf: Path, name: str) -> int:
    with elf.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        found = symtab.get_symbol_by_name(name)  # type: ignore[union-attr]
        assert found, name
        return int(found[0]["st_value"])


def test_breakpoints_stop_where_gdb_says_and_stepi_takes_one_instruction(
        booted: Booted, guests: dict[str, Path]) -> None:
    """``hbreak`` and ``break`` (both the backend's breakpoints, never int3s in memory), then
    ``stepi``: RIP moves by the length of the instruction gdb disassembled there."""
    out = booted.gdb("hbreak main", "break report", "continue", "p/x $pc", "x/2i $pc",
                     "stepi", "p/x $pc", "continue", "bt", "delete", "continue", symbols=True)
    main, report = _symbol(booted.guest, "main"), _symbol(booted.guest, "report")
    assert f"Breakpoint 1, {main:#018x} in main ()" in out
    assert f"$1 = {main:#x}" in out
    after = re.findall(r"^   (0x[0-9a-f]+) <main\+\d+>:", out, re.M)  # x/2i: the next insn
    assert after and f"$2 = {after[0]}" in out
    assert f"Breakpoint 2, {report:#018x} in report ()" in out
    assert re.search(r"#1  0x[0-9a-f]+ in main \(\)", out)  # bt through the guest's stack
    assert "exited normally" in out
    status, stdout, _ = booted.finish()
    assert status == 0 and "BOOTCHECK DONE 0" in stdout


def test_stepi_over_port_io_stops_after_each_instruction(booted: Booted) -> None:
    """putc polls the UART's LSR with ``in``, branches out of its wait loop at once (THRE: the
    UART is ready) and writes with ``out``: on KVM a step over port I/O ends in an I/O exit,
    and the stub must still stop right after the instruction, every time."""
    putc = _symbol(booted.guest, "putc")
    steps = 9
    out = booted.gdb("break putc", "continue", "x/12i $pc",
                     *(c for _ in range(steps) for c in ("stepi", "p/x $pc")), "kill",
                     symbols=True)
    listing = re.findall(r"^(?:=> )?\s*(0x[0-9a-f]+) <putc\+?\d*>:\s*(.*)$", out, re.M)
    addresses = [int(a, 16) for a, _ in listing]
    assert addresses and addresses[0] == putc, out
    assert any(text.startswith("in ") for _, text in listing)
    assert any(text.startswith("out ") for _, text in listing)
    branch = next(i for i, (_, text) in enumerate(listing) if text.startswith("jne"))
    target = int(re.findall(r"0x[0-9a-f]+", listing[branch][1])[0], 16)
    path = addresses[1:branch + 1] + addresses[addresses.index(target):]
    seen = [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", out, re.M)]
    assert seen == path[:steps], (seen, path)
    booted.finish()


def test_ctrl_c_stops_every_vcpu_with_sigint(guests: dict[str, Path], backend: str) -> None:
    """The spin guest never ends: after ``c``, 0x03 stops it (``T02``, gdb's SIGINT) with every
    vCPU stopped: its registers read, and a second continue and Ctrl-C work the same."""
    b = Booted(guests["spin"], backend, "--cpus", "2")
    with socket.create_connection(("127.0.0.1", b.port), timeout=60) as c:
        for _ in range(2):
            c.sendall(_packet(b"vCont;c"))
            assert c.recv(1) == b"+"
            time.sleep(0.5)
            c.sendall(b"\x03")
            reply = b""
            while b"#" not in reply:
                reply += c.recv(4096)
            assert reply.startswith(b"$T02thread:1;"), reply
            c.sendall(b"+")
            assert _ask(c, b"Hg2") == b"OK" and len(_ask(c, b"p10")) == 16  # vCPU 2's RIP
            assert _ask(c, b"Hg1") == b"OK"
        c.sendall(_packet(b"k"))
    status, _, err = b.finish()
    assert status == 137 and "Traceback" not in err


def test_breakpoint_limits_per_backend(guests: dict[str, Path], backend: str) -> None:
    """The emulate backend takes any number of breakpoints; KVM four hardware ones (DR0-DR3):
    a fifth ``Z1`` is E01 (gdb: it could not insert it), while a fifth ``Z0`` becomes an int3
    the stub writes into guest memory and takes out again with ``z0``."""
    b = Booted(guests["bootcheck"], backend)
    addresses = [0x1000100 + i for i in range(6)]
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as c:
        original = _ask(c, b"m1000104,2")
        replies = [_ask(c, b"Z1,%x,1" % a) for a in addresses]
        assert replies == ([b"OK"] * 6 if backend == "emulate" else [b"OK"] * 4 + [b"E01"] * 2)
        assert all(_ask(c, b"z1,%x,1" % a) == b"OK" for a in addresses)
        assert all(_ask(c, b"Z0,%x,1" % a) == b"OK" for a in addresses)
        planted = b"cccc" if backend == "kvm" else original  # the fifth and sixth: int3s
        assert _ask(c, b"m1000104,2") == planted
        assert all(_ask(c, b"z0,%x,1" % a) == b"OK" for a in addresses)
        assert _ask(c, b"m1000104,2") == original
        c.sendall(_packet(b"D"))
    status, _, _ = b.finish()
    assert status == 0


def test_the_guest_ends_with_breakpoints_still_set(guests: dict[str, Path],
                                                   backend: str) -> None:
    """Six breakpoints gdb never hits (KVM's last two are int3s in guest memory), then the
    guest ends: gdb hears the guest's status, and vmm-arch exits with it (it once tried to
    take the int3s out of guest memory already gone: exit 65)."""
    b = Booted(guests["bootcheck"], backend)
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as c:
        assert all(_ask(c, b"Z0,%x,1" % (0x1001800 + i)) == b"OK" for i in range(6))
        c.sendall(_packet(b"c"))
        reply = b""
        while b"#" not in reply:
            reply += c.recv(4096)
        assert reply.endswith(b"$W00#b7"), reply
    status, stdout, err = b.finish()
    assert status == 0 and "BOOTCHECK DONE 0" in stdout and "error" not in err


def test_six_breakpoints_stop_the_same_on_both_backends(booted: Booted) -> None:
    """``break`` on six functions: KVM's two past its debug registers are int3s in guest
    memory; the stops, in order, are the same on both backends, and after ``delete`` the
    code reads as it was."""
    out = booted.gdb("break main", "break puts", "break putc", "break put_dec",
                     "break put_hex64", "break report", *(["continue"] * 3), "delete 3",
                     *(["continue"] * 3), "delete", "x/1xb putc", "continue", symbols=True)
    stops = re.findall(r"^Breakpoint \d+, 0x[0-9a-f]+ in (\w+) \(\)", out, re.M)
    assert stops == ["main", "puts", "putc", "report", "puts", "puts"], out
    putc = _symbol(booted.guest, "putc")
    with booted.guest.open("rb") as f:  # the first byte of putc as the linker wrote it
        text = ELFFile(f).get_section_by_name(".text")
        first = text.data()[putc - text["sh_addr"]]  # type: ignore[index]
    assert f"<putc>:\t0x{first:02x}" in out and "exited normally" in out
    status, _, _ = booted.finish()
    assert status == 0


def test_the_unicorn_wheel_refuses_breakpoints_and_steps(guests: dict[str, Path]) -> None:
    """On the wheel (no engine patch 0011) a breakpoint or a step is an error, never a
    breakpoint that silently never fires; reading and continuing still work."""
    b = Booted(guests["bootcheck"], "emulate", env={"VMMARCH_ENGINE": "wheel",
                                                    "LIBUNICORN_PATH": ""})
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as c:
        assert _ask(c, b"Z0,1000045,1") == b"E01" and _ask(c, b"vCont;s:1") == b"E01"
        assert _ask(c, b"Z2,1001000,8") == b"E01"
        assert _ask(c, b"p10") == (0x1000000).to_bytes(8, "little").hex().encode()
        c.sendall(_packet(b"D"))
    status, stdout, _ = b.finish()
    assert status == 0 and "BOOTCHECK DONE 0" in stdout


def _kallsyms_elf(vmlinux: Path, tmp_path: Path) -> Path:
    """The kernel's symbols as an ELF gdb reads (vmlinux-to-elf, ~15 s), kept in the user
    cache by the kernel's hash: later runs take it from there."""
    from vmmarch_cli import files

    digest = hashlib.sha256(vmlinux.read_bytes()).hexdigest()[:16]
    kept = files.cache_dir() / "test-symbols" / f"{vmlinux.name}-{digest}.elf"
    if kept.is_file():
        return kept
    tool = shutil.which("vmlinux-to-elf")
    if tool is None:
        pytest.fail("vmlinux-to-elf is missing: pip install -e '.[test]' installs it")
    made = subprocess.run([tool, str(vmlinux), str(tmp_path / "syms.elf")],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    kept.parent.mkdir(parents=True, exist_ok=True)
    partial = kept.with_suffix(f".{os.getpid()}.part")
    shutil.copyfile(tmp_path / "syms.elf", partial)
    os.replace(partial, kept)  # whole or not at all, for a run beside this one
    return kept


def test_hbreak_start_kernel_on_debian_s_kernel(stock: dict[str, Path],
                                                tmp_path: Path) -> None:
    """Debian's kernel on the emulate backend: gdb, with symbols made from the kernel's own
    kallsyms (vmlinux-to-elf, from PyPI: the image ships stripped), stops at ``start_kernel``
    with ``hbreak`` and shows it in ``bt`` and ``info registers``."""
    symbols = _kallsyms_elf(stock["vmlinux"], tmp_path)
    start_kernel = _symbol(symbols, "start_kernel")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmmarch_cli", "boot", str(stock["vmlinux"]), "--backend",
         "emulate", "--initrd", str(stock["initramfs"]), "--timeout", "300", "--gdb",
         f"127.0.0.1:{port}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and "waiting for gdb" in proc.stderr.readline()
    p = subprocess.run([str(GDB), "-nx", "-batch", "-ex", "set pagination off",
                        "-ex", f"file {symbols}", "-ex", f"target remote 127.0.0.1:{port}",
                        "-ex", "hbreak start_kernel", "-ex", "continue", "-ex", "bt 1",
                        "-ex", "info registers rip", "-ex", "kill"],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    _, err = finish(proc, 120)
    assert f"Breakpoint 1, {start_kernel:#018x} in start_kernel ()" in out, out
    at = f"{start_kernel:x}"
    assert re.search(rf"#0  0x0*{at} in start_kernel \(\)", out), out
    assert re.search(rf"rip\s+0x{at}\s+0x{at} <start_kernel>", out), out
    assert proc.returncode == 137 and "Traceback" not in err


def test_monitor_regs_and_tables(booted: Booted) -> None:
    """``monitor regs`` prints vmm-arch's own register tables (dump-regs's view) of the selected
    vCPU, ``monitor tables`` the e820 map, MP and ACPI tables decoded from guest memory."""
    out = booted.gdb("monitor regs", "monitor tables", "monitor frobnicate", "detach")
    assert "cpu0 registers (read back)" in out and "rip  0x0000000001000000" in out
    assert "IA32_EFER" in out and "0x0000000000000500" in out and "cpu0 lapic" in out
    assert "e820 map" in out and "MP table" in out and "ACPI tables" in out
    assert "unknown monitor command 'frobnicate'; there are: regs, tables" in out
    status, _, _ = booted.finish()
    assert status == 0


def test_a_client_that_leaves_mid_step_lets_the_guest_run_on(guests: dict[str, Path]) -> None:
    b = Booted(guests["bootcheck"], "emulate")
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as c:
        assert _ask(c, b"Z0,1000045,1") == b"OK"
        c.sendall(_packet(b"vCont;s:1"))  # and gone before the stop reply
    status, stdout, _ = b.finish()
    assert status == 0 and "BOOTCHECK DONE 0" in stdout  # breakpoints gone with the client


def test_gdb_reads_the_x87_stack_and_the_xmm_registers(booted: Booted) -> None:
    """After the guest's own FPU use (none in bootcheck: the boot state), gdb shows the x87
    and SSE registers with values, not <unavailable>: ST0 as a number, the tag word with
    every register empty (FNINIT), XMM0 as a vector."""
    out = booted.gdb("p $st0", "p/x $ftag", "p/x $fctrl", "p $xmm0.uint128", "p/x $mxcsr",
                     "detach")
    assert "$1 = 0" in out and "$2 = 0xffff" in out and "$3 = 0x37f" in out
    assert "$4 = 0" in out and "$5 = 0x1f80" in out and "unavailable" not in out
    booted.finish()


def test_watch_stops_right_after_the_store(booted: Booted, backend: str) -> None:
    """``watch`` on a variable the guest's first instructions write: on the emulate backend
    gdb stops right after the store (RIP on the next instruction) with the old and the new
    value; KVM has no watchpoints (this one never fires them): gdb says it cannot insert it."""
    out = booted.gdb("watch *(long *)&entry_rsp", "continue", "p/x $pc", "delete", "continue",
                     symbols=True)
    if backend == "kvm":
        assert "Could not insert hardware watchpoint 1" in out or \
            "Could not insert hardware breakpoints" in out, out
        booted.process.kill()
        booted.finish()
        return
    store = _symbol(booted.guest, "_start") + 7  # mov %rsp, entry_rsp(%rip): 7 bytes
    assert "Old value = 0" in out and "New value = " in out, out
    assert re.search(rf"\$1 = {store + 7:#x}", out), out  # the instruction after the store
    assert "exited normally" in out
    status, _, _ = booted.finish()
    assert status == 0
