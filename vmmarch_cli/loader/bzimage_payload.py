"""Find the compressed vmlinux inside a bzImage and turn it back into the ELF.

Offsets and fields are from the real-mode kernel header of Documentation/arch/x86/boot.rst ("The
Real-Mode Kernel Header"; all offsets are from the start of the file, little-endian).
"""

from __future__ import annotations

import struct

from vmmarch_cli.errors import BadInputError
from vmmarch_cli.loader.decompress import ELF_MAGIC, decompress, detect

# boot.rst: "01F1/1 ALL(1) setup_sects The size of the setup in sectors".
SETUP_SECTS_OFFSET = 0x1F1
# boot.rst: "If this field is 0, the real value is 4."
SETUP_SECTS_DEFAULT = 4
# boot.rst: the real-mode code is the 512-byte boot sector plus setup_sects more sectors.
SECTOR_SIZE = 512
# boot.rst: "0202/4 2.00+ header Magic signature "HdrS"" (0x53726448 little-endian).
HEADER_OFFSET = 0x202
HEADER_MAGIC = 0x53726448
# boot.rst: "0206/2 2.00+ version Boot protocol version supported".
VERSION_OFFSET = 0x206
# boot.rst: "0248/4 2.08+ payload_offset" and "024C/4 2.08+ payload_length".
PAYLOAD_MIN_VERSION = 0x0208
PAYLOAD_OFFSET_OFFSET = 0x248
PAYLOAD_LENGTH_OFFSET = 0x24C
# The header fields read here end with payload_length.
HEADER_END = PAYLOAD_LENGTH_OFFSET + 4
# scripts/Makefile.lib size_append: the payload's last 4 bytes are the uncompressed size, u32 LE.
SIZE_APPEND_BYTES = 4


def payload_of(image: bytes) -> bytes:
    """The compressed payload of a bzImage (protocol 2.08+), bounds-checked."""
    if len(image) < HEADER_END:
        raise BadInputError(
            f"bzImage is {len(image)} bytes, shorter than its setup header ({HEADER_END} bytes)"
        )
    (magic,) = struct.unpack_from("<I", image, HEADER_OFFSET)
    if magic != HEADER_MAGIC:
        raise BadInputError(
            f"not a bzImage: no 'HdrS' signature at {HEADER_OFFSET:#x} (found {magic:#010x})"
        )
    (version,) = struct.unpack_from("<H", image, VERSION_OFFSET)
    if version < PAYLOAD_MIN_VERSION:
        raise BadInputError(
            f"bzImage boot protocol {version >> 8}.{version & 0xFF:02d} is older than 2.08, "
            "which has no payload_offset/payload_length"
        )
    setup_sects = image[SETUP_SECTS_OFFSET] or SETUP_SECTS_DEFAULT
    # boot.rst: the protected-mode code starts right after the real-mode sectors.
    protected_mode_start = (setup_sects + 1) * SECTOR_SIZE
    offset, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET_OFFSET)
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
