"""The ``userspace`` case's guest: a busybox /init that spends its time in fork, exec, page
faults and system calls, and reports what it did so both VMMs can be held to the same work.

The /init is ``vmmarch_cli.initramfs.marker_init_script`` (mounts, facts, then our commands,
then the marker and the exit port) around the commands below. Every external program is named
as ``$B tool`` with ``B=/bin/busybox``: a command with a slash is always fork + execve of the
2 MB static busybox. Named bare, Debian's busybox shell (FEATURE_SH_STANDALONE) would run some
applets inside the shell or in a fork without exec, and the work would depend on its build
options instead of on the kernel's process paths.

Phases, each announced with ``USERSPACE-PHASE <name>`` (the harness timestamps them):

* ``spawn``: a loop of ``$B true``: fork + exec + exit + wait, nothing else.
* ``pipes``: per iteration ``$(echo $i | $B tr ...)`` and ``$($B expr ...)``: command
  substitutions and a two-process pipeline, the shell-script pattern.
* ``xargs``: ``seq | xargs -n 1 printf | md5sum``: xargs starting one process per line.
* ``text``: ``sort | uniq | wc``, ``sed | grep | awk``, ``tr | fold | sort | uniq -c`` over
  ``seq`` output in tmpfs: pipes between long-lived processes.
* ``data``: ``seq`` output (1 MiB) in tmpfs through ``md5sum``, ``gzip`` and ``gunzip``; four
  copies of it ``cat`` together and ``md5sum``'ed.
* ``files``: create small files with the shell's own ``echo >``, then ``cat``, ``ls``, ``find``
  and ``rm -r`` over them: open/write/close and directory system calls.

Each result is one ``USERSPACE-RESULT <name> <value>`` line (also kept in /tmp/results); the
last lines are ``USERSPACE-FORKS <n>`` (the kernel's fork count over the workload, from
/proc/stat) and ``USERSPACE-SANITY spawned=<n> results=<md5 of /tmp/results>``, where ``n``
counts the external programs the script started (the ``spawn`` loop counts those that exited 0).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

MARKER = "VMM-USERSPACE-DONE"
PHASES = ("spawn", "pipes", "xargs", "text", "data", "files")
PHASE_LINE = "USERSPACE-PHASE"
RESULT_LINE = "USERSPACE-RESULT"
FORKS_LINE = "USERSPACE-FORKS"
SANITY_LINE = "USERSPACE-SANITY"
#: The script prints this when one of its own checks fails (expr vs shell arithmetic, the
#: gzip round trip).
CHECK_FAILED = "USERSPACE-CHECK-FAILED"


@dataclass(frozen=True)
class Workload:
    """How much of each phase: loop iterations, or numbers in a ``seq`` file."""

    spawn: int  # $B true processes
    pipes: int  # iterations of (echo | tr) and expr
    xargs: int  # processes xargs starts
    text_lines: int  # seq 1 N for the text pipelines
    data_lines: int  # seq 1 N for md5sum/gzip (~7 bytes a line)
    files: int  # small files created, read and removed

    def spawned(self) -> int:
        """External programs the script starts: the ``n`` of the sanity line."""
        # Per phase, as the script adds them up (pipelines: one per stage).
        return (self.spawn + (2 * self.pipes + 1) + (self.xargs + 3) + (1 + 3 + 3 + 5)
                + (1 + 1 + 1 + 2 + 1 + 1 + 1 + 1 + 1) + (1 + 2 + 2 + 3 + 1))


#: ~6 s of userspace under QEMU TCG here (~7 s to the marker): 1,175 programs started, 1,433
#: forks counted by the kernel.
DEFAULT = Workload(spawn=500, pipes=120, xargs=400, text_lines=10_000, data_lines=150_000,
                   files=300)
#: One short pair for ``--quick``: a tenth of the work.
QUICK = Workload(spawn=50, pipes=12, xargs=40, text_lines=1_000, data_lines=15_000, files=30)


def commands(w: Workload) -> str:
    """The workload as shell commands for ``marker_init_script`` (run after its mounts)."""
    # Doubled braces are literal shell braces; \\ is one backslash in the script.
    return f"""\
