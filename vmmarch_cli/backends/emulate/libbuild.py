"""Build the CPU engine: unicorn 2.1.4 from PyPI's source, with vmm-arch's patch series.

The emulate backend runs on this library (patches/README.md says what each patch does). It is
built on the user's machine, never shipped, into the user cache, under a directory named for
the patch series (which covers the source's hash) and the C compiler, so that a change of either
builds a new library and nothing stale is reused. Only a C compiler is assumed: cmake and ninja
come from PyPI with the ``emulate`` extra, and the source from PyPI, checked against its SHA-256.

Builds are serialized by a lock in the cache (two first runs at once: one builds, the other
waits and uses the result), happen in a temporary directory, and appear by one rename, so an
interrupted build leaves nothing that looks finished. A build that fails is remembered for a day
(``FAILED``), so each run does not spend its time trying again; ``vmm-arch engine build`` does.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from vmmarch_cli import files
from vmmarch_cli.backends.emulate import training

# Every boot on the emulate backend looks the engine up here (series, cached, load_problem):
# what only a build needs (subprocess, tarfile, tempfile, sysconfig, fcntl, datetime: ~5 ms of
# imports) is imported where it is used.

Progress = Callable[[str], None]

VERSION = "2.1.4"
SDIST_NAME = f"unicorn-{VERSION}.tar.gz"
#: sha256 of PyPI's unicorn-2.1.4.tar.gz, the source the 2.1.4 wheels are built from.
SDIST_SHA256 = "00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff"
#: The folder of the sdist that holds unicorn's CMake project (and the paths the patches name).
SOURCE_ROOT = f"unicorn-{VERSION}/src"
PATCH_DIR = Path(__file__).with_name("patches")
LIB_NAME = "libunicorn.so.2"
MANIFEST = "engine.json"
FAILED = "failed.json"
#: A failed build is not tried again by itself for this long (``vmm-arch engine build`` does).
RETRY_AFTER_SECONDS = 24 * 3600
#: unicorn's build options: x86 only, the shared library alone.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DUNICORN_ARCH=x86",
                 "-DUNICORN_BUILD_TESTS=off", "-DUNICORN_LEGACY_STATIC_ARCHIVE=off",
                 "-DUNICORN_INSTALL=off")
#: Compiler flags of our own. The library is built on the machine that runs it, so it is
#: compiled for this CPU (the cache keeps one engine per CPU: ``host_cpu``). unicorn exports
#: ~2,000 functions from a -fPIC library, so each call between them went through the PLT;
#: -fno-semantic-interposition and -Bsymbolic bind them inside the library. Together: 5-6%
#: less time to the stock kernel's init marker (docs/benchmarks.md, session 7).
ENGINE_CFLAGS = ("-march=native", "-fno-semantic-interposition")
ENGINE_LDFLAGS = ("-Wl,-Bsymbolic",)
#: ninja prints "[12/75] Building C object ..."; make prints "[ 16%] Building C object ...".
_NINJA_STEP = re.compile(rb"^\[(\d+)/(\d+)\]")
_MAKE_STEP = re.compile(rb"^\[\s*(\d+)%\]")


class BuildError(Exception):
    """The engine could not be built; the message is one line naming the cause."""


@dataclass(frozen=True)
class Patch:
    name: str  # the file name without .patch: "0002-dirty-tracking"
    title: str  # the header's first line
    text: bytes


@dataclass(frozen=True)
class Compiler:
    path: str
    identity: str  # `cc --version`'s first line and its target

    def stamp(self) -> tuple[int, int]:
        """What would change if the compiler were replaced (size, mtime): cheap to compare."""
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class Engine:
    """A built library in the cache, as its manifest describes it."""

    directory: str
    engine_id: str
    series: tuple[str, ...]  # patch names, in order
    compiler: str
    compiler_path: str
    compiler_stamp: tuple[int, int]
    cpu: str  # host_cpu() where it was built
    built_at: str  # ISO 8601, UTC
    build_seconds: float
    library_stamp: tuple[int, int]  # (size, mtime) of the library file as it was built
    profile: str  # how it was optimized: trained on which guests, or why it was not

    @property
    def library(self) -> Path:
        return Path(self.directory) / LIB_NAME


def series() -> tuple[Patch, ...]:
    """The patches, in the order they apply."""
    out = []
    for path in sorted(PATCH_DIR.glob("*.patch")):
        text = path.read_bytes()
        out.append(Patch(path.stem, text.split(b"\n", 1)[0].decode(), text))
    return tuple(out)


def series_digest(patches: Sequence[Patch]) -> str:
    """One hash of the source pin, the build options (a trained build or not) and every patch,
    in order."""
    h = hashlib.sha256(f"unicorn {VERSION} {SDIST_SHA256}\n".encode())
    h.update(" ".join((*CMAKE_OPTIONS, *ENGINE_CFLAGS, *ENGINE_LDFLAGS)).encode() + b"\n")
    h.update(f"profile {training.requested()}\n".encode())
    for p in patches:
        h.update(f"{p.name} {len(p.text)}\n".encode())
        h.update(p.text)
    return h.hexdigest()


def engine_root() -> Path:
    return files.cache_dir() / "engine"


def find_compiler() -> Compiler:
    """$CC or cc, as it would build the engine; BuildError when there is none."""
    import subprocess
    name = os.environ.get("CC") or "cc"
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"no C compiler ({name} not found; install gcc or set CC)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 check=True, timeout=30).stdout.splitlines()[0]
        target = subprocess.run([path, "-dumpmachine"], capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise BuildError(f"the C compiler {path} does not run: {e}") from None
    return Compiler(os.path.realpath(path), f"{version} ({target})")


def compiler_path() -> str | None:
    """Where $CC or cc resolves now, without running it (to match a cached engine)."""
    path = shutil.which(os.environ.get("CC") or "cc")
    return os.path.realpath(path) if path else None


def engine_id(digest: str, compiler: Compiler, cpu: str) -> str:
    return hashlib.sha256(f"{digest}\n{compiler.identity}\n{cpu}\n".encode()).hexdigest()[:16]


def host_cpu() -> str:
    """The CPU -march=native compiles for, as a short hash of the first processor's vendor,
    family, model and feature flags in /proc/cpuinfo: a library built for one CPU may stop on
    an invalid opcode on another, so a cache shared between machines keeps one engine each."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read(65536).split("\n\n", 1)[0]
    except OSError:
        return "unknown"
    wanted = ("vendor_id", "cpu family", "model", "flags")
    lines = [line for line in first.splitlines() if line.split(":", 1)[0].strip() in wanted]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _directory_prefix(digest: str) -> str:
    return f"unicorn-{VERSION}-{digest[:12]}-"


