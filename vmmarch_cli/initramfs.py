"""Build a guest initramfs: a newc cpio archive, optionally gzip'ed, around a static busybox.

The archive format is the kernel's "newc" cpio (Documentation/driver-api/early-userspace/
buffer-format.rst): every member is a 110-byte ASCII header (the magic ``070701`` and thirteen
8-digit hex fields), the NUL-terminated name, padding to a multiple of 4, the data, and padding to
a multiple of 4 again. The archive ends with a member named ``TRAILER!!!``.

``busybox_initramfs`` lays out the smallest userspace the tests need, and ``marker_init_script``
writes the ``/init`` that prints the ``VMMARCH-FACT`` lines and reports its status through the
VMM's exit port (I/O port 0xf4).
"""

from __future__ import annotations

import gzip
import re
import shlex
import stat
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmmarch_cli.arch.x86_64 import board
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.loader import elf64

# buffer-format.rst: "c_magic 6 The string "070701" or "070702"". 070702 adds a checksum of the
# data, which the kernel only verifies; 070701 leaves c_check zero.
NEWC_MAGIC = b"070701"
# buffer-format.rst: 6 bytes of magic + 13 fields of 8 hex digits.
NEWC_HEADER_SIZE = 6 + 13 * 8
# buffer-format.rst: "The pathname is followed by NUL bytes so that the total size of the fixed
# header plus pathname is a multiple of four. Likewise, the file data is padded to a multiple of
# four bytes."
NEWC_ALIGN = 4
# buffer-format.rst: "The end of the cpio archive is indicated by a special record with the
# pathname "TRAILER!!!"".
NEWC_TRAILER = "TRAILER!!!"
# Every header field is 8 hex digits, so no value may exceed 32 bits.
NEWC_FIELD_MAX = 0xFFFF_FFFF
# init/initramfs.c refuses names longer than PATH_MAX (include/uapi/linux/limits.h: 4096).
PATH_MAX = 4096

# The file types the kernel's unpacker creates (init/initramfs.c do_name/do_copy/do_symlink).
_SUPPORTED_TYPES = {
    stat.S_IFDIR: "directory",
    stat.S_IFREG: "regular file",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "character device",
}

# Character devices from Documentation/admin-guide/devices.txt: "5 char ... 1 = /dev/console",
# "1 char Memory devices ... 3 = /dev/null ... 4 = /dev/port".
DEV_CONSOLE = (5, 1)
DEV_NULL = (1, 3)
DEV_PORT = (1, 4)

# The VMM's exit port (board.EXIT_PORT): a 1-byte OUT there means "exit with this status". A QEMU
# run with isa-debug-exit at iobase=0xf4 ends the same way (there with status (N << 1) | 1).
EXIT_PORT = board.EXIT_PORT

# gzip(1)'s default level. The kernel's usr/Makefile uses -9, but on the busybox image that saves
# only 0.4% (1,028,796 vs 1,032,692 bytes) for twice the time (0.17 vs 0.08 s).
GZIP_LEVEL = 6

# Where the helper that writes the exit port without /dev/port lives in the guest.
OUTB_HELPER = "/bin/vmm-outb"
# ioctl(2) request "send a break, or with a nonzero argument wait until output is sent"
# (include/uapi/asm-generic/ioctls.h): what tcdrain(3) uses.
TCSBRK = 0x5409


@dataclass(frozen=True)
class CpioEntry:
    """One archive member.

    ``mode`` is a full ``st_mode``: the type bits (``stat.S_IFDIR``, ``S_IFREG``, ``S_IFLNK`` or
    ``S_IFCHR``) or'ed with the permission bits. ``path`` is the absolute guest path. A symlink
    gives its ``target``; a character device its ``rdev_major``/``rdev_minor``.
    """

    path: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    target: str | None = None

    def __post_init__(self) -> None:
        check_guest_path(self.path)
        if not 0 <= self.mode <= 0o177777:
            raise BadInputError(f"cpio entry {self.path}: mode {self.mode:#o} is not a st_mode")
        kind = stat.S_IFMT(self.mode)
        if kind not in _SUPPORTED_TYPES:
            raise BadInputError(
                f"cpio entry {self.path}: file type {kind:#o} is not a directory, regular file, "
                "symlink or character device"
            )
        if kind != stat.S_IFREG and self.data:
            raise BadInputError(f"cpio entry {self.path}: only a regular file may carry data")
        if kind == stat.S_IFLNK:
            if not self.target or "\0" in self.target:
                raise BadInputError(f"cpio entry {self.path}: a symlink needs a non-empty target")
        elif self.target is not None:
            raise BadInputError(f"cpio entry {self.path}: only a symlink may have a target")
        for number in (self.rdev_major, self.rdev_minor):
            if not 0 <= number <= NEWC_FIELD_MAX:
                raise BadInputError(f"cpio entry {self.path}: device number {number} out of range")
        if len(self.payload) > NEWC_FIELD_MAX:
            raise BadInputError(f"cpio entry {self.path}: data larger than 4 GiB")

    @property
    def payload(self) -> bytes:
        """The member's data as stored: the file contents, or a symlink's target."""
        if self.target is not None:
            return self.target.encode()
        return self.data