B=/bin/busybox
# Our own tmpfs: the initramfs root is one too, but a size limit keeps a runaway step from
# eating the guest's 256 MiB.
$B mount -t tmpfs -o size=96m tmpfs /tmp
# The kernel's count of forks since boot (the 'processes' line), read without a process.
forks() {{
    while read -r key value rest; do [ "$key" = processes ] && echo "$value"; done < /proc/stat
}}
result() {{
    echo "{RESULT_LINE} $1 $2"
    echo "$1 $2" >> /tmp/results
}}
md5() {{
    h=$($B md5sum); echo "${{h%% *}}"
}}
n=0
f0=$(forks)

echo "{PHASE_LINE} spawn"
i=0; ok=0
while [ $i -lt {w.spawn} ]; do
    $B true && ok=$((ok + 1))
    i=$((i + 1))
done
n=$((n + ok))
result spawn_ok $ok

echo "{PHASE_LINE} pipes"
i=0; s=0; t=0
while [ $i -lt {w.pipes} ]; do
    w=$(echo "$i" | $B tr 0-9 a-j)
    s=$($B expr "$s" + "$i" \\* 3 % 7)
    t=$((t + i * 3 % 7))
    echo "$w" >> /tmp/words
    i=$((i + 1))
done
n=$((n + 2 * i + 1))  # tr and expr each time, then tr_md5's md5sum
[ "$s" = "$t" ] || echo "{CHECK_FAILED} expr sum $s, shell arithmetic $t"
result expr_sum "$s"
result tr_md5 "$(md5 < /tmp/words)"

echo "{PHASE_LINE} xargs"
result xargs_md5 "$($B seq 1 {w.xargs} | $B xargs -n 1 $B printf '%x\\n' | md5)"
n=$((n + {w.xargs} + 3))

echo "{PHASE_LINE} text"
$B seq 1 {w.text_lines} > /tmp/nums
result sort_uniq_lines "$($B sort -r /tmp/nums | $B uniq | $B wc -l)"
result sed_grep_awk "$($B sed 's/1/one/g' /tmp/nums | $B grep -v 7 \\
    | $B awk '{{ s += length($0) }} END {{ print s }}')"
result digits_md5 "$($B tr -d '\\n' < /tmp/nums | $B fold -w 1 | $B sort | $B uniq -c | md5)"
n=$((n + 1 + 3 + 3 + 5))

echo "{PHASE_LINE} data"
$B seq 1 {w.data_lines} > /tmp/data
sum=$(md5 < /tmp/data)
# From stdin, so the gzip header holds no file name or time: the same bytes on both VMMs.
$B gzip -c < /tmp/data > /tmp/data.gz
back=$($B gunzip -c < /tmp/data.gz | md5)
[ "$sum" = "$back" ] || echo "{CHECK_FAILED} gzip round trip: $sum, back $back"
result data_md5 "$sum"
result data_bytes "$($B wc -c < /tmp/data)"
result gzip_md5 "$(md5 < /tmp/data.gz)"
# A few MiB through tmpfs: cat's reads and writes fault in fresh page-cache pages.
$B cat /tmp/data /tmp/data /tmp/data /tmp/data > /tmp/big
result big_md5 "$(md5 < /tmp/big)"
$B rm /tmp/big
n=$((n + 1 + 1 + 1 + 2 + 1 + 1 + 1 + 1 + 1))

echo "{PHASE_LINE} files"
$B mkdir /tmp/f
i=0
while [ $i -lt {w.files} ]; do echo "file $i" > /tmp/f/$i; i=$((i + 1)); done
result files_md5 "$($B cat /tmp/f/* | md5)"
result files_count "$($B ls /tmp/f | $B wc -l)"
result find_md5 "$($B find /tmp/f -type f | $B sort | md5)"
$B rm -r /tmp/f
n=$((n + 1 + 2 + 2 + 3 + 1))

