"""The few ACPI Machine Language terms the DSDT needs: a scope with devices that have a _HID,
a _UID and a _CRS with an I/O range and an ISA IRQ (ACPI 6.5 chapter 20, AML encoding; chapter
6.4, resource descriptors).

A hardware-reduced platform has no legacy PIC, so Linux preallocates no ISA IRQs (nr_legacy_irqs
is 0) and a COM port it finds only by its fixed address cannot get its interrupt (opening the
tty fails with EIO). Described here, the ports are bound by the 8250 PNP driver, whose IRQ goes
through acpi_register_gsi to the I/O APIC pin, as Firecracker and Cloud Hypervisor do.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from vmmarch_cli.arch.x86_64.record import Record

# 20.2.5 term encodings.
SCOPE_OP = 0x10
NAME_OP = 0x08
BUFFER_OP = 0x11
BYTE_PREFIX = 0x0A
DWORD_PREFIX = 0x0C
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = b"\\"
DUAL_NAME_PREFIX = 0x2E

# 6.4.2 small resource descriptors: tag byte = type << 3 | length.
IO_DESCRIPTOR = 0x08 << 3 | 7
IO_DECODE_16 = 0x01
IRQ_DESCRIPTOR = 0x04 << 3 | 3  # with the information byte:
IRQ_EDGE = 1 << 0  # edge-triggered, active high (bit 3 clear), as ISA lines are
IRQ_SHARED = 1 << 4  # COM1 and COM3 share IRQ 4, as on every PC
END_TAG = 0x0F << 3 | 1

#: 20.2.4: a one-byte PkgLength holds up to 63; longer ones take 1-3 more bytes.
PKG_LENGTH_ONE_BYTE_MAX = 0x3F
PKG_LENGTH_MAX = 0x0FFF_FFFF


def pkg_length(body: int) -> bytes:
    """The PkgLength for ``body`` bytes that follow it (the length counts its own bytes)."""
    if body + 1 <= PKG_LENGTH_ONE_BYTE_MAX:
        return bytes([body + 1])
    for extra in (1, 2, 3):
        total = body + 1 + extra
        if total < 1 << (4 + 8 * extra):
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([extra << 6 | (total & 0x0F)]) + rest
    raise ValueError(f"an AML package of {body} bytes is over the {PKG_LENGTH_MAX} limit")


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg: A-Z, 0-9 and _, padded with _ (20.2.2)."""
    if not 1 <= len(name) <= 4 or not all(c.isupper() or c.isdigit() or c == "_" for c in name) \
            or name[0].isdigit():
        raise ValueError(f"{name!r} is not an AML name segment")
    return name.ljust(4, "_").encode()