def cached(digest: str) -> Engine | None:
    """The engine built from this series, for this CPU, with the compiler $CC resolves to now,
    if one is in the cache. Reads manifests only: nothing is run or loaded (``load_problem``
    checks it)."""
    path = compiler_path()
    if path is None:
        return None
    stamp = _stamp(path)
    cpu = host_cpu()
    for manifest in sorted(engine_root().glob(f"{_directory_prefix(digest)}*/{MANIFEST}")):
        engine = _read_manifest(manifest)
        if engine is not None and engine.compiler_path == path and \
                engine.compiler_stamp == stamp and engine.cpu == cpu:
            return engine
    return None


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _read_manifest(path: Path) -> Engine | None:
    try:
        raw = json.loads(path.read_text())
        raw["series"] = tuple(raw["series"])
        raw["compiler_stamp"] = tuple(raw["compiler_stamp"])
        raw["library_stamp"] = tuple(raw["library_stamp"])
        raw["directory"] = str(path.parent)
        return Engine(**raw)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def load_problem(engine: Engine) -> str | None:
    """The load check: the file is as it was built (size and modification time: a truncated
    library would crash the process when loaded, SIGBUS; a hash would cost ~3 ms a start), it
    loads, and it names the series it was built from. None when it passes; else what is wrong
    (the caller rebuilds)."""
    if _stamp(str(engine.library)) != engine.library_stamp:
        return f"{engine.library} has changed since it was built"
    try:
        lib = ctypes.CDLL(str(engine.library))
        ident = lib.vmmarch_engine_id
    except (OSError, AttributeError) as e:
        return f"{engine.library} does not load as the engine: {e}"
    ident.restype = ctypes.c_char_p
    ident.argtypes = []
    got = (ident() or b"").decode(errors="replace")
    if got != engine.engine_id:
        return f"{engine.library} says it was built as {got!r}, not {engine.engine_id!r}"
    return None


