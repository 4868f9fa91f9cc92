"""The CPU engine as a product feature: built on first use into the cache, checked before it is
trusted, shared safely by concurrent first runs, reported by ``vmm-arch engine``, and replaced by
the unicorn wheel with a one-line notice whenever it cannot be built.

Every test but one uses a cache of its own (VMMARCH_CACHE), seeded with the unicorn source the
default cache already holds, so that only the tests about the download reach PyPI; those builds
are untrained (half the time). test_the_engine_is_trained_on_the_example_guests reads the
default cache's engine, the one every other test runs on.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ROOT, finish, needs_unicorn, run_cli

pytestmark = needs_unicorn

NOTICE = "vmm-arch: "


@pytest.fixture(scope="module")
def sdist() -> Path:
    """unicorn's source distribution, as the engine build keeps it (built once if need be)."""
    from vmmarch_cli.backends.emulate import libbuild

    p = run_cli("engine", "build", "-q", timeout=600)
    assert p.returncode == 0, p.stderr
    kept = libbuild.engine_root() / libbuild.SDIST_NAME
    assert kept.is_file()
    return kept


def _cache(tmp_path: Path, sdist: Path | None = None) -> dict[str, str]:
    """The environment of a run on a cache of its own (with the source, when given)."""
    cache = tmp_path / "cache"
    (cache / "engine").mkdir(parents=True)
    if sdist is not None:
        shutil.copy2(sdist, cache / "engine" / sdist.name)
    # The engine, whatever this test run was told (CI runs the emulate tests on the wheel too),
    # untrained: these tests are about the cache, and a trained build takes twice as long
    # (test_the_engine_is_trained_on_the_example_guests covers the training).
    return {"VMMARCH_CACHE": str(cache), "VMMARCH_ENGINE": "", "LIBUNICORN_PATH": "",
            "VMMARCH_ENGINE_PROFILE": "off"}


def _notices(stderr: str) -> list[str]:
    """The engine's one-line messages (not the boot's own report lines)."""
    return [line for line in stderr.splitlines()
            if line.startswith(NOTICE) and ("engine" in line or "wheel" in line)]


def _boot(guest: Path, env: dict[str, str], timeout: float = 600
          ) -> subprocess.CompletedProcess[str]:
    return run_cli("boot", str(guest), "--backend", "emulate", "--timeout", "60",
                   env=env, timeout=timeout)


def test_without_a_compiler_a_run_says_why_once_and_boots_on_the_wheel(
        guests: dict[str, Path], tmp_path: Path) -> None:
    env = {**_cache(tmp_path), "CC": "/nonexistent/cc"}
    p = _boot(guests["bootcheck"], env)
    assert p.returncode == 0, p.stderr
    assert _notices(p.stderr) == [
        "vmm-arch: the engine could not be built: no C compiler (/nonexistent/cc not found; "
        "install gcc or set CC); running on the unicorn wheel"], p.stderr
    assert "Traceback" not in p.stderr
    # The failure is remembered: the next run does not try again, and says so in one line.
    started = time.monotonic()
    again = _boot(guests["bootcheck"], env)
    assert again.returncode == 0
    assert [n for n in _notices(again.stderr) if "wheel" in n] == [
        n for n in _notices(again.stderr) if "failed to build" in n and "tries again" in n]
    assert time.monotonic() - started < 30
    status = json.loads(run_cli("engine", "--json", env=env).stdout)
    assert status["kind"] == "wheel" and "no C compiler" in status["last_failure"]["cause"]


def test_a_compile_error_is_one_line_naming_the_step(tmp_path: Path, sdist: Path) -> None:
    """A compiler that answers --version but fails every compilation."""
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\n"
                      "case \"$1\" in --version) echo 'cc (test) 1.0';; "
                      "-dumpmachine) echo x86_64-linux-gnu;; "
                      "*) echo 'cc: error: this compiler always fails' >&2; exit 1;; esac\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    env = {**_cache(tmp_path, sdist), "CC": str(broken)}
    p = run_cli("engine", "build", "-q", env=env, timeout=300)
    assert p.returncode == 69, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmm-arch: error: the CPU engine could not "
                                                   "be built: "), p.stderr
    assert "configuring" in lines[0] or "compiling" in lines[0]