f1=$(forks)
echo "{FORKS_LINE} $((f1 - f0))"
echo "{SANITY_LINE} spawned=$n results=$(md5 < /tmp/results)"
"""


def init_script(w: Workload) -> str:
    from vmmarch_cli.initramfs import marker_init_script

    return marker_init_script(MARKER, [commands(w)])


def build_initrd(w: Workload, busybox: Path, out_dir: Path) -> Path:
    """The uncompressed initramfs (as ``stock_initramfs`` makes it: the kernel would inflate a
    gzip'ed one in ring 0), named by content so an unchanged one is never rewritten."""
    from vmmarch_cli.initramfs import busybox_initramfs

    image = busybox_initramfs(busybox, init_script(w), compress=False)
    path = out_dir / f"initramfs-userspace-{hashlib.sha256(image).hexdigest()[:16]}.cpio"
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(image)
        tmp.replace(path)
    return path


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def expected(w: Workload) -> dict[str, str]:
    """The results a correct guest must print that are cheap to compute here. The others
    (gzip's bytes, ``uniq -c``'s format, ``find``'s order) are held to equality between runs."""
    nums = [str(i) for i in range(1, w.text_lines + 1)]
    data = "".join(f"{i}\n" for i in range(1, w.data_lines + 1))
    return {
        "spawn_ok": str(w.spawn),
        "expr_sum": str(sum(i * 3 % 7 for i in range(w.pipes))),
        "tr_md5": _md5("".join(str(i).translate(str.maketrans("0123456789", "abcdefghij"))
                               + "\n" for i in range(w.pipes))),
        "xargs_md5": _md5("".join(f"{i:x}\n" for i in range(1, w.xargs + 1))),
        "sort_uniq_lines": str(w.text_lines),
        "sed_grep_awk": str(sum(len(s.replace("1", "one")) for s in nums if "7" not in s)),
        "data_md5": _md5(data),
        "data_bytes": str(len(data)),
        "big_md5": _md5(data * 4),
        "files_md5": _md5("".join(f"file {i}\n" for i in sorted(range(w.files), key=str))),
        "files_count": str(w.files),
    }


@dataclass(frozen=True)
class Report:
    """What one run's guest said about its work (from its console output)."""

    results: dict[str, str]
    forks: int | None
    sanity: str  # the whole sanity line, "" if missing
    failures: tuple[str, ...]  # the script's own CHECK-FAILED lines

    def problems(self, w: Workload) -> list[str]:
        """Why this run did not do the expected work (empty: it did)."""
        out = list(self.failures)
        if not self.sanity:
            out.append("no sanity line")
            return out
        if f"spawned={w.spawned()} " not in self.sanity + " ":
            out.append(f"{self.sanity!r}: expected spawned={w.spawned()}")
        for name, value in expected(w).items():
            if self.results.get(name) != value:
                out.append(f"{name} = {self.results.get(name)!r}, expected {value!r}")
        if self.forks is not None and self.forks < w.spawned():
            out.append(f"the kernel counted {self.forks} forks for {w.spawned()} programs")
        return out


_LINE = re.compile(rf"({RESULT_LINE}|{FORKS_LINE}|{SANITY_LINE}|{CHECK_FAILED})\b ?(.*)")


def parse(console: bytes) -> Report:
    results: dict[str, str] = {}
    forks: int | None = None
    sanity = ""
    failures: list[str] = []
    for raw in console.decode(errors="replace").splitlines():
        match = _LINE.search(raw.rstrip("\r"))
        if match is None:
            continue
        kind, rest = match.groups()
        if kind == RESULT_LINE:
            name, _, value = rest.partition(" ")
            results.setdefault(name, value.strip())
        elif kind == FORKS_LINE and rest.strip().isdigit():
            forks = int(rest)
        elif kind == SANITY_LINE:
            sanity = f"{SANITY_LINE} {rest.strip()}"
        else:
            failures.append(f"{kind} {rest.strip()}")
    return Report(results, forks, sanity, tuple(failures))