# --- remembering a failed build ------------------------------------------------------------

def recent_failure(digest: str) -> tuple[str, str] | None:
    """(cause, when) of a failed build of this series in the last RETRY_AFTER_SECONDS."""
    try:
        raw = json.loads((engine_root() / FAILED).read_text())
        if raw["series"] != digest or time.time() - float(raw["at"]) > RETRY_AFTER_SECONDS:
            return None
        return str(raw["cause"]), str(raw["when"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def remember_failure(digest: str, cause: str) -> None:
    now = time.time()
    record = {"series": digest, "cause": cause, "at": now, "when": _iso(now)}
    try:
        engine_root().mkdir(parents=True, exist_ok=True)
        files.write_atomic(engine_root() / FAILED, json.dumps(record).encode())
    except OSError:
        pass  # then the next run tries again; nothing else is lost


def forget_failure() -> None:
    (engine_root() / FAILED).unlink(missing_ok=True)


def clean() -> list[Path]:
    """Remove every built engine, the kept source and the failure record (not a build that
    holds the lock right now: its staging directory goes with it when it ends); what was
    removed."""
    root = engine_root()
    removed = []
    for path in [*sorted(root.glob("unicorn-*")), root / FAILED]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path)
    return removed



def _iso(seconds: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


# --- building ------------------------------------------------------------------------------

@contextmanager
def _build_lock(progress: Progress) -> Iterator[None]:
    import fcntl

    root = engine_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another vmm-arch that is building the CPU engine")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(progress: Progress, *, force: bool = False) -> Engine:
    """The engine for this series and compiler: from the cache when it passes its load check,
    else built now. BuildError (one line) when it cannot be built; the failure is remembered."""
    patches = series()
    digest = series_digest(patches)
    try:
        compiler = find_compiler()
        with _build_lock(progress):
            engine = cached(digest)  # another process may have built it while we waited
            if engine is not None and not force and load_problem(engine) is None:
                return engine
            engine = _build(patches, digest, compiler, progress)
    except BuildError as e:
        remember_failure(digest, str(e))
        raise
    except OSError as e:
        cause = _os_cause(e)
        remember_failure(digest, cause)
        raise BuildError(cause) from None
    forget_failure()
    return engine


def _os_cause(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full ({e.filename or engine_root()}; the cache is "
                f"{files.cache_dir()}, set VMMARCH_CACHE to move it)")
    return f"{e.strerror or e} ({e.filename or engine_root()})"


def _build(patches: Sequence[Patch], digest: str, compiler: Compiler,
           progress: Progress) -> Engine:
    import tempfile

    root = engine_root()
    started = time.monotonic()
    cpu = host_cpu()
    ident = engine_id(digest, compiler, cpu)
    work = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        tarball = _sdist(root, work, progress)
        progress(f"unpacking unicorn {VERSION} and applying {len(patches)} patches")
        src = _unpack(tarball, work)
        for patch in patches:
            apply_patch(src, patch)
        profile = _compile_trained(src, work, ident, compiler, progress)
        final = root / f"{_directory_prefix(digest)}{ident[:8]}"
        staged = work / "engine"
        staged.mkdir()
        shutil.copy2(work / "build" / LIB_NAME, staged / LIB_NAME)
        engine = Engine(str(final), ident, tuple(p.name for p in patches), compiler.identity,
                        compiler.path, compiler.stamp(), cpu, _iso(time.time()),
                        round(time.monotonic() - started, 1),
                        _stamp(str(staged / LIB_NAME)) or (0, 0), profile)
        manifest = asdict(engine)
        del manifest["directory"]
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        check = load_problem(Engine(**{**asdict(engine), "directory": str(staged)}))
        if check is not None:
            raise BuildError(f"the built library fails its load check: {check}")
        if final.exists():  # a stale or broken one: replaced whole
            shutil.rmtree(final)
        os.rename(staged, final)
        return engine
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sdist(root: Path, work: Path, progress: Progress) -> Path:
    """unicorn's source distribution, kept in the cache once its hash is checked."""
    import subprocess
    import sys

    kept = root / SDIST_NAME
    if kept.is_file() and _sha256(kept) == SDIST_SHA256:
        return kept
    progress(f"downloading unicorn {VERSION}'s source from PyPI")
    download = work / "download"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
         ":all:", "--disable-pip-version-check", f"unicorn=={VERSION}", "-d", str(download)],
        capture_output=True, text=True, check=False)
    got = download / SDIST_NAME
    if done.returncode != 0 or not got.is_file():
        raise BuildError(f"unicorn {VERSION}'s source is unreachable (pip download: "
                         f"{_last_line(done.stderr or done.stdout)})")
    digest = _sha256(got)
    if digest != SDIST_SHA256:
        raise BuildError(f"unicorn {VERSION}'s source has sha256 {digest}, expected "
                         f"{SDIST_SHA256}: refusing it")
    shutil.copy2(got, work / SDIST_NAME)
    os.replace(work / SDIST_NAME, kept)
    return kept


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unpack(tarball: Path, work: Path) -> Path:
    """The CMake project (``src/``) of the sdist, unpacked under ``work``."""
    import tarfile

    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers()
                   if m.name == SOURCE_ROOT or m.name.startswith(SOURCE_ROOT + "/")]
        tar.extractall(work, members=members, filter="data")
    return work / SOURCE_ROOT


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _tool(name: str) -> str | None:
    """``name`` beside this Python (where pip puts the cmake and ninja packages' scripts),
    else on PATH."""
    import sysconfig

    scripts = sysconfig.get_path("scripts")
    here = Path(scripts) / name if scripts else None
    if here is not None and here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def _compile_trained(src: Path, work: Path, ident: str, compiler: Compiler,
                     progress: Progress) -> str:
    """Compile the library into ``work/build``, trained when it can be (training.py): an
    instrumented build, its training run, then the same build directory again with the
    profile (GCC finds each object's profile by the object's path). What was done, for the
    manifest."""
    out = work / "build"
    if training.requested() is training.Mode.OFF:
        _compile(src, out, ident, compiler, progress, ())
        return f"untrained ({training.VARIABLE}=off)"
    why_not = training.unavailable(compiler.path)
    if why_not:
        _compile(src, out, ident, compiler, progress, ())
        return f"untrained: {why_not}"
    profile_dir = work / "profile"
    _compile(src, out, ident, compiler, progress, training.generate_flags(profile_dir),
             "instrumented ")
    instrumented = work / "instrumented"
    instrumented.mkdir()
    shutil.copy2(out / LIB_NAME, instrumented / LIB_NAME)
    trained = training.train(instrumented, profile_dir, work, progress)
    why_not = "" if trained.profiles else (
        f"its training run wrote no profile ({len(trained.guests)} of "
        f"{len(training.GUESTS)} guests booted)")
    if not why_not:
        try:
            _compile(src, out, ident, compiler, progress, training.use_flags(profile_dir),
                     "trained ")
        except BuildError as e:
            why_not = str(e)
    if why_not:  # a slower engine, but an engine: the reason goes into the manifest
        _compile(src, out, ident, compiler, progress, ())
        return f"untrained: {why_not}"
    missing = [name for name in training.GUESTS if name not in trained.guests]
    return (f"trained on {len(trained.guests)} example guests in {trained.seconds:g} s "
            f"({trained.profiles} profile files)"
            + (f"; did not finish: {', '.join(missing)}" if missing else ""))


