"""bzImage kernels through the 64-bit Linux boot protocol (Documentation/arch/x86/boot.rst).

The setup header is validated in full before anything is written (linux-loader checks only the
magic, the version and LOADED_HIGH; the rest is listed as missing in boot-pipeline.md section
3). The protected-mode code is loaded at ``code32_start`` and entered at load + 0x200, the
64-bit entry (boot.rst, "64-bit Boot Protocol"); the kernel decompresses itself from there.
Or vmm-arch decompresses it and boots the vmlinux inside with this header (host_decompress.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BufferedReader

from vmmarch_cli.arch.x86_64 import boot_params
from vmmarch_cli.loader import errors
from vmmarch_cli.vcpu import GuestMemory

#: boot.rst: protocol 2.12 added xloadflags and with it XLF_KERNEL_64.
MIN_VERSION_64BIT = 0x020C
#: boot.rst: protocol 2.06 added cmdline_size; older kernels take 255 characters.
VERSION_CMDLINE_SIZE = 0x0206
LEGACY_CMDLINE_MAX = 255
VERSION_INITRD_ADDR_MAX = 0x0203
XLF_KERNEL_64 = 1 << 0
#: boot.rst: "the 64-bit entry point is at the load address + 0x200".
ENTRY_64BIT_OFFSET = 0x200


@dataclass(frozen=True)
class SetupHeader:
    raw: bytes  # bytes 0x1F1.. of the image, through the header's end

    def get(self, name: str) -> int:
        page = bytes(boot_params.SETUP_HEADER_START) + self.raw
        return boot_params.get(page.ljust(boot_params.ZERO_PAGE_SIZE, b"\0"), name)


@dataclass(frozen=True)
class BzImageInfo:
    header: SetupHeader
    setup_size: int
    payload_size: int
    load_address: int
    init_size: int
    kernel_alignment: int
    relocatable: bool
    version: int

    @property
    def entry(self) -> int:
        return self.load_address + ENTRY_64BIT_OFFSET

    @property
    def decompress_start(self) -> int:
        """Where the decompressor puts the kernel without KASLR (arch/x86/boot/compressed/
        head_64.S, before "Target address to relocate to for decompression"): a relocatable
        kernel at its load address aligned up to kernel_alignment but never below
        LOAD_PHYSICAL_ADDR, any other kernel at LOAD_PHYSICAL_ADDR. The header reports
        LOAD_PHYSICAL_ADDR as pref_address (boot.rst, protocol 2.10+); a header without one
        (0) leaves the load address as the floor."""
        floor = self.header.get("pref_address") or self.load_address
        if self.relocatable and self.kernel_alignment:
            align = self.kernel_alignment
            return max((self.load_address + align - 1) // align * align, floor)
        return floor

    @property
    def end(self) -> int:
        """The highest byte the kernel may use before it sets up its own memory map."""
        return max(self.load_address + self.payload_size, self.decompress_start + self.init_size)


def is_bzimage(head: bytes) -> bool:
    return (len(head) >= boot_params.end_of("header")
            and boot_params.get(head, "header") == boot_params.HDRS_MAGIC)


def parse(image_head: bytes, size: int, name: str) -> BzImageInfo:
    """Validate the setup header; ``image_head`` is at least the first 1 KiB of the file."""
    if not is_bzimage(image_head):
        raise errors.InvalidBzImage(f"{name}: no 'HdrS' setup-header signature at "
                                    f"{boot_params.FIELDS['header'][0]:#x}")
    jump = boot_params.get(image_head, "jump")
    header_end = min(boot_params.HEADER_END_BASE + (jump >> 8), boot_params.SETUP_HEADER_MAX_END)
    header = SetupHeader(image_head[boot_params.SETUP_HEADER_START : header_end])
    if header.get("boot_flag") != boot_params.BOOT_FLAG_MAGIC:
        raise errors.InvalidBzImage(
            f"{name}: boot_flag is {header.get('boot_flag'):#06x}, not 0xaa55"
        )
    version = header.get("version")
    if version < MIN_VERSION_64BIT:
        raise errors.BzImageProtocolTooOld(
            f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} has no 64-bit entry "
            "(needs 2.12 or later); boot its vmlinux instead"
        )
    if not header.get("xloadflags") & XLF_KERNEL_64:
        raise errors.BzImageMissing64BitEntry(
            f"{name}: xloadflags {header.get('xloadflags'):#x} lacks XLF_KERNEL_64 "
            "(a 32-bit kernel?)"
        )
    if not header.get("loadflags") & boot_params.LOADFLAGS_LOADED_HIGH:
        raise errors.BzImageNotLoadableHigh(
            f"{name}: loadflags lack LOADED_HIGH: a zImage, which vmm-arch does not boot"
        )
    setup_sects = header.get("setup_sects") or boot_params.SETUP_SECTS_DEFAULT
    setup_size = (setup_sects + 1) * boot_params.SECTOR_SIZE
    if size <= setup_size:
        raise errors.BzImageTruncated(
            f"{name}: {size} bytes, but the setup code alone is {setup_size} bytes (truncated?)"
        )
    payload_end = setup_size + header.get("payload_offset") + header.get("payload_length")
    if payload_end > size:
        raise errors.BzImageTruncated(
            f"{name}: the compressed kernel ends at {payload_end:#x}, past the end of the "
            f"{size}-byte file (truncated?)"
        )
    return BzImageInfo(
        header=header,
        setup_size=setup_size,
        payload_size=size - setup_size,
        load_address=header.get("code32_start"),
        init_size=header.get("init_size"),
        kernel_alignment=header.get("kernel_alignment"),
        relocatable=bool(header.get("relocatable_kernel")),
        version=version,
    )


def cmdline_max(info: BzImageInfo) -> int:
    """Bytes the kernel takes for its command line, including the NUL."""
    if info.version >= VERSION_CMDLINE_SIZE:
        return info.header.get("cmdline_size") + 1
    return LEGACY_CMDLINE_MAX + 1


def initrd_addr_max(info: BzImageInfo, default: int) -> int:
    if info.version >= VERSION_INITRD_ADDR_MAX:
        return info.header.get("initrd_addr_max")
    return default


def load(f: BufferedReader, info: BzImageInfo, memory: GuestMemory, name: str) -> None:
    low_start, low_len = memory.regions()[0]
    if not memory.contains(info.load_address, info.end - info.load_address):
        raise errors.KernelDoesNotFit(
            f"{name}: needs RAM up to {info.end:#x} (load address {info.load_address:#x}, "
            f"init_size {info.init_size:#x}) but low RAM ends at {low_start + low_len:#x}; "
            f"use --mem {((info.end >> 20) + 64)}M or more"
        )
    f.seek(info.setup_size)
    got = f.readinto(memory.view(info.load_address, info.payload_size))
    if got != info.payload_size:
        raise errors.BzImageTruncated(f"{name}: short read of the protected-mode code")


def zero_page_header(info: BzImageInfo, kernel_address: int | None = None) -> bytes:
    """The image's setup header with the loader's own fields for this load.

    ``kernel_address`` is where the kernel was placed when it is not the protected-mode code
    at ``info.load_address`` (a vmlinux decompressed on the host): code32_start then says
    where the kernel is (boot.rst: "This defaults to the load address of the kernel").
    """
    page = bytearray(boot_params.SETUP_HEADER_START) + info.header.raw
    page = page.ljust(boot_params.ZERO_PAGE_SIZE, b"\0")
    address = info.load_address if kernel_address is None else kernel_address
    boot_params.put(page, "code32_start", address)
    return bytes(page[boot_params.SETUP_HEADER_START : boot_params.SETUP_HEADER_START
                      + len(info.header.raw)])
