"""``vmm-arch inspect``: what a kernel image is and how ``boot`` would start it."""

from __future__ import annotations

import json
import mmap
import re
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from vmmarch_cli import backends, files, loader
from vmmarch_cli.arch.x86_64 import boot_params
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.commands import options
from vmmarch_cli.errors import BackendUnavailableError, BadInputError
from vmmarch_cli.loader import KernelFormat
from vmmarch_cli.loader.host_decompress import Decompress
from vmmarch_cli.machine import choose_decompression, choose_protocol
from vmmarch_cli.render import kv_table

#: Setup-header fields shown, with what each means (Documentation/arch/x86/boot.rst).
HEADER_FIELDS = {
    "setup_sects": "512-byte setup sectors after the boot sector",
    "version": "boot protocol version",
    "loadflags": "bit 0 LOADED_HIGH: protected-mode code at 0x100000",
    "code32_start": "where the protected-mode code is loaded",
    "kernel_alignment": "physical alignment a relocatable kernel needs",
    "relocatable_kernel": "1: may be loaded at any aligned address",
    "xloadflags": "bit 0 XLF_KERNEL_64: 64-bit entry at load + 0x200",
    "cmdline_size": "longest command line the kernel accepts (without the NUL)",
    "initrd_addr_max": "highest address the initrd may occupy",
    "pref_address": "preferred load address",
    "init_size": "bytes the kernel needs from its aligned load address while booting",
    "payload_offset": "compressed vmlinux, from the start of the protected-mode code",
    "payload_length": "length of the compressed vmlinux",
}
LINUX_VERSION = re.compile(rb"Linux version (\S+)[^\0\n]*")


def _version(path: Path, image: loader.ParsedKernel) -> str | None:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if image.bzimage is not None and image.size >= boot_params.end_of("kernel_version"):
            pointer = boot_params.get(m[: boot_params.end_of("kernel_version")], "kernel_version")
            start = boot_params.JUMP_BASE + pointer
            if pointer and start < image.size:
                end = m.find(b"\0", start, start + 256)
                text = m[start : end if end > 0 else start + 256]
                return text.decode(errors="replace")
        found = LINUX_VERSION.search(m)
        return found.group(0).decode(errors="replace") if found else None