def eisa_id(text: str) -> int:
    """EISAID("PNP0501"): three letters in 5 bits each and four hex digits, as the DWord AML
    stores (19.6.35)."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"{text!r} is not an EISA ID")
    letters = [ord(c) - ord("@") for c in text[:3]]
    vendor = letters[0] << 10 | letters[1] << 5 | letters[2]
    product = int(text[3:], 16)
    value: int = struct.unpack("<I", struct.pack(">HH", vendor, product))[0]
    return value


def dword(value: int) -> bytes:
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


def byte(value: int) -> bytes:
    return bytes([BYTE_PREFIX, value])


def name(seg: str, data: bytes) -> bytes:
    return bytes([NAME_OP]) + name_seg(seg) + data


def buffer(data: bytes) -> bytes:
    body = byte(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, terms: bytes) -> bytes:
    """Scope(\\NAME) { terms }: one segment below the root."""
    body = ROOT_CHAR + name_seg(path) + terms
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(seg: str, terms: bytes) -> bytes:
    body = name_seg(seg) + terms
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


class IoPortDescriptor(Record):  # ACPI 6.4.2.5 I/O Port Descriptor (small resource)
    _fields_ = (("tag", ctypes.c_uint8), ("information", ctypes.c_uint8),
                ("minimum", ctypes.c_uint16), ("maximum", ctypes.c_uint16),
                ("alignment", ctypes.c_uint8), ("length", ctypes.c_uint8))


class IrqDescriptor(Record):  # ACPI 6.4.2.1 IRQ Descriptor, with the information byte
    _fields_ = (("tag", ctypes.c_uint8), ("mask", ctypes.c_uint16),
                ("information", ctypes.c_uint8))


@dataclass(frozen=True)
class IsaDevice:
    """A device at fixed I/O ports with one ISA IRQ (a COM port: PNP0501, 8 ports)."""

    name: str
    hid: str
    uid: int
    io_base: int
    io_length: int
    irq: int

    def resources(self) -> bytes:
        """ResourceTemplate() { IO(Decode16, base, base, 1, length)
        IRQ(Edge, ActiveHigh, Shared) {irq} }."""
        io = IoPortDescriptor(tag=IO_DESCRIPTOR, information=IO_DECODE_16,
                              minimum=self.io_base, maximum=self.io_base, alignment=1,
                              length=self.io_length)
        irq = IrqDescriptor(tag=IRQ_DESCRIPTOR, mask=1 << self.irq,
                            information=IRQ_EDGE | IRQ_SHARED)
        # checksum 0: "treated as if it summed to 0" (6.4.2.9)
        return io.pack() + irq.pack() + bytes([END_TAG, 0])

    def aml(self) -> bytes:
        return device(self.name, name("_HID", dword(eisa_id(self.hid)))
                      + name("_UID", byte(self.uid)) + name("_CRS", buffer(self.resources())))


class AmlError(ValueError):
    """AML this reader does not understand (it reads what ``IsaDevice.aml`` writes)."""


def _read_pkg_length(data: bytes, at: int) -> tuple[int, int]:
    """(end of the package, start of its body) for the PkgLength at ``at``."""
    if at >= len(data):
        raise AmlError(f"PkgLength at {at} is past the end")
    lead = data[at]
    extra = lead >> 6
    if extra == 0:
        total = lead & 0x3F
    else:
        if at + extra >= len(data):
            raise AmlError(f"PkgLength at {at} is cut short")
        total = (lead & 0x0F) | int.from_bytes(data[at + 1:at + 1 + extra], "little") << 4
    end = at + total
    if total < 1 + extra or end > len(data):
        raise AmlError(f"package at {at} of {total} bytes does not fit")
    return end, at + 1 + extra


def _read_name_value(data: bytes, at: int, end: int) -> tuple[str, int | bytes, int]:
    """A Name(SEG, value) term at ``at``: its name, a DWord/Byte integer or a buffer's bytes,
    and where the next term starts."""
    if data[at] != NAME_OP or at + 6 > end:
        raise AmlError(f"expected Name() at {at}")
    seg = data[at + 1:at + 5].decode("ascii", "replace")
    op, at = data[at + 5], at + 6
    if op == DWORD_PREFIX and at + 4 <= end:
        return seg, struct.unpack_from("<I", data, at)[0], at + 4
    if op == BYTE_PREFIX and at + 1 <= end:
        return seg, data[at], at + 1
    if op == BUFFER_OP:
        buf_end, body = _read_pkg_length(data, at)
        if buf_end > end or data[body] != BYTE_PREFIX or body + 2 + data[body + 1] > buf_end:
            raise AmlError(f"buffer {seg} at {at} is malformed")
        return seg, data[body + 2:body + 2 + data[body + 1]], buf_end
    raise AmlError(f"value of {seg} at {at} is not a DWord, Byte or Buffer")


def _decode_resources(data: bytes) -> tuple[int, int, int]:
    """(I/O base, I/O length, IRQ) from the template ``IsaDevice.resources`` writes."""
    if len(data) < IoPortDescriptor.sizeof() + IrqDescriptor.sizeof():
        raise AmlError("resource template is not one I/O range and one IRQ")
    io = IoPortDescriptor.read(data)
    irq = IrqDescriptor.read(data, IoPortDescriptor.sizeof())
    if io.tag != IO_DESCRIPTOR or irq.tag != IRQ_DESCRIPTOR:
        raise AmlError("resource template is not one I/O range and one IRQ")
    base, length, mask = io.minimum, io.length, irq.mask
    if mask == 0 or mask & (mask - 1):
        raise AmlError(f"IRQ mask {mask:#x} does not name exactly one IRQ")
    return base, length, mask.bit_length() - 1


def decode_devices(body: bytes) -> list[IsaDevice]:
    """The devices in a DSDT body written by ``scope(.., IsaDevice.aml() ...)``; AmlError for
    anything else (a table in guest memory may hold any bytes)."""
    try:
        return _decode_devices(body)
    except (IndexError, struct.error) as e:
        raise AmlError(f"AML is cut short: {e}") from None


def _decode_devices(body: bytes) -> list[IsaDevice]:
    devices: list[IsaDevice] = []
    at = 0
    while at < len(body):
        if body[at] != SCOPE_OP:
            raise AmlError(f"expected Scope() at {at}")
        scope_end, at = _read_pkg_length(body, at + 1)
        at += 1 + 4  # the root prefix and the scope's name
        while at < scope_end:
            if body[at:at + 2] != bytes([EXT_OP_PREFIX, DEVICE_OP]):
                raise AmlError(f"expected Device() at {at}")
            dev_end, at = _read_pkg_length(body, at + 2)
            seg = body[at:at + 4].decode("ascii", "replace").rstrip("_")
            at += 4
            values: dict[str, int | bytes] = {}
            while at < dev_end:
                key, value, at = _read_name_value(body, at, dev_end)
                values[key] = value
            hid, uid, crs = values.get("_HID"), values.get("_UID"), values.get("_CRS")
            if not isinstance(hid, int) or not isinstance(uid, int) or \
                    not isinstance(crs, bytes):
                raise AmlError(f"device {seg} lacks _HID, _UID or _CRS")
            base, length, irq = _decode_resources(crs)
            devices.append(IsaDevice(seg, eisa_text(hid), uid, base, length, irq))
        at = scope_end
    return devices


def eisa_text(value: int) -> str:
    """The inverse of ``eisa_id``."""
    vendor, product = struct.unpack(">HH", struct.pack("<I", value))
    letters = "".join(chr(ord("@") + (vendor >> s & 0x1F)) for s in (10, 5, 0))
    return f"{letters}{product:04X}"