def check_guest_path(path: str) -> None:
    """Refuse a guest path that is not absolute, escapes with '..', or holds a NUL."""
    if "\0" in path:
        raise BadInputError(f"guest path {path!r} contains a NUL byte")
    if not path.startswith("/") or path.strip("/") == "":
        raise BadInputError(f"guest path {path!r} must be absolute and name a file below /")
    if ".." in path.split("/"):
        raise BadInputError(f"guest path {path!r} must not contain '..'")
    if len(path.encode()) + 1 > PATH_MAX:
        raise BadInputError(f"guest path {path[:40]!r}... is longer than PATH_MAX ({PATH_MAX})")


def _pad(length: int) -> bytes:
    return b"\0" * (-length % NEWC_ALIGN)


def _member(name: str, ino: int, mode: int, nlink: int, entry: CpioEntry | None) -> bytes:
    payload = entry.payload if entry else b""
    encoded = name.encode() + b"\0"
    fields = (
        ino,  # c_ino
        mode,  # c_mode
        0,  # c_uid: root, so the guest sees files owned by root
        0,  # c_gid
        nlink,  # c_nlink
        0,  # c_mtime: 0 keeps the archive byte-for-byte reproducible
        len(payload),  # c_filesize
        0,  # c_maj / c_min: the device holding the file; only used to match hard links
        0,
        entry.rdev_major if entry else 0,  # c_rmaj
        entry.rdev_minor if entry else 0,  # c_rmin
        len(encoded),  # c_namesize, including the NUL
        0,  # c_check: always 0 for 070701
    )
    header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
    head = header + encoded
    return head + _pad(len(head)) + payload + _pad(len(payload))


