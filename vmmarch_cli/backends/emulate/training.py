"""The engine's training run, for GCC's profile-guided optimization (libbuild.py).

The engine is compiled twice: once instrumented (``-fprofile-generate``), which then runs a
training workload and writes where its time went into ``.gcda`` files; then again with
``-fprofile-use``, so that GCC lays out and inlines for the paths that are hot. The workload is
the project's own test guests (examples/guests/, assembled by examples/build.py): they touch the
paths a kernel boot does (the CPU loop and block lookup, translation, the softmmu, interrupts,
exceptions, port I/O, TLB flushes, self-modifying code), and they are source in the repository,
so every machine trains on the same thing. Trained on them the engine boots Debian's kernel ~3%
faster (per-round ratio of 30 interleaved rounds); trained on that boot itself, ~1.6% faster
again (docs/benchmarks.md, session 9).

Training needs the example guests (a source checkout or an editable install has them, a wheel
does not), GNU as and ld to assemble them, and GCC 10 or newer (-fprofile-partial-training;
clang's profiles take another tool). Without them, or when the training or the trained compile
fails, the engine is built untrained, and ``vmm-arch engine`` says why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

# Every start reads ``requested`` (libbuild.series_digest); what only a build needs
# (subprocess, shutil, sys, time) is imported where it is used.

#: Where the example guests and their build script sit in a source checkout.
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
#: The guests the engine trains on: every example guest that ends by itself within seconds
#: (~0.3 s each, irq32 ~2 s; spin runs until it is stopped, apictimer times its timer ~10 s).
GUESTS = ("blockloop", "bootcheck", "cr3flush", "faultnest", "globalpages", "idtcheck", "irq32",
          "jmpcache", "nmi", "outloop", "pvhcheck", "repstring", "smcalias", "stosb",
          "syscallcheck", "triplefault", "uartflood", "usersyscall")
#: What a training boot runs: the CLI's ``main``, which ends with Python's own shutdown. The
#: instrumented library writes its profile from an exit handler (libgcov's), which the
#: ``vmm-arch`` command's fast exit (cli.run: os._exit) would skip: no profile at all.
ENTRY = "from vmmarch_cli.cli import main; main()"
#: Seconds one training boot may take on the instrumented engine.
GUEST_TIMEOUT = 30
#: Set to "off" to build the engine untrained: half the build time, a slower engine.
VARIABLE = "VMMARCH_ENGINE_PROFILE"

#: The oldest GCC with -fprofile-partial-training (GCC 10 release notes).
OLDEST_GCC = 10

Progress = Callable[[str], None]


class Mode(StrEnum):
    TRAINED = "trained"  # profile-guided, on GUESTS
    OFF = "off"  # VMMARCH_ENGINE_PROFILE=off


def requested() -> Mode:
    return Mode.OFF if os.environ.get(VARIABLE, "").strip().lower() == Mode.OFF else \
        Mode.TRAINED


@dataclass(frozen=True)
class Training:
    """What the training run did: the guests that ran to their end, the profile files the
    instrumented engine wrote, and how long it took."""

    guests: tuple[str, ...]
    profiles: int
    seconds: float


def unavailable(compiler: str) -> str:
    """Why the engine cannot be trained here; empty when it can."""
    import shutil
    import subprocess

    if not (EXAMPLES / "build.py").is_file():
        return f"the example guests are not installed ({EXAMPLES}: a source checkout has them)"
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            return f"{tool} (GNU binutils) is not installed: it assembles the example guests"
    try:
        macros = subprocess.run([compiler, "-dM", "-E", "-x", "c", os.devnull],
                                capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"the C compiler does not run: {e}"
    if "__GNUC__" not in macros or "__clang__" in macros:
        return f"{compiler} is not GCC (the profile files are GCC's)"
    version = next((line.split()[2] for line in macros.splitlines()
                    if line.startswith("#define __GNUC__ ")), "0")
    if not version.isdigit() or int(version) < OLDEST_GCC:
        return f"{compiler} is GCC {version}; training needs GCC {OLDEST_GCC} or newer"
    return ""


def generate_flags(profile_dir: Path) -> tuple[str, ...]:
    """Compiler flags of the instrumented build. Atomic counters: the engine's CPU thread and
    the VMM's alarm threads run its code at once."""
    return ("-fprofile-generate", "-fprofile-update=atomic", f"-fprofile-dir={profile_dir}")


def use_flags(profile_dir: Path) -> tuple[str, ...]:
    """Compiler flags of the final build. Code the guests never ran is optimized as without a
    profile (-fprofile-partial-training), not for size as GCC would otherwise do."""
    return ("-fprofile-use", "-fprofile-partial-training", "-Wno-missing-profile",
            f"-fprofile-dir={profile_dir}")


def train(library_dir: Path, profile_dir: Path, work: Path, progress: Progress) -> Training:
    """Boot each training guest on the instrumented library in ``library_dir``, which writes
    its profile into ``profile_dir``; one boot per CPU at a time (each process merges its counts
    into the profile files at exit, under a lock libgcov takes). A guest that fails only leaves
    the profile thinner."""
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    guests = work / "guests"
    progress(f"assembling {len(GUESTS)} example guests to train the CPU engine on")
    subprocess.run([sys.executable, str(EXAMPLES / "build.py"), "--out", str(guests), *GUESTS],
                   capture_output=True, check=False, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "VMMARCH_ENGINE"}
    env["LIBUNICORN_PATH"] = str(library_dir)
    elves = [(name, guests / f"{name}.elf") for name in GUESTS]
    booted: list[str] = []

    def boot(guest: tuple[str, Path]) -> None:
        name, elf = guest
        if not elf.is_file():
            return
        try:
            subprocess.run([sys.executable, "-c", ENTRY, "boot", "--backend", "emulate",
                            "--quiet", "--timeout", str(GUEST_TIMEOUT), str(elf)],
                           env=env, capture_output=True, check=False, timeout=GUEST_TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            return
        booted.append(name)
        progress(f"training the CPU engine: {len(booted)}/{len(GUESTS)} guests")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(boot, elves))
    profiles = sum(1 for _ in profile_dir.glob("*.gcda")) if profile_dir.is_dir() else 0
    return Training(tuple(name for name in GUESTS if name in booted), profiles,
                    round(time.monotonic() - started, 1))