def _compile(src: Path, out: Path, ident: str, compiler: Compiler, progress: Progress,
             extra: Sequence[str], kind: str = "") -> None:
    cmake = _tool("cmake")
    if cmake is None:
        raise BuildError("cmake not found (pip install cmake, or the emulate extra: "
                         "pip install 'vmm-arch[emulate]')")
    ninja = _tool("ninja")
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    log = out.parent / "build.log"
    env = {**os.environ, "CC": compiler.path, "LC_ALL": "C"}
    progress(f"configuring the {kind}CPU engine build")
    cflags = " ".join((f'-DVMMARCH_ENGINE_ID=\\"{ident}\\"', *ENGINE_CFLAGS, *extra))
    ldflags = " ".join((*ENGINE_LDFLAGS, *extra))
    _run_logged([cmake, "-S", str(src), "-B", str(out), *generator, *CMAKE_OPTIONS,
                 f"-DCMAKE_C_FLAGS={cflags}", f"-DCMAKE_SHARED_LINKER_FLAGS={ldflags}"],
                env, log, progress, "configuring", kind)
    jobs = str(os.cpu_count() or 1)
    _run_logged([cmake, "--build", str(out), "--target", "unicorn", "-j", jobs], env, log,
                progress, "compiling", kind)


def _run_logged(argv: list[str], env: dict[str, str], log: Path, progress: Progress,
                step: str, kind: str) -> None:
    """Run a build step, its output appended to ``log``; the compile step's progress shown."""
    import subprocess

    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        last = 0.0
        for line in proc.stdout:
            out.write(line)
            found = _NINJA_STEP.match(line) or _MAKE_STEP.match(line)
            now = time.monotonic()
            if found and now - last > 0.2:
                last = now
                done = (f"{found[1].decode()}/{found[2].decode()}" if found.re is _NINJA_STEP
                        else f"{found[1].decode()}%")
                progress(f"compiling the {kind}CPU engine: {done}")
        status = proc.wait()
    if status != 0:
        text = log.read_text(errors="replace")
        if os.strerror(errno.ENOSPC) in text:
            raise BuildError(f"the disk is full while {step} the {kind}engine (the cache is "
                             f"{files.cache_dir()}, set VMMARCH_CACHE to move it)")
        error = [ln for ln in text.splitlines() if "error" in ln.lower()]
        raise BuildError(f"{step} the {kind}engine failed: {(error or [_last_line(text)])[-1]}")