def describe(path: Path, backend: str = "auto",
             decompress: Decompress = Decompress.AUTO) -> dict[str, Any]:
    """The image's facts, and what ``boot --backend BACKEND --decompress DECOMPRESS`` would do
    with it: for a bzImage the host decompresses, the vmlinux it boots (decompressed now and
    cached, as boot would)."""
    parsed = loader.parse_kernel(path, describe_only=True)
    booted, unknown = parsed, ""
    if parsed.bzimage is not None:
        try:
            name = backends.resolve(backend).name
        except BackendUnavailableError as exc:
            unknown = f"auto depends on the backend, and none is usable here: {exc}"
        else:
            plan = choose_decompression(decompress, name,
                                        lambda: backends.runs_ring0_in_hardware(name))
            booted = loader.parse_kernel(path, plan)
    k = booted.image
    offered = [BootProtocol.LINUX64] + ([BootProtocol.PVH] if k.pvh_entry is not None else [])
    picked, entry = choose_protocol(k, None)
    doc: dict[str, Any] = {
        "path": str(path),
        "format": k.format,
        "size": parsed.size,
        "version": _version(path, parsed),
        "boot_protocols": offered,
        "boot_picks": picked,
        "entry_64bit": f"{parsed.image.entry:#x}",
        "pvh_entry": f"{k.pvh_entry:#x}" if k.pvh_entry is not None else None,
        "load_range": [f"{k.load_start:#x}", f"{k.load_end:#x}"],
        "memory_needed_mib": -(-k.load_end // (1 << 20)),
        "cmdline_max": k.cmdline_max - 1,
        "initrd_addr_max": f"{k.initrd_addr_max:#x}",
        "picked_entry": f"{entry:#x}",
        # Why `boot` would refuse the image, or null.
        "not_bootable": parsed.elf.unbootable if parsed.elf is not None else None,
    }
    if parsed.elf is not None:
        doc["segments"] = [
            {"paddr": f"{s.paddr:#x}", "vaddr": f"{s.vaddr:#x}", "filesz": f"{s.filesz:#x}",
             "memsz": f"{s.memsz:#x}",
             "flags": "".join(c for c, bit in (("R", 4), ("W", 2), ("X", 1)) if s.flags & bit)}
            for s in parsed.elf.segments
        ]
    if parsed.bzimage is not None:
        from vmmarch_cli.loader.bzimage_payload import payload_of
        from vmmarch_cli.loader.decompress import detect

        bz = parsed.bzimage
        doc["setup_header"] = {
            name: {"value": f"{bz.header.get(name):#x}", "meaning": meaning}
            for name, meaning in HEADER_FIELDS.items()
        }
        try:
            doc["payload_compression"] = detect(payload_of(path.read_bytes()))
        except BadInputError:
            doc["payload_compression"] = None  # no format known here: boot lets the guest try
        d = k.decompression
        doc["decompress"] = (d.as_json() if d is not None and not unknown else
                             {"requested": str(decompress), "where": None, "why": unknown})
        if d is not None and not unknown:
            doc["decompress"]["summary"] = d.describe()
    return doc


@click.command("inspect")
@click.argument("kernel", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--extract-vmlinux", "extract", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the ELF vmlinux inside a bzImage to this file.")
@options.backend_option
@options.decompress_option
def inspect_command(kernel: Path, as_json: bool, extract: Path | None, backend: str,
                    decompress: str) -> None:
    """Show what KERNEL is (detected from its bytes) and how `vmm-arch boot` would start it:
    format, version, boot protocols offered and the one picked, entry points, load segments,
    the PVH note, setup-header fields with their meaning, payload compression, memory needed.

    For a bzImage it also says who would decompress the payload, given --backend and
    --decompress as boot takes them; a payload the host would decompress is decompressed and
    cached now, as boot would.
    """
    doc = describe(kernel, backend, Decompress(decompress))
    if extract is not None:
        if doc["format"] != KernelFormat.BZIMAGE:
            raise click.UsageError("--extract-vmlinux needs a bzImage")
        from vmmarch_cli.loader.bzimage_payload import extract_vmlinux

        data = extract_vmlinux(kernel.read_bytes())
        try:
            files.write_atomic(extract, data)
        except OSError as exc:
            raise files.output_error(extract, exc) from None
        doc["extracted"] = {"path": str(extract), "size": len(data)}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    out = Console(highlight=False)
    scalars = {k: str(v) for k, v in doc.items()
               if not isinstance(v, (dict, list)) and k != "not_bootable"}
    scalars["boot_protocols"] = ", ".join(doc["boot_protocols"])
    scalars["load_range"] = " - ".join(doc["load_range"])
    out.print(kv_table(f"{kernel}", scalars))
    if "segments" in doc:
        rows = [(s["paddr"], f"vaddr {s['vaddr']} filesz {s['filesz']} memsz {s['memsz']} "
                 f"{s['flags']}") for s in doc["segments"]]
        out.print(kv_table("PT_LOAD segments (paddr)", rows))
    if "setup_header" in doc:
        rows = [(n, f"{f['value']:>12}  {f['meaning']}") for n, f in doc["setup_header"].items()]
        out.print(kv_table("setup header", rows))
    if "decompress" in doc:
        d = doc["decompress"]
        rows = [("boot would", d.get("summary") or f"decide at boot ({d['why']})")]
        if d.get("fallback"):
            rows.append(("host cannot", d["fallback"]))
        if d.get("vmlinux"):
            rows.append(("cached vmlinux", d["vmlinux"]))
        out.print(kv_table(f"decompression (--backend {backend} --decompress {decompress})",
                           rows))
    if doc["not_bootable"]:
        out.print(f"not bootable: {doc['not_bootable']}")
    if "extracted" in doc:
        out.print(f"wrote {doc['extracted']['size']} bytes to {doc['extracted']['path']}")
