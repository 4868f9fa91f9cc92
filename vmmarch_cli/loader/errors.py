"""Named errors for every way a kernel image or boot input can be wrong.

Each is a ``BadInputError`` (exit status 65) whose message says what is wrong and what would fix
it. Names follow rust-vmm linux-loader's variants where one exists, so users of both recognise
them; the docstring is the meaning.
"""

from __future__ import annotations

from vmmarch_cli.errors import BadInputError


class KernelNotFound(BadInputError):
    """The kernel path does not exist or cannot be read."""


class UnknownKernelFormat(BadInputError):
    """The bytes are neither an x86_64 ELF nor a bzImage."""


class ElfReadError(BadInputError):
    """The ELF headers could not be read (truncated or corrupt file)."""


class InvalidElfClass(BadInputError):
    """ELF32 or another class: the 64-bit boot needs ELF64."""


class BigEndianElfOnLittle(BadInputError):
    """A big-endian ELF cannot be an x86 kernel."""


class InvalidElfMachine(BadInputError):
    """e_machine is not EM_X86_64."""


class InvalidProgramHeaderSize(BadInputError):
    """e_phentsize is not sizeof(Elf64_Phdr) == 56."""


class NoLoadableSegments(BadInputError):
    """The ELF has no PT_LOAD segment with bytes to load."""


class SegmentSizeMismatch(BadInputError):
    """A segment's p_filesz exceeds its p_memsz."""


class SegmentOutsideFile(BadInputError):
    """A segment's file range runs past the end of the file (truncated image)."""


class SegmentOutsideMemory(BadInputError):
    """A segment does not fit in guest RAM (memory too small, or a bad p_paddr)."""


class SegmentOverlapsBootData(BadInputError):
    """A segment would overwrite the boot structures below 1 MiB."""


class InvalidEntryAddress(BadInputError):
    """The entry point lies outside every loaded segment."""


class InvalidPvhNote(BadInputError):
    """A XEN_ELFNOTE_PHYS32_ENTRY note whose descriptor is shorter than 4 bytes."""


class CommandLineTooLong(BadInputError):
    """The command line (with its NUL) exceeds what the kernel accepts."""


class InvalidCommandLine(BadInputError):
    """The command line contains a NUL byte."""


class InitrdNotFound(BadInputError):
    """The initrd path does not exist or cannot be read."""


class InitrdTooLarge(BadInputError):
    """The initrd does not fit in guest RAM between the kernel and the top of low memory."""


class InvalidMemorySize(BadInputError):
    """The --mem value cannot be parsed or is out of range."""


class InvalidBzImage(BadInputError):
    """No "HdrS" signature or no 0xAA55 boot flag where the setup header should be."""


class BzImageTruncated(BadInputError):
    """The file ends inside the setup sectors or has no protected-mode code after them."""


class BzImageProtocolTooOld(BadInputError):
    """Boot protocol below 2.12: no 64-bit entry point."""


class BzImageMissing64BitEntry(BadInputError):
    """xloadflags lacks XLF_KERNEL_64: the kernel has no 64-bit entry at load + 0x200."""


class BzImageNotLoadableHigh(BadInputError):
    """loadflags lacks LOADED_HIGH: a zImage that wants 0x10000, not a bzImage."""


class KernelDoesNotFit(BadInputError):
    """init_size from the (aligned) load address runs past the end of low RAM."""