def build_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise ``entries``, in order, into an uncompressed newc archive with its trailer.

    Names are stored without the leading '/', as the kernel's usr/gen_init_cpio.c does; the
    kernel unpacks them relative to the rootfs either way. Parents must come before children.
    """
    out: list[bytes] = []
    seen: set[str] = set()
    # Inode numbers only have to be distinct: the kernel pairs members by (ino, dev) to rebuild
    # hard links (init/initramfs.c find_link), and none of these members are hard links.
    for ino, entry in enumerate(entries, start=1):
        name = entry.path.strip("/")
        if name in seen:
            raise BadInputError(f"cpio entry /{name} appears twice")
        seen.add(name)
        # A directory has 2 links ("." and its entry), like gen_init_cpio writes.
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out.append(_member(name, ino, entry.mode, nlink, entry))
    out.append(_member(NEWC_TRAILER, 0, 0, 1, None))
    return b"".join(out)


def _outb_helper(port: int) -> bytes:
    """A tiny static x86_64 ELF (241 bytes) that waits until what its stdout and stderr hold has
    been sent (when they are ttys), reads one byte from stdin and OUTs it to ``port``.

    Debian's cloud kernel is built with ``# CONFIG_DEVPORT is not set`` (in
    config-6.1.0-56-cloud-amd64; the generic flavour has it), so /dev/port fails with ENXIO there
    and the dd route of marker_init_script cannot reach the exit port. ioperm(2) works instead
    (CONFIG_X86_IOPL_IOPERM=y). Exit status: 0 after the OUT (if the VMM did not stop the guest),
    1 if stdin gave no byte, 2 if ioperm failed. The wait is ioctl(TCSBRK, 1), what tcdrain(3)
    does (include/uapi/asm-generic/ioctls.h; drivers/tty/tty_io.c); on a fd that is not a tty it
    fails and is ignored. It lets ``vmm-arch run``'s job init end without waiting in stty.
    """
    if not 0 <= port <= 0xFFFF:
        raise BadInputError(f"I/O port {port:#x} is not a 16-bit port")
    imm_port = struct.pack("<I", port)
    # Assembled with GNU as (Intel syntax) and checked with objdump -d. Syscall numbers are from
    # arch/x86/entry/syscalls/syscall_64.tbl: read 0, ioctl 16, ioperm 173, exit 60.
    drain = b"".join(
        b"\xb8\x10\x00\x00\x00"  # mov eax, 16           ; SYS_ioctl(fd, TCSBRK, 1)
        + b"\xbf" + struct.pack("<I", fd)  # mov edi, fd
        + b"\xbe" + struct.pack("<I", TCSBRK)  # mov esi, TCSBRK
        + b"\xba\x01\x00\x00\x00"  # mov edx, 1
        + b"\x0f\x05"  # syscall
        for fd in (1, 2)
    )
    code = drain + b"".join(
        (
            b"\x6a\x00",  # push 0                 ; a zeroed byte on the stack for read()
            b"\x31\xc0",  # xor eax, eax           ; SYS_read
            b"\x31\xff",  # xor edi, edi           ; fd 0
            b"\x48\x89\xe6",  # mov rsi, rsp
            b"\xba\x01\x00\x00\x00",  # mov edx, 1
            b"\x0f\x05",  # syscall
            b"\xbf\x01\x00\x00\x00",  # mov edi, 1            ; status if read failed
            b"\x48\x83\xf8\x01",  # cmp rax, 1
            b"\x75\x2b",  # jne exit
            b"\xb8\xad\x00\x00\x00",  # mov eax, 173          ; SYS_ioperm(port, 1, 1)
            b"\xbf" + imm_port,  # mov edi, port
            b"\xbe\x01\x00\x00\x00",  # mov esi, 1
            b"\xba\x01\x00\x00\x00",  # mov edx, 1
            b"\x0f\x05",  # syscall
            b"\xbf\x02\x00\x00\x00",  # mov edi, 2            ; status if ioperm failed
            b"\x48\x85\xc0",  # test rax, rax
            b"\x75\x0b",  # jne exit
            b"\xba" + imm_port,  # mov edx, port
            b"\x8a\x04\x24",  # mov al, [rsp]
            b"\xee",  # out dx, al
            b"\x31\xff",  # xor edi, edi
            b"\xb8\x3c\x00\x00\x00",  # exit: mov eax, 60    ; SYS_exit(edi)
            b"\x0f\x05",  # syscall
        )
    )
    # The smallest ELF64 executable: the file header, one PT_LOAD mapping the whole file at
    # 0x400000 (the x86_64 psABI's conventional base), and the code right after the headers.
    base = 0x400000
    headers = elf64.Elf64Header.sizeof() + elf64.Elf64ProgramHeader.sizeof()
    total = headers + len(code)
    ehdr = elf64.Elf64Header(
        ei_magic=elf64.ELF_MAGIC, ei_class=elf64.ELFCLASS64, ei_data=elf64.ELFDATA2LSB,
        ei_version=elf64.EV_CURRENT, ei_osabi=elf64.ELFOSABI_NONE, e_type=elf64.ET_EXEC,
        e_machine=elf64.EM_X86_64, e_version=elf64.EV_CURRENT,
        e_entry=base + headers,  # the first code byte
        e_phoff=elf64.Elf64Header.sizeof(), e_ehsize=elf64.Elf64Header.sizeof(),
        e_phentsize=elf64.Elf64ProgramHeader.sizeof(), e_phnum=1)  # no section headers
    phdr = elf64.Elf64ProgramHeader(
        p_type=elf64.PT_LOAD, p_flags=elf64.PF_R | elf64.PF_X, p_offset=0, p_vaddr=base,
        p_paddr=base, p_filesz=total, p_memsz=total, p_align=0x1000)  # the x86_64 page size
    return ehdr.pack() + phdr.pack() + code


def _read_host_file(path: Path, what: str) -> tuple[bytes, int]:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise BadInputError(f"{what} {path} is not a regular file")
        return path.read_bytes(), stat.S_IMODE(info.st_mode)
    except FileNotFoundError:
        raise BadInputError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise BadInputError(f"cannot read {what} {path}: {exc.strerror}") from None


def _chrdev(path: str, perms: int, dev: tuple[int, int]) -> CpioEntry:
    return CpioEntry(path, stat.S_IFCHR | perms, rdev_major=dev[0], rdev_minor=dev[1])


def _parents(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def busybox_initramfs(
    busybox: Path,
    init_script: str,
    extra: Sequence[tuple[Path, str]] = (),
    compress: bool = True,
) -> bytes:
    """Archive a busybox userspace with ``init_script`` as /init; gzip'ed if ``compress``.

    Layout: /bin/busybox, /bin/sh -> busybox, /bin/vmm-outb (the exit-port helper),
    /dev/console, /dev/null, /dev/port, empty /proc /sys /dev /tmp, /init, plus each
    ``(host_file, guest_path)`` of ``extra`` (permissions copied, parent directories created).
    """
    if "\0" in init_script:
        raise BadInputError("the init script contains a NUL byte")
    busybox_data, _ = _read_host_file(busybox, "busybox binary")
    dir_mode = stat.S_IFDIR | 0o755
    entries = [CpioEntry(d, dir_mode) for d in ("/bin", "/dev", "/proc", "/sys", "/tmp")]
    entries += [
        CpioEntry("/bin/busybox", stat.S_IFREG | 0o755, busybox_data),
        CpioEntry("/bin/sh", stat.S_IFLNK | 0o777, target="busybox"),
        CpioEntry(OUTB_HELPER, stat.S_IFREG | 0o755, _outb_helper(EXIT_PORT)),
        _chrdev("/dev/console", 0o600, DEV_CONSOLE),
        _chrdev("/dev/null", 0o666, DEV_NULL),
        _chrdev("/dev/port", 0o600, DEV_PORT),
        CpioEntry("/init", stat.S_IFREG | 0o755, init_script.encode()),
    ]
    archive = build_cpio(_with_extra(entries, extra))
    if not compress:
        return archive
    # mtime=0 leaves the gzip header free of the build time, so equal inputs give equal bytes.
    return gzip.compress(archive, compresslevel=GZIP_LEVEL, mtime=0)


def _with_extra(entries: list[CpioEntry], extra: Sequence[tuple[Path, str]]
                ) -> list[CpioEntry]:
    """``entries`` and each ``(host_file, guest_path)`` of ``extra`` (permissions copied,
    parent directories created), refusing one that would overwrite another."""
    dir_mode = stat.S_IFDIR | 0o755
    known = {entry.path for entry in entries}
    dirs = {entry.path for entry in entries if stat.S_ISDIR(entry.mode)}
    for host, guest in extra:
        check_guest_path(guest)
        guest = "/" + guest.strip("/")
        if guest in known:
            raise BadInputError(f"extra file {host} would overwrite {guest} in the initramfs")
        data, perms = _read_host_file(Path(host), "extra file")
        for parent in _parents(guest):
            if parent in dirs:
                continue
            if parent in known:
                raise BadInputError(f"extra file {guest}: {parent} is a file, not a directory")
            known.add(parent)
            dirs.add(parent)
            entries.append(CpioEntry(parent, dir_mode))
        known.add(guest)
        entries.append(CpioEntry(guest, stat.S_IFREG | perms, data))
    return entries


def _prologue(generator: str) -> str:
    """The start of every generated /init: PATH, the exit-port helper, the mounts."""
    # Debian builds busybox with FEATURE_SH_STANDALONE, so the shell finds applets without
    # symlinks. But it starts most of them by exec'ing /proc/self/exe (CONFIG_BUSYBOX_EXEC_PATH),
    # which fails with "mount: not found" until /proc is mounted: the mounts name /bin/busybox.
    return f"""#!/bin/busybox sh
