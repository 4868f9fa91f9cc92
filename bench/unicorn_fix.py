"""``python -m bench.unicorn_fix``: build unicorn with its store slow path fixed, to measure it.

Why: unicorn 2.1.4 keeps every guest store to a page that the guest maps executable on its
slow path (``notdirty_write`` in ``qemu/accel/tcg/cputlb.c`` never marks such a TLB entry
dirty; its dirty-memory bitmap is stubbed out, so it cannot tell pages holding translated
code from the rest). Linux maps its own .data and .bss executable until ``mark_rodata_ro``,
so a whole boot pays it: ``clear_bss`` alone (``rep stosb`` over 5.5 MiB) takes ~180 ms of a
2 s boot here. QEMU, which unicorn forks, lets such stores go fast once the page holds no code.

This builds unicorn from its own source distribution on PyPI (the version installed here,
checked by hash) with QEMU's rule put back, in three edits:

* ``notdirty_write``: a TLB entry is marked dirty (taken off the slow path) when the physical
  page holds no translated code (unicorn's ``PageDesc.first_tb``), whether the guest maps the
  page executable or not (unicorn: only when it does not, and then even if the page holds
  code);
* ``tlb_protect_code`` (called when a page gets its first translated block): every TLB entry
  mapping that page goes back to the slow path, whatever its virtual address, as
  ``tlb_reset_dirty_range_all`` does in QEMU;
* the helper the first edit calls, in ``translate-all.c`` (and its prototype in cputlb.c).

The library is for measurement (``python -m bench --libunicorn DIR``); vmm-arch itself uses
the unicorn wheel. Before printing the library's directory the builder runs three checks
against both libraries, each in a process of its own: ``rep stosb`` over 8 MiB (the speed), a
guest that patches two functions in the page it runs from, and a paged guest that patches a
function through a second, non-executable mapping of its page (self-modifying code must still
be seen; the wheel misses the second case, see ``check``).
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

from bench.inputs import LIBUNICORN_NAME, WORK_DIR, libunicorn_env

VERSION = "2.1.4"
#: sha256 of PyPI's unicorn-2.1.4.tar.gz (the sdist the 2.1.4 wheels are built from).
SDIST_SHA256 = "00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff"
UNICORN_DIR = WORK_DIR / "unicorn"
LIB_NAME = LIBUNICORN_NAME

CPUTLB = "qemu/accel/tcg/cputlb.c"
TRANSLATE_ALL = "qemu/accel/tcg/translate-all.c"
#: (file under src/, text that must occur exactly once, its replacement)
EDITS: tuple[tuple[str, str, str], ...] = (
    (CPUTLB,
     "            !(tlbe->addr_code != -1) &&\n",
     "            !vmmarch_page_has_code(cpu->uc, ram_addr) &&\n"),
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


def _edits_hash() -> str:
    return hashlib.sha256(repr((VERSION, EDITS)).encode()).hexdigest()


def _extract(tarball: Path, into: Path) -> None:
    with tarfile.open(tarball) as tar:
        if sys.version_info >= (3, 11, 4):
            tar.extractall(into, filter="data")
        else:  # the "data" filter came in 3.11.4; the tarball's hash is checked already
            tar.extractall(into)


def build(work: Path = UNICORN_DIR) -> Path:
    """Build the fixed library once; returns the directory holding ``libunicorn.so.2``."""
    installed = metadata.version("unicorn")
    if installed != VERSION:
        raise BuildError(f"the edits are for unicorn {VERSION}; {installed} is installed")
    lib_dir = work / "lib"
    stamp = lib_dir / "edits.sha256"  # a library built from other edits is built again
    if (lib_dir / LIB_NAME).exists() and stamp.is_file() and stamp.read_text() == _edits_hash():
        return lib_dir
    for tool in ("cmake", "cc"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is needed to build unicorn (apt-get install cmake gcc)")
    work.mkdir(parents=True, exist_ok=True)
    tarball = _sdist(work)
    tree = work / f"unicorn-{VERSION}"
    shutil.rmtree(tree, ignore_errors=True)
    _extract(tarball, work)
    src = tree / "src"
    _edit(src)
    log = work / "build.log"
    log.unlink(missing_ok=True)
    started = time.monotonic()
    _say(f"building (x86 only, log in {log}); under a minute on two cores")
    _run(["cmake", "-S", str(src), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release",
          "-DUNICORN_ARCH=x86", "-DUNICORN_BUILD_TESTS=off"], src, log)
    _run(["cmake", "--build", str(tree / "build"), f"-j{os.cpu_count() or 1}"], src, log)
    lib_dir.mkdir(exist_ok=True)
    shutil.copy2(tree / "build" / LIB_NAME, lib_dir / LIB_NAME)
    stamp.write_text(_edits_hash())
    _say(f"built in {time.monotonic() - started:.0f} s")
    return lib_dir


# -- the checks, run in a child process per library (unicorn loads its library on import) --

CODE, STACK, DATA = 0x10000, 0x20000, 0x100000
A, B = CODE + 0x100, CODE + 0x200
STOSB_BYTES = 8 << 20
#: The paged guest: page tables at 0x1000-0x3fff, 2 MiB pages (SDM vol. 3A 4.5).
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
ALIASED = 0x200000  # the physical 2 MiB page mapped twice
EXEC_VIEW, NX_VIEW = 0x400000, 0x600000
PTE_P_RW, PTE_PS, PTE_NX = 0x3, 1 << 7, 1 << 63
CR0_PE, CR0_PG, CR4_PAE = 1, 1 << 31, 1 << 5
MSR_EFER, EFER_LME, EFER_LMA, EFER_NXE = 0xC000_0080, 1 << 8, 1 << 10, 1 << 11
RESULTS = ("smc_same_page", "smc_alias")
EXPECTED = {"smc_same_page": [0x11, 0x33, 0x22, 0x44], "smc_alias": [0x11, 0x22]}


def _call(at: int, target: int) -> bytes:
    return b"\xe8" + (target - (at + 5)).to_bytes(4, "little", signed=True)  # call rel32


def _mov_rax_to(register: int) -> bytes:
    return bytes([0x49, 0x89, 0xC0 + register - 8])  # mov r8+n, rax


def _store_byte(address: int, value: int) -> bytes:
    return b"\xc6\x04\x25" + address.to_bytes(4, "little") + bytes([value])  # mov [abs32], imm8


def _function(value: int) -> bytes:
    return b"\xb8" + value.to_bytes(4, "little") + b"\xc3"  # mov eax, imm32; ret


def _same_page_guest() -> tuple[bytes, int]:
    """Main at CODE calls A and B (each ``mov eax, imm32; ret`` in the same page), patches
    both immediates (two stores in one block: nothing is translated between them), then calls
    A and B again; r8..r11 hold the four results. A library that lets the page's TLB entry go
    fast after the first store, while B's code is still translated, returns B's old value."""
    code = _call(CODE, A) + _mov_rax_to(8)
    code += _call(CODE + len(code), B) + _mov_rax_to(9)
    code += _store_byte(A + 1, 0x22) + _store_byte(B + 1, 0x44)
    code += _call(CODE + len(code), A) + _mov_rax_to(10)
    code += _call(CODE + len(code), B) + _mov_rax_to(11)
    page = bytearray(0x1000)
    page[: len(code)] = code
    page[A - CODE: A - CODE + 6] = _function(0x11)
    page[B - CODE: B - CODE + 6] = _function(0x33)
    return bytes(page), CODE + len(code)


def _alias_guest() -> tuple[bytes, int]:
    """With paging on, one physical page is mapped at EXEC_VIEW and, non-executable, at
    NX_VIEW (as Linux's text_poke writes code through a second mapping). Main stores through
    NX_VIEW while the page holds no code, calls the function through EXEC_VIEW, patches it
    through NX_VIEW and calls it again; r8, r9 hold the two results. A library that sends only
    the executing address back to the slow path when the page gets code (unicorn's
    ``tlb_reset_dirty_by_vaddr``) misses the patch."""
    f = 0x100
    code = _store_byte(NX_VIEW + f + 1, 0x11)
    code += _call(CODE + len(code), EXEC_VIEW + f) + _mov_rax_to(8)
    code += _store_byte(NX_VIEW + f + 1, 0x22)
    code += _call(CODE + len(code), EXEC_VIEW + f) + _mov_rax_to(9)
    return code, CODE + len(code)


def _check_smc(paged: bool) -> list[int]:
    from unicorn import unicorn_const
    from unicorn import x86_const as x86

    from backends.emulate.engine import Uc

    uc = Uc(unicorn_const.UC_ARCH_X86, unicorn_const.UC_MODE_64)
    uc.mem_map(0, 0x400000)  # page tables, CODE, STACK and the aliased page
    uc.reg_write(x86.UC_X86_REG_RSP, STACK + 0x800)
    if not paged:
        code, end = _same_page_guest()
        uc.mem_write(CODE, code)
        uc.emu_start(CODE, end)
        return [int(uc.reg_read(r)) for r in (x86.UC_X86_REG_R8, x86.UC_X86_REG_R9,
                                              x86.UC_X86_REG_R10, x86.UC_X86_REG_R11)]
    code, end = _alias_guest()
    uc.mem_write(CODE, code)
    uc.mem_write(ALIASED + 0x100, _function(0x11))
    uc.mem_write(PML4, (PDPT | PTE_P_RW).to_bytes(8, "little"))
    uc.mem_write(PDPT, (PD | PTE_P_RW).to_bytes(8, "little"))
    for index, entry in ((0, 0), (EXEC_VIEW >> 21, ALIASED),
                         (NX_VIEW >> 21, ALIASED | PTE_NX)):
        uc.mem_write(PD + index * 8, (entry | PTE_P_RW | PTE_PS).to_bytes(8, "little"))
    uc.reg_write(x86.UC_X86_REG_CR3, PML4)
    uc.reg_write(x86.UC_X86_REG_CR4, CR4_PAE)
    uc.msr_write(MSR_EFER, EFER_LME | EFER_LMA | EFER_NXE)
    uc.reg_write(x86.UC_X86_REG_CR0, CR0_PE | CR0_PG)
    uc.emu_start(CODE, end)
    return [int(uc.reg_read(r)) for r in (x86.UC_X86_REG_R8, x86.UC_X86_REG_R9)]


def _check_stosb() -> float:
    """ns per byte of ``rep stosb`` over 8 MiB, as Linux's clear_bss (paging off: every page
    is executable to unicorn's TLB), best of three."""
    from unicorn import unicorn_const
    from unicorn import x86_const as x86

    from backends.emulate.engine import Uc

    uc = Uc(unicorn_const.UC_ARCH_X86, unicorn_const.UC_MODE_64)
    uc.mem_map(CODE, 0x1000)
    uc.mem_map(DATA, STOSB_BYTES)
    stos = bytes.fromhex("31c0" "f3aa")  # xor eax, eax; rep stosb
    uc.mem_write(CODE, stos)
    best = float("inf")
    for _ in range(3):
        uc.reg_write(x86.UC_X86_REG_RDI, DATA)
        uc.reg_write(x86.UC_X86_REG_RCX, STOSB_BYTES)
        t0 = time.perf_counter()
        uc.emu_start(CODE, CODE + len(stos))
        best = min(best, time.perf_counter() - t0)
    return round(best / STOSB_BYTES * 1e9, 2)


def _check() -> dict[str, object]:
    from backends.emulate import unicorn_library

    return {"library": unicorn_library(), "smc_same_page": _check_smc(paged=False),
            "smc_alias": _check_smc(paged=True), "stosb_ns_per_byte": _check_stosb()}


def check(lib_dir: Path | None) -> dict[str, object]:
    """The checks with ``lib_dir``'s library, or the wheel's when None: the library loaded,
    each self-modifying-code guest's results (``EXPECTED`` when the change was seen), and
    ``rep stosb``'s cost. The unicorn 2.1.4 wheel misses the alias case: a store through a
    non-executable mapping takes that entry off the slow path for good (``notdirty_write``),
    and translating the page later protects only the executing address."""
    done = subprocess.run([sys.executable, "-m", "bench.unicorn_fix", "--check-only"],
                          capture_output=True, text=True, env=libunicorn_env(lib_dir),
                          check=False,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise BuildError(f"the check failed: {done.stderr.strip()[-500:]}")
    result: dict[str, object] = json.loads(done.stdout)
    if lib_dir is not None and Path(str(result["library"])) != lib_dir / LIB_NAME:
        # unicorn's binding falls back to the wheel's library when the given one fails to load
        raise BuildError(f"{lib_dir / LIB_NAME} did not load (got {result['library']})")
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
        seen = ", ".join(f"{k} {'seen' if got[k] == EXPECTED[k] else 'MISSED'}" for k in RESULTS)
        _say(f"{name}: rep stosb {got['stosb_ns_per_byte']} ns/byte; self-modifying code: {seen}")
    if any(fixed[k] != EXPECTED[k] for k in RESULTS):
        _say("the fixed library misses self-modifying code: not using it")
        return 1
    if not float(str(fixed["stosb_ns_per_byte"])) * 3 < float(str(wheel["stosb_ns_per_byte"])):
        _say("the fixed library is not faster than the wheel: not using it")
        return 1
    print(lib_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