# --- applying a patch ----------------------------------------------------------------------

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def apply_patch(root: Path, patch: Patch) -> None:
    """Apply a unified diff (paths relative to ``root``, ``a/`` and ``b/`` prefixes) exactly:
    every hunk's old lines must be found, at the line it names or once elsewhere in the file,
    or the whole build stops with the patch and hunk named. Nothing fuzzy."""
    lines = patch.text.decode().splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("--- "):
            i += 1
            continue
        target = lines[i + 1][4:].strip()
        if not target.startswith("b/"):
            raise BuildError(f"patch {patch.name}: malformed file header {lines[i + 1]!r}")
        path = root / target[2:]
        text = path.read_text().split("\n")
        shift = 0
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            header = _HUNK.match(lines[i])
            if header is None:
                raise BuildError(f"patch {patch.name}: malformed hunk {lines[i]!r}")
            old: list[str] = []
            new: list[str] = []
            old_count = int(header[2] or 1)
            new_count = int(header[4] or 1)
            i += 1
            while i < len(lines) and (len(old) < old_count or len(new) < new_count):
                line = lines[i] or " "  # an editor may strip a context line's one space
                if line[:1] in (" ", "-"):
                    old.append(line[1:])
                if line[:1] in (" ", "+"):
                    new.append(line[1:])
                i += 1
            at = _locate(text, old, int(header[1]) - 1 + shift)
            if at is None:
                raise BuildError(f"patch {patch.name} does not apply to {target[2:]} "
                                 f"(hunk at line {header[1]})")
            text[at:at + len(old)] = new
            shift += len(new) - len(old)
        path.write_text("\n".join(text))


def _locate(text: list[str], old: list[str], hint: int) -> int | None:
    if text[hint:hint + len(old)] == old:
        return hint
    found = [k for k in range(len(text) - len(old) + 1) if text[k:k + len(old)] == old]
    return found[0] if len(found) == 1 else None