# Generated by vmm-arch (vmmarch_cli/initramfs.py:{generator}).
export PATH=/bin

# Exit the VM with status $1 (0..255): one byte to I/O port {EXIT_PORT:#x} = {EXIT_PORT}.
vmm_exit() {{
    code=$(( ${{1:-0}} & 255 ))
    esc=$(printf '%03o' "$code")
    # The console's last lines may still be in the tty, sent as the UART interrupts for
    # them: the VM ends at the port write, so wait for them first. stty sets the console's
    # own settings again with TCSADRAIN, which returns once all output was transmitted.
    /bin/busybox stty -F /dev/console "$(/bin/busybox stty -F /dev/console -g)" 2>/dev/null
    # Test -c first: without the device node, dd would create a regular file /dev/port.
    if [ -c /dev/port ]; then
        printf "\\\\$esc" | dd of=/dev/port bs=1 seek={EXIT_PORT} count=1 conv=notrunc 2>/dev/null
    fi
    # Debian's cloud kernel lacks CONFIG_DEVPORT (no /dev/port): use ioperm(2) instead.
    printf "\\\\$esc" | {OUTB_HELPER} 2>/dev/null
}}

/bin/busybox mount -t proc proc /proc 2>/dev/null
/bin/busybox mount -t sysfs sysfs /sys 2>/dev/null
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
"""


#: Where ``vmm-arch run`` sends the command's output: COM2 and COM3, so the kernel log on
#: COM1 (the console) never mixes with it.
COMMAND_STDOUT_TTY = board.SERIAL_PORTS[1].tty
COMMAND_STDERR_TTY = board.SERIAL_PORTS[2].tty


def command_init_script(command: Command) -> str:
    """The ``/init`` of ``vmm-arch run``: run ``command`` with stdout on ttyS1 and stderr on
    ttyS2, then report its exit status through the exit port."""
    line = command.shell()
    return f"""{_prologue("command_init_script")}
