"""The ELF64 format as vmm-arch writes and checks it: constants and the two headers (System V
gABI, "ELF Header" and "Program Header"; x86_64 psABI for the machine). Reading a vmlinux is
pyelftools' job (elf.py); these declarations serve the checks before it and the ELF files
vmm-arch writes itself (initramfs.py's helper)."""

from __future__ import annotations

import ctypes

from vmmarch_cli.arch.x86_64.record import Record

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2  # e_ident[EI_CLASS]
ELFDATA2LSB = 1  # e_ident[EI_DATA]
EV_CURRENT = 1
ELFOSABI_NONE = 0
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PF_X = 1 << 0
PF_R = 1 << 2


class Elf64Header(Record):  # Elf64_Ehdr
    _fields_ = (("ei_magic", ctypes.c_char * 4), ("ei_class", ctypes.c_uint8),
                ("ei_data", ctypes.c_uint8), ("ei_version", ctypes.c_uint8),
                ("ei_osabi", ctypes.c_uint8), ("ei_abiversion", ctypes.c_uint8),
                ("ei_pad", ctypes.c_uint8 * 7),
                ("e_type", ctypes.c_uint16), ("e_machine", ctypes.c_uint16),
                ("e_version", ctypes.c_uint32), ("e_entry", ctypes.c_uint64),
                ("e_phoff", ctypes.c_uint64), ("e_shoff", ctypes.c_uint64),
                ("e_flags", ctypes.c_uint32), ("e_ehsize", ctypes.c_uint16),
                ("e_phentsize", ctypes.c_uint16), ("e_phnum", ctypes.c_uint16),
                ("e_shentsize", ctypes.c_uint16), ("e_shnum", ctypes.c_uint16),
                ("e_shstrndx", ctypes.c_uint16))


class Elf64ProgramHeader(Record):  # Elf64_Phdr
    _fields_ = (("p_type", ctypes.c_uint32), ("p_flags", ctypes.c_uint32),
                ("p_offset", ctypes.c_uint64), ("p_vaddr", ctypes.c_uint64),
                ("p_paddr", ctypes.c_uint64), ("p_filesz", ctypes.c_uint64),
                ("p_memsz", ctypes.c_uint64), ("p_align", ctypes.c_uint64))
