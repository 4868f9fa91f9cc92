"""ELF64 x86_64 kernels (vmlinux): validate, then load PT_LOAD segments at their physical address.

Headers are parsed with pyelftools' declared structures (``ELFStructs``: the ELF header and the
program headers are all a kernel load needs; its ``ELFFile`` reader, with sections, DWARF and
the rest, doubles the import, 24 ms against 14 ms here, on every boot). Every segment is checked
against the file and against guest memory before the first byte is written (ELF-64 Object File
Format 1.5, "Program header table"). Segment bytes go straight from the file into guest memory
(``readinto`` a view, no copy). A boot reads the headers of a file it has booted before from the
cache instead (elf_headers.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedIOBase
from typing import BinaryIO

from vmmarch_cli.arch.x86_64 import layout
from vmmarch_cli.loader import errors
from vmmarch_cli.loader.elf64 import ELF_MAGIC, ELFCLASS64, ELFDATA2LSB, Elf64ProgramHeader
from vmmarch_cli.vcpu import GuestMemory

PHDR64_SIZE = Elf64ProgramHeader.sizeof()
#: include/xen/interface/elfnote.h: the 32-bit physical entry point of a PVH kernel.
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen\0"
NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type (ELF spec "Note Section")


@dataclass(frozen=True)
class LoadSegment:
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfInfo:
    entry: int  # physical: where the 64-bit boot jumps
    segments: tuple[LoadSegment, ...]
    pvh_entry: int | None

    @property
    def load_start(self) -> int:
        return min((s.paddr for s in self.segments), default=self.entry)

    @property
    def load_end(self) -> int:
        return max((s.end for s in self.segments), default=self.entry)

    @property
    def unbootable(self) -> str | None:
        """Why ``boot`` refuses this well-formed ELF (``inspect`` still describes it)."""
        if not self.segments:
            return "no PT_LOAD segment to load"
        if not any(s.paddr <= self.entry < s.end for s in self.segments):
            return f"entry point {self.entry:#x} is outside every loadable segment"
        return None


def require_bootable(info: ElfInfo, name: str) -> None:
    """Raise the error ``boot`` gives for ``info.unbootable``."""
    reason = info.unbootable
    if reason is None:
        return
    error = errors.NoLoadableSegments if not info.segments else errors.InvalidEntryAddress
    raise error(f"{name}: {reason}")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse(f: BinaryIO, size: int, name: str) -> ElfInfo:
    """Validate an ELF64 x86_64 kernel's headers and describe it; reads headers only. Whether
    it can boot is ``ElfInfo.unbootable`` (``require_bootable``)."""
    ident = f.read(16)
    f.seek(0)
    if len(ident) < 16 or ident[:4] != ELF_MAGIC:
        raise errors.UnknownKernelFormat(f"{name}: not an ELF file")
    if ident[4] != ELFCLASS64:
        raise errors.InvalidElfClass(f"{name}: ELF class {ident[4]} is not ELF64; "
                                     "an x86_64 kernel is a 64-bit ELF")
    if ident[5] != ELFDATA2LSB:
        raise errors.BigEndianElfOnLittle(f"{name}: big-endian ELF, not an x86 kernel")
    # Here, not at the top: a boot that finds the headers in the cache (elf_headers.py) never
    # imports pyelftools (~20 ms).
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError
    from elftools.elf.structs import ELFStructs

    try:
        structs = ELFStructs(little_endian=True, elfclass=64)
        structs.create_basic_structs()
        header = structs.Elf_Ehdr.parse_stream(f)
        structs.create_advanced_structs(header["e_type"], header["e_machine"],
                                        header["e_ident"]["EI_OSABI"])
        if header["e_machine"] != "EM_X86_64":
            raise errors.InvalidElfMachine(
                f"{name}: ELF for {header['e_machine']}, not x86_64 (EM_X86_64)"
            )
        if header["e_phentsize"] != PHDR64_SIZE:
            raise errors.InvalidProgramHeaderSize(
                f"{name}: e_phentsize is {header['e_phentsize']}, not {PHDR64_SIZE}"
            )
        if header["e_phoff"] + header["e_phnum"] * PHDR64_SIZE > size:
            raise errors.ElfReadError(f"{name}: program headers run past the end of the file "
                                      "(truncated image?)")
        segments: list[LoadSegment] = []
        pvh_entry: int | None = None
        for index in range(header["e_phnum"]):
            f.seek(header["e_phoff"] + index * PHDR64_SIZE)
            h = structs.Elf_Phdr.parse_stream(f)
            if h["p_type"] == "PT_NOTE":
                note = _read(f, h["p_offset"], h["p_filesz"], size, name)
                pvh_entry = pvh_entry if pvh_entry is not None else find_pvh_entry(note, name)
            if h["p_type"] != "PT_LOAD" or h["p_memsz"] == 0:
                continue
            s = LoadSegment(h["p_paddr"], h["p_vaddr"], h["p_offset"], h["p_filesz"],
                            h["p_memsz"], h["p_flags"])
            if s.filesz > s.memsz:
                raise errors.SegmentSizeMismatch(
                    f"{name}: segment at {s.paddr:#x} has p_filesz {s.filesz:#x} > "
                    f"p_memsz {s.memsz:#x}"
                )
            if s.offset + s.filesz > size:
                raise errors.SegmentOutsideFile(
                    f"{name}: segment at {s.paddr:#x} needs file bytes up to "
                    f"{s.offset + s.filesz:#x} but the file has {size:#x} (truncated?)"
                )
            segments.append(s)
        entry = header["e_entry"]
    except (ELFError, ConstructError) as e:
        raise errors.ElfReadError(f"{name}: corrupt ELF: {e}") from None
    except (struct.error, ValueError) as e:
        raise errors.ElfReadError(f"{name}: corrupt ELF headers: {e}") from None
    return ElfInfo(entry, tuple(segments), pvh_entry)


def _read(f: BinaryIO, offset: int, length: int, size: int, name: str) -> bytes:
    if offset + length > size:
        raise errors.SegmentOutsideFile(f"{name}: note segment runs past the end of the file")
    f.seek(offset)
    return f.read(length)


def iter_notes(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of each note; name and descriptor are padded to 4 bytes."""
    pos = 0
    while pos + NOTE_HEADER.size <= len(data):
        namesz, descsz, ntype = NOTE_HEADER.unpack_from(data, pos)
        pos += NOTE_HEADER.size
        name = data[pos : pos + namesz]
        pos += _align4(namesz)
        desc = data[pos : pos + descsz]
        pos += _align4(descsz)
        if pos > len(data):
            return
        yield name, ntype, desc