# Raw mode: no newline translation or echo, so the host gets the command's bytes unchanged.
for tty in {COMMAND_STDOUT_TTY} {COMMAND_STDERR_TTY}; do
    stty -F $tty raw -echo 2>/dev/null
done
cd /
{{ {line}; }} >{COMMAND_STDOUT_TTY} 2>{COMMAND_STDERR_TTY} </dev/null
vmm_exit $?
/bin/busybox reboot -f
"""


#: What a shell variable name may be (POSIX.1-2017, XBD 3.235 "Name").
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Command:
    """What ``vmm-arch run`` runs in the guest: ``argv``, in ``cwd``, with ``env`` added to
    init's environment."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/"

    def shell(self) -> str:
        """The command as one shell line; it ends with the command's status, or with cd's when
        ``cwd`` does not exist in the guest."""
        if not self.argv:
            raise BadInputError("no command to run: put it after `--`")
        for arg in self.argv:
            if "\0" in arg:
                raise BadInputError(f"command argument {arg!r} contains a NUL byte")
        steps = []
        if self.cwd != "/":
            check_guest_path(self.cwd)
            steps.append(f"cd -- {shlex.quote(self.cwd)}")
        for name, value in self.env:
            if not ENV_NAME.fullmatch(name):
                raise BadInputError(f"--env {name}=...: {name!r} is not a shell variable name")
            if "\0" in value:
                raise BadInputError(f"--env {name}: its value contains a NUL byte")
            steps.append(f"export {name}={shlex.quote(value)}")
        steps.append(" ".join(shlex.quote(a) for a in self.argv))
        return " && ".join(steps)


#: What the job init prints on the console once it waits for its job: where ``vmm-arch run``
#: saves the guest.
JOB_READY = "VMM-RUN-READY"
#: The job's first line on its UART: the magic, the length of the archive that follows (0: none)
#: and the shell line that runs the job.
JOB_HEADER = "VMMJOB {length} {line}\n"
#: The job's script in its archive, when its command does not fit on one line.
JOB_SCRIPT = "/vmm-job"


@dataclass(frozen=True)
class Job:
    """What ``job_init_script`` receives: ``line`` to run, after unpacking ``archive``."""

    line: str
    archive: bytes

    def header(self) -> bytes:
        return JOB_HEADER.format(length=len(self.archive), line=self.line).encode()


def job_init_script() -> str:
    """The ``/init`` of ``vmm-arch run`` from a snapshot: it waits for its job, which comes
    after the restore, runs it as ``command_init_script`` runs a command, and reports its exit
    status. The job arrives on COM4 (board.RUN_JOB_PORT): JOB_HEADER, then the newc archive it
    announces (if any), unpacked into /. COM4 is opened before JOB_READY is printed, so no byte
    can come before the driver listens; raw mode passes every byte as it is."""
    port = board.RUN_JOB_PORT.tty
    return f"""{_prologue("job_init_script")}
# Raw mode: no newline translation or echo, so the host's bytes pass unchanged both ways.
for tty in {COMMAND_STDOUT_TTY} {COMMAND_STDERR_TTY} {port}; do
    stty -F $tty raw -echo 2>/dev/null
done
exec 3<{port}
echo {JOB_READY}
read -r magic length line <&3
if [ "$magic" != VMMJOB ] || [ -z "$length" ]; then
    echo "vmm-arch: no job on {port}" >{COMMAND_STDERR_TTY}
    vmm_exit 70
fi
cd /
if [ "$length" != 0 ]; then
    # cpio stops at the archive's trailer, the last thing sent: no byte count is needed.
    cpio -i -d -m -u <&3 2>/dev/null
fi
exec 3<&-
# A subshell, not a new shell: one fork, no exec (each costs the emulated guest ~15 ms).
( eval "$line" ) >{COMMAND_STDOUT_TTY} 2>{COMMAND_STDERR_TTY} </dev/null
status=$?
# The command's last output may still be on its way out of COM2 and COM3: the helper waits
# until its stdout and stderr are sent, then writes the status (no stty: two execs fewer).
# The status as three octal digits by arithmetic, and the helper's byte through a file, not a
# pipe: one fork and one exec (each fork or exec costs the emulated guest several ms).
esc=$(( status >> 6 & 3 ))$(( status >> 3 & 7 ))$(( status & 7 ))
printf "\\\\$esc" >/tmp/.vmm-status
{OUTB_HELPER} </tmp/.vmm-status >{COMMAND_STDOUT_TTY} 2>{COMMAND_STDERR_TTY}
vmm_exit $status
/bin/busybox reboot -f
"""


