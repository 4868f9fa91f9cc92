"""``python -m bench.unicorn_fix``: build unicorn with its store slow path fixed, to measure it.

Why: unicorn 2.1.4 keeps every guest store to a page that the guest maps executable on its
slow path (``notdirty_write`` in ``qemu/accel/tcg/cputlb.c`` never marks such a TLB entry
dirty; its dirty-memory bitmap is stubbed out, so it cannot tell pages holding translated
code from the rest). Linux maps its own .data and .bss executable until ``mark_rodata_ro``,
so a whole boot pays it: ``clear_bss`` alone (``rep stosb`` over 5.5 MiB) takes ~180 ms of a
2 s boot here. QEMU, which unicorn forks, lets such stores go fast once the page holds no code.

This builds unicorn from its own source distribution on PyPI (the version installed here,
checked by hash) with QEMU's rule put back, in three edits:

* ``notdirty_write``: an executable TLB entry may be marked dirty too, when the physical page
  holds no translated code (unicorn's ``PageDesc.first_tb``);
* ``tlb_protect_code`` (called when a page gets its first translated block): every TLB entry
  mapping that page goes back to the slow path, whatever its virtual address, as
  ``tlb_reset_dirty_range_all`` does in QEMU;
* a small helper for the first edit in ``translate-all.c``.

The library is for measurement (``python -m bench --libunicorn DIR``); vmm-arch itself uses
the unicorn wheel. Before printing the library's directory the builder runs two checks
against both libraries: ``rep stosb`` over 8 MiB (the speed) and a guest that patches two
functions in the page it runs from (self-modifying code must still be seen).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

from bench.inputs import WORK_DIR

VERSION = "2.1.4"
#: sha256 of PyPI's unicorn-2.1.4.tar.gz (the sdist the 2.1.4 wheels are built from).
SDIST_SHA256 = "00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff"
UNICORN_DIR = WORK_DIR / "unicorn"
LIB_NAME = "libunicorn.so.2"

CPUTLB = "qemu/accel/tcg/cputlb.c"
TRANSLATE_ALL = "qemu/accel/tcg/translate-all.c"
#: (file under src/, text that must occur exactly once, its replacement)
EDITS: tuple[tuple[str, str, str], ...] = (
    (CPUTLB,
     "            !(tlbe->addr_code != -1) &&\n",
     "            (tlbe->addr_code == -1 || !vmmarch_page_has_code(cpu->uc, ram_addr)) &&\n"),
    (CPUTLB,
     "static void notdirty_write(",
     "bool vmmarch_page_has_code(struct uc_struct *uc, ram_addr_t ram_addr);\n\n"
     "static void notdirty_write("),
    (CPUTLB,
     "    cpu_physical_memory_test_and_clear_dirty(ram_addr, TARGET_PAGE_SIZE,\n"
     "                                             DIRTY_MEMORY_CODE);\n",
     "    uintptr_t host = (uintptr_t)qemu_map_ram_ptr(uc, NULL, ram_addr & TARGET_PAGE_MASK);\n"
     "    tlb_reset_dirty(uc->cpu, host, TARGET_PAGE_SIZE);\n"),
    (TRANSLATE_ALL,
     "/* user-mode: call with mmap_lock held */\nvoid tb_check_watchpoint(",
     "bool vmmarch_page_has_code(struct uc_struct *uc, ram_addr_t ram_addr);\n"
     "bool vmmarch_page_has_code(struct uc_struct *uc, ram_addr_t ram_addr)\n"
     "{\n"
     "    PageDesc *p = page_find(uc, ram_addr >> TARGET_PAGE_BITS);\n"
     "    return p != NULL && p->first_tb != 0;\n"
     "}\n\n"
     "/* user-mode: call with mmap_lock held */\nvoid tb_check_watchpoint("),
)


class BuildError(Exception):
    """A step of the build failed; the message says which and why."""


def _say(message: str) -> None:
    print(f"unicorn_fix: {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], cwd: Path, log: Path) -> None:
    with log.open("ab") as out:
        done = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(argv[:3])} ... failed ({done.returncode}); see {log}")


def _sdist(work: Path) -> Path:
    tarball = work / f"unicorn-{VERSION}.tar.gz"
    if not tarball.exists():
        _say(f"downloading unicorn {VERSION}'s source from PyPI")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
              "--no-deps", f"unicorn=={VERSION}", "-d", str(work)], work, work / "pip.log")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise BuildError(f"{tarball}: sha256 {digest}, expected {SDIST_SHA256}")
    return tarball


def _edit(src: Path) -> None:
    for name, old, new in EDITS:
        path = src / name
        text = path.read_text()
        if text.count(old) != 1:
            raise BuildError(f"{path}: expected exactly one {old.strip()[:40]!r}")
        path.write_text(text.replace(old, new))


def build(work: Path = UNICORN_DIR) -> Path:
    """Build the fixed library once; returns the directory holding ``libunicorn.so.2``."""
    installed = metadata.version("unicorn")
    if installed != VERSION:
        raise BuildError(f"the edits are for unicorn {VERSION}; {installed} is installed")
    lib_dir = work / "lib"
    if (lib_dir / LIB_NAME).exists():
        return lib_dir
    for tool in ("cmake", "cc"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is needed to build unicorn (apt-get install cmake gcc)")
    work.mkdir(parents=True, exist_ok=True)
    tarball = _sdist(work)
    tree = work / f"unicorn-{VERSION}"
    shutil.rmtree(tree, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(work, filter="data")
    src = tree / "src"
    _edit(src)
    log = work / "build.log"
    log.unlink(missing_ok=True)
    started = time.monotonic()
    _say(f"building (x86 only, log in {log}); a few minutes on two cores")
    _run(["cmake", "-S", str(src), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release",
          "-DUNICORN_ARCH=x86", "-DUNICORN_BUILD_TESTS=off"], src, log)
    _run(["cmake", "--build", str(tree / "build"), f"-j{os.cpu_count() or 1}"], src, log)
    lib_dir.mkdir(exist_ok=True)
    shutil.copy2(tree / "build" / LIB_NAME, lib_dir / LIB_NAME)
    _say(f"built in {time.monotonic() - started:.0f} s")
    return lib_dir


# -- the checks, run in a child process per library (unicorn loads its library on import) --

CODE, STACK, DATA = 0x10000, 0x20000, 0x100000
A, B = CODE + 0x100, CODE + 0x200
STOSB_BYTES = 8 << 20


def _call(at: int, target: int) -> bytes:
    return b"\xe8" + (target - (at + 5)).to_bytes(4, "little", signed=True)  # call rel32


def _smc_guest() -> tuple[bytes, int]:
    """Main at CODE calls A and B (each ``mov eax, imm32; ret`` in the same page), patches
    both immediates (two stores in one block: nothing is translated between them), then calls
    A and B again; r8..r11 hold the four results. A library that lets the page's TLB entry go
    fast after the first store, while B's code is still translated, returns B's old value."""
    code = bytearray()
    for step in ("A", "r8", "B", "r9", "patchA", "patchB", "A", "r10", "B", "r11"):
        at = CODE + len(code)
        if step in ("A", "B"):
            code += _call(at, A if step == "A" else B)
        elif step.startswith("r"):
            code += bytes([0x49, 0x89, 0xC0 + int(step[1:]) - 8])  # mov r8+n, rax
        else:  # mov byte [abs32 X+1], new immediate
            target, value = (A, 0x22) if step == "patchA" else (B, 0x44)
            code += b"\xc6\x04\x25" + (target + 1).to_bytes(4, "little") + bytes([value])
    end = CODE + len(code)
    page = bytearray(0x1000)
    page[: len(code)] = code
    page[A - CODE: A - CODE + 6] = b"\xb8\x11\x00\x00\x00\xc3"  # mov eax, 0x11; ret
    page[B - CODE: B - CODE + 6] = b"\xb8\x33\x00\x00\x00\xc3"  # mov eax, 0x33; ret
    return bytes(page), end


def _check() -> dict[str, object]:
    from unicorn import unicorn_const
    from unicorn import x86_const as x86

    from backends.emulate.engine import Uc

    uc = Uc(unicorn_const.UC_ARCH_X86, unicorn_const.UC_MODE_64)
    uc.mem_map(CODE, 0x1000)
    uc.mem_map(STACK, 0x1000)
    uc.mem_map(DATA, STOSB_BYTES)
    page, end = _smc_guest()
    uc.mem_write(CODE, page)
    uc.reg_write(x86.UC_X86_REG_RSP, STACK + 0x800)
    uc.emu_start(CODE, end)
    results = [int(uc.reg_read(r)) for r in (x86.UC_X86_REG_R8, x86.UC_X86_REG_R9,
                                             x86.UC_X86_REG_R10, x86.UC_X86_REG_R11)]
    # rep stosb over DATA, as Linux's clear_bss does (paging is off: every page executable)
    stos = bytes.fromhex("31c0" "f3aa")  # xor eax, eax; rep stosb
    uc.mem_write(CODE + 0x800, stos)
    best = float("inf")
    for _ in range(3):
        uc.reg_write(x86.UC_X86_REG_RDI, DATA)
        uc.reg_write(x86.UC_X86_REG_RCX, STOSB_BYTES)
        t0 = time.perf_counter()
        uc.emu_start(CODE + 0x800, CODE + 0x800 + len(stos))
        best = min(best, time.perf_counter() - t0)
    return {"smc": results, "smc_ok": results == [0x11, 0x33, 0x22, 0x44],
            "stosb_ns_per_byte": round(best / STOSB_BYTES * 1e9, 2)}


def check(lib_dir: Path | None) -> dict[str, object]:
    """Run the checks with ``lib_dir``'s library, or the wheel's when None."""
    env = {k: v for k, v in os.environ.items() if k != "LIBUNICORN_PATH"}
    if lib_dir is not None:
        env["LIBUNICORN_PATH"] = str(lib_dir)
    done = subprocess.run([sys.executable, "-m", "bench.unicorn_fix", "--check-only"],
                          capture_output=True, text=True, env=env, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise BuildError(f"the check failed: {done.stderr.strip()[-500:]}")
    result: dict[str, object] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unicorn_fix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.check_only:
        print(json.dumps(_check()))
        return 0
    try:
        lib_dir = build()
        wheel, fixed = check(None), check(lib_dir)
    except BuildError as e:
        _say(str(e))
        return 1
    for name, got in (("wheel", wheel), ("fixed", fixed)):
        _say(f"{name}: rep stosb {got['stosb_ns_per_byte']} ns/byte, self-modifying code "
             f"{'seen' if got['smc_ok'] else 'MISSED ' + str(got['smc'])}")
    if not fixed["smc_ok"]:
        _say("the fixed library misses self-modifying code: not using it")
        return 1
    print(lib_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