def find_pvh_entry(note_segment: bytes, name: str) -> int | None:
    for note_name, ntype, desc in iter_notes(note_segment):
        if note_name == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(desc) < 4:
                raise errors.InvalidPvhNote(
                    f"{name}: Xen PVH entry note has a {len(desc)}-byte descriptor; needs 4"
                )
            # Linux emits a pointer-sized value; the entry is its low 32 bits.
            entry: int = struct.unpack_from("<I", desc)[0]
            return entry
    return None


def load(f: BufferedIOBase, info: ElfInfo, memory: GuestMemory, name: str) -> None:
    """Check every segment against guest RAM, then copy and zero-fill them."""
    for s in info.segments:
        if s.paddr < layout.HIMEM_START:
            raise errors.SegmentOverlapsBootData(
                f"{name}: segment at {s.paddr:#x} lies below 1 MiB, over the boot structures"
            )
        if not memory.contains(s.paddr, s.memsz):
            need = (s.end + (1 << 20) - 1) >> 20
            raise errors.SegmentOutsideMemory(
                f"{name}: segment [{s.paddr:#x}, {s.end:#x}) does not fit in guest RAM "
                f"({memory.size >> 20} MiB); use --mem {max(need + 64, 128)}M or more"
            )
    for s in info.segments:
        f.seek(s.offset)
        view = memory.view(s.paddr, s.memsz)
        got = f.readinto(view[: s.filesz]) if s.filesz else 0
        if got != s.filesz:
            raise errors.SegmentOutsideFile(f"{name}: short read loading segment at {s.paddr:#x}")
        if s.memsz > s.filesz:
            view[s.filesz :] = bytes(s.memsz - s.filesz)  # .bss and .brk