def test_an_unreachable_source_falls_back_naming_it(tmp_path: Path) -> None:
    """No kept source and a package index that does not answer."""
    env = {**_cache(tmp_path), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "",
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    p = run_cli("engine", "build", "-q", env=env, timeout=300)
    assert p.returncode == 69
    assert "unicorn 2.1.4's source is unreachable" in p.stderr, p.stderr


def test_a_source_with_another_hash_is_refused(tmp_path: Path, sdist: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned hash is checked after the download (here: the pin is changed, the real
    source stays the same)."""
    from vmmarch_cli.backends.emulate import libbuild

    monkeypatch.setenv("VMMARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(libbuild, "SDIST_SHA256", "0" * 64)
    with pytest.raises(libbuild.BuildError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}"):
        libbuild.build(lambda message: None)
    assert libbuild.recent_failure(libbuild.series_digest(libbuild.series())) is not None


def test_two_first_runs_build_once_and_a_broken_library_is_rebuilt(
        guests: dict[str, Path], tmp_path: Path, sdist: Path) -> None:
    env = _cache(tmp_path, sdist)
    runs = [subprocess.Popen([sys.executable, "-m", "vmmarch_cli", "boot",
                              str(guests["bootcheck"]), "--backend", "emulate", "--timeout",
                              "60"], cwd=ROOT, env={**os.environ, **env}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]
    outputs = [finish(r, 600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    errors = "\n".join(err for _, err in outputs)
    assert errors.count("on first use") == 2  # each says it, one line each
    assert "waiting for another vmm-arch" in errors
    built = list(Path(env["VMMARCH_CACHE"], "engine").glob("unicorn-*-*"))
    assert len(built) == 1 and (built[0] / "libunicorn.so.2").is_file()
    status = json.loads(run_cli("engine", "--json", env=env).stdout)
    assert status["kind"] == "engine" and status["library"].startswith(str(built[0]))
    from vmmarch_cli.backends.emulate import libbuild
    assert status["built"]["cpu"] == libbuild.host_cpu()  # compiled for this CPU (-march=native)
    assert status["built"]["profile"] == "untrained (VMMARCH_ENGINE_PROFILE=off)"

    # A cached library that fails its load check is rebuilt, not trusted.
    library = built[0] / "libunicorn.so.2"
    library.write_bytes(library.read_bytes()[:4096])
    p = _boot(guests["bootcheck"], env)
    assert p.returncode == 0, p.stderr
    assert any("fails its load check" in n and "rebuilding" in n for n in _notices(p.stderr))
    assert json.loads(run_cli("engine", "--json", env=env).stdout)["kind"] == "engine"
    again = _boot(guests["bootcheck"], env)
    assert again.returncode == 0 and not _notices(again.stderr), again.stderr

    # One built for another CPU is not loaded here, where it may meet an opcode this CPU lacks.
    manifest = built[0] / libbuild.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "cpu": "another"}))
    status = json.loads(run_cli("engine", "--json", env=env).stdout)
    assert not status["library"] and "not built yet" in status["reason"], status


def test_the_engine_is_trained_on_the_example_guests(sdist: Path) -> None:
    """The default build is profile-guided (training.py): every training guest booted on the
    instrumented engine, which wrote a profile for each of its source files that ran."""
    from vmmarch_cli.backends.emulate import training

    status = json.loads(run_cli("engine", "--json", env={"VMMARCH_ENGINE": "",
                                                          "LIBUNICORN_PATH": ""}).stdout)
    assert status["kind"] == "engine" and status["built"] is not None, status
    profile = status["built"]["profile"]
    if training.requested() is training.Mode.OFF:  # this run asked for an untrained engine
        assert profile == f"untrained ({training.VARIABLE}=off)", profile
        return
    assert profile.startswith(f"trained on {len(training.GUESTS)} example guests in "), profile
    assert "did not finish" not in profile, profile
    assert int(profile.split("(", 1)[1].split()[0]) >= 40, profile  # ~60 of 75 files ran


def test_training_needs_the_guests_binutils_and_gcc_10(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmarch_cli.backends.emulate import training

    def compiler(name: str, *macros: str) -> str:
        """A compiler whose -dM -E prints ``macros``, as GCC and clang print theirs."""
        path = tmp_path / name
        path.write_text("#!/bin/sh\n" + "".join(f"echo '#define {m}'\n" for m in macros))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return str(path)

    gcc12, gcc9 = compiler("gcc12", "__GNUC__ 12"), compiler("gcc9", "__GNUC__ 9")
    clang = compiler("clang", "__GNUC__ 4", "__clang__ 1")
    assert training.unavailable(gcc12) == ""
    assert training.unavailable(gcc9) == f"{gcc9} is GCC 9; training needs GCC 10 or newer"
    assert training.unavailable(clang) == f"{clang} is not GCC (the profile files are GCC's)"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no as, no ld
    assert training.unavailable(gcc12).startswith("as (GNU binutils) is not installed")
    monkeypatch.setattr(training, "EXAMPLES", tmp_path)
    assert "example guests are not installed" in training.unavailable(gcc12)


def test_engine_reports_the_patches_and_clean_empties_the_cache(tmp_path: Path,
                                                                sdist: Path) -> None:
    from vmmarch_cli.backends.emulate import libbuild

    env = _cache(tmp_path, sdist)
    p = run_cli("engine", env=env)
    assert p.returncode == 0
    assert "not built yet" in p.stdout
    for patch in libbuild.series():
        assert patch.name in p.stdout
    forced = json.loads(run_cli("engine", "--json", env={**env, "VMMARCH_ENGINE": "wheel"})
                        .stdout)
    assert forced["kind"] == "wheel" and forced["reason"] == "VMMARCH_ENGINE=wheel"
    removed = run_cli("engine", "clean", env=env)
    assert removed.returncode == 0 and libbuild.SDIST_NAME in removed.stdout
    assert not list(Path(env["VMMARCH_CACHE"], "engine").glob("unicorn-*"))


def test_the_layout_the_engine_tells_is_the_one_a_search_finds() -> None:
    """Patch 0009: vmmarch_layout() against the planted-value search the wheel needs."""
    from vmmarch_cli.backends.emulate import binding, library, native

    assert binding.Uc is not None  # the binding is loaded: the library is chosen
    if library.chosen() is None or not hasattr(library.loaded_library(), "vmmarch_layout"):
        pytest.skip("this process runs on a library without patch 0009 (VMMARCH_ENGINE=wheel)")
    told = native.layout()
    # The search finds uc_struct.no_exit_request per instance, not once (None in its layout),
    # and cannot find the TSC offset (the test below checks that one by running RDTSC).
    # Searched up to the end of the debug registers the engine told: its CPU state is larger
    # than the wheel's, and reading past it could leave its mapping.
    scanned = native._scanned_layout(span=told.dr + 8 * len(native._DR_MARKS))
    assert replace(scanned, no_exit_request=told.no_exit_request,
                   tsc_offset=told.tsc_offset) == told


def test_the_tsc_offset_the_engine_tells_is_the_one_rdtsc_adds() -> None:
    """Patch 0009's tsc_offset: a guest's RDTSC is the host's TSC plus the field it names."""
    from vmmarch_cli.backends.emulate import binding, library, native
    from vmmarch_cli.backends.emulate.hosttsc import HostTsc

    assert binding.Uc is not None
    if library.chosen() is None or not hasattr(library.loaded_library(), "vmmarch_layout"):
        pytest.skip("this process runs on a library without patch 0009 (VMMARCH_ENGINE=wheel)")
    uc = binding.Uc(binding.uc_const.UC_ARCH_X86, binding.uc_const.UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, bytes.fromhex("0f31"))  # rdtsc
    offset = native.tsc_offset(uc)
    assert offset is not None
    shift = 1 << 62
    offset.value = shift
    host = HostTsc()
    before = host.read()
    uc.emu_start(0x1000, 0x1002)
    after = host.read()
    guest = (int(uc.reg_read(binding.x86.UC_X86_REG_RDX)) << 32) | (
        int(uc.reg_read(binding.x86.UC_X86_REG_RAX)) & 0xFFFF_FFFF)
    assert before + shift <= guest <= after + shift
