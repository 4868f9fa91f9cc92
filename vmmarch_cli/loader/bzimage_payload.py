"""Find the compressed vmlinux inside a bzImage and turn it back into the ELF.

Offsets and fields are from the real-mode kernel header of Documentation/arch/x86/boot.rst ("The
Real-Mode Kernel Header"; all offsets are from the start of the file, little-endian).
"""

from __future__ import annotations

import struct

from vmmarch_cli.arch.x86_64 import boot_params
from vmmarch_cli.errors import BadInputError
from vmmarch_cli.loader.decompress import decompress, detect
from vmmarch_cli.loader.elf64 import ELF_MAGIC

# boot.rst: "0248/4 2.08+ payload_offset" and "024C/4 2.08+ payload_length".
PAYLOAD_MIN_VERSION = 0x0208
# The header fields read here end with payload_length.
HEADER_END = boot_params.end_of("payload_length")
# scripts/Makefile.lib size_append: the payload's last 4 bytes are the uncompressed size, u32 LE.
SIZE_APPEND_BYTES = 4


def payload_of(image: bytes) -> bytes:
    """The compressed payload of a bzImage (protocol 2.08+), bounds-checked."""
    if len(image) < HEADER_END:
        raise BadInputError(
            f"bzImage is {len(image)} bytes, shorter than its setup header ({HEADER_END} bytes)"
        )
    magic = boot_params.get(image, "header")
    if magic != boot_params.HDRS_MAGIC:
        raise BadInputError(
            f"not a bzImage: no 'HdrS' signature at {boot_params.FIELDS['header'][0]:#x} "
            f"(found {magic:#010x})"
        )
    version = boot_params.get(image, "version")
    if version < PAYLOAD_MIN_VERSION:
        raise BadInputError(
            f"bzImage boot protocol {version >> 8}.{version & 0xFF:02d} is older than 2.08, "
            "which has no payload_offset/payload_length"
        )
    # boot.rst: the protected-mode code starts right after the real-mode sectors.
    protected_mode_start = (boot_params.setup_sectors(image) + 1) * boot_params.SECTOR_SIZE
    offset = boot_params.get(image, "payload_offset")
    length = boot_params.get(image, "payload_length")
    start = protected_mode_start + offset
    end = start + length
    if length == 0 or end > len(image):
        raise BadInputError(
            f"bzImage payload [{start:#x}, {end:#x}) is empty or runs past the end of the "
            f"{len(image)}-byte file"
        )
    return image[start:end]


def extract_vmlinux(image: bytes) -> bytes:
    """Decompress a bzImage's payload and return the vmlinux ELF it holds.

    On x86_64 kernels built with RANDOMIZE_BASE the ELF is followed by its relocation table
    (arch/x86/boot/compressed/Makefile vmlinux.relocs), which ELF readers ignore.
    """
    payload = payload_of(image)
    vmlinux = decompress(payload)
    if not vmlinux.startswith(ELF_MAGIC):
        raise BadInputError(
            f"bzImage payload decompresses to {vmlinux[:4].hex(' ') or 'nothing'}, not an ELF image"
        )
    # Every x86 payload ends with the uncompressed size (gzip's ISIZE, or size_append for the
    # other formats), so a short result means a damaged stream the decoder did not notice. An
    # uncompressed ("none") payload has no such trailer.
    if detect(payload) != "none":
        (expected,) = struct.unpack_from("<I", payload, len(payload) - SIZE_APPEND_BYTES)
        if expected != len(vmlinux) & 0xFFFF_FFFF:
            raise BadInputError(
                f"bzImage payload decompresses to {len(vmlinux)} bytes, but its trailer says "
                f"{expected}"
            )
    return vmlinux