def job(command: Command, extra: Sequence[tuple[Path, str]], now: float) -> Job:
    """The job for ``job_init_script``: set the guest's clock to ``now`` (UTC seconds), then run
    ``command``; with the ``extra`` files in an archive. The command goes on the header line
    when it fits on one, else into JOB_SCRIPT in the archive."""
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
    line = f"date -u -s '{clock}' >/dev/null 2>&1; {command.shell()}"
    entries: list[CpioEntry] = []
    if "\n" in line or "\r" in line:
        script = f"# Generated by vmm-arch (vmmarch_cli/initramfs.py:job).\n{line}\n"
        entries.append(CpioEntry(JOB_SCRIPT, stat.S_IFREG | 0o755, script.encode()))
        line = f". {JOB_SCRIPT}"
    entries = _with_extra(entries, extra)
    return Job(line, build_cpio(entries) if entries else b"")


def marker_init_script(marker: str, commands: Sequence[str] = ()) -> str:
    """The ``/init`` for test boots: facts, ``commands``, the marker line, then exit status 0.

    Fact lines (read by the tests; a value is ``unknown`` when its file is missing)::

        VMMARCH-FACT cmdline <contents of /proc/cmdline>
        VMMARCH-FACT nproc <processor entries in /proc/cpuinfo>
        VMMARCH-FACT online <contents of /sys/devices/system/cpu/online>
        VMMARCH-FACT memtotal_kb <MemTotal of /proc/meminfo, in kB>
        VMMARCH-FACT uptime <first field of /proc/uptime>

    The exit status goes to I/O port 0xf4 through /dev/port, or through /bin/vmm-outb when the
    kernel has no /dev/port; ``reboot -f`` is the fallback if the VMM does not stop the guest.
    """
    if not marker or any(c in marker for c in "\0\r\n"):
        raise BadInputError(f"marker {marker!r} must be one non-empty line")
    for command in commands:
        if "\0" in command:
            raise BadInputError(f"init command {command!r} contains a NUL byte")
    extra = "\n".join(commands)
    # Debian builds busybox with FEATURE_SH_STANDALONE, so the shell finds applets without
    # symlinks. But it starts most of them by exec'ing /proc/self/exe (CONFIG_BUSYBOX_EXEC_PATH),
    # which fails with "mount: not found" until /proc is mounted: the mounts and the final reboot
    # name /bin/busybox explicitly. `read`, `echo`, `printf` and `[` are shell builtins.
    return f"""{_prologue("marker_init_script")}
fact() {{
    echo "VMMARCH-FACT $1 $2"
}}

# file_fact NAME FILE: report the first line of FILE.
file_fact() {{
    value=unknown
    [ -r "$2" ] && read -r value < "$2"
    fact "$1" "$value"
}}

file_fact cmdline /proc/cmdline
value=unknown; [ -r /proc/cpuinfo ] && value=$(grep -c '^processor' /proc/cpuinfo)
fact nproc "$value"
file_fact online /sys/devices/system/cpu/online
value=unknown
if [ -r /proc/meminfo ]; then
    while read -r key kb unit; do
        [ "$key" = MemTotal: ] && value=$kb && break
    done < /proc/meminfo
fi
fact memtotal_kb "$value"
value=unknown; [ -r /proc/uptime ] && read -r value idle < /proc/uptime
fact uptime "$value"

{extra}

echo {shlex.quote(marker)}
vmm_exit 0
/bin/busybox reboot -f
"""
