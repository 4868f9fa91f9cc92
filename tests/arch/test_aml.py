"""The DSDT's AML (ACPI 6.5 chapter 20) and resource templates (6.4): encodings checked against
values fixed by the spec and by iasl's output for the same ASL, and read back."""

import pytest

from vmmarch_cli.arch.x86_64 import acpi, aml


@pytest.mark.parametrize(("body", "encoded"), [
    (0, b"\x01"), (62, b"\x3f"),  # one byte holds a total of up to 63
    (63, b"\x41\x04"),  # total 65 = 0x41: lead 0b01 << 6 | 0x1, then 0x04
    (4093, b"\x4f\xff"),  # the largest two-byte length: total 4095
    (4094, b"\x81\x00\x01"),  # total 4097 = 0x1001 needs three bytes
])
def test_pkg_length_counts_its_own_bytes(body: int, encoded: bytes) -> None:
    assert aml.pkg_length(body) == encoded
    end, start = aml._read_pkg_length(encoded + bytes(body), 0)
    assert (end, start) == (len(encoded) + body, len(encoded))


def test_pkg_length_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        aml.pkg_length(aml.PKG_LENGTH_MAX)


def test_eisa_ids_match_the_spec() -> None:
    # EISAID("PNP0501") is 0x0105D041 in every DSDT (ACPICA's AcpiUtDwordByteSwap of 0x41D00501)
    assert aml.eisa_id("PNP0501") == 0x0105D041
    assert aml.eisa_id("PNP0A03") == 0x030AD041
    assert aml.eisa_text(0x0105D041) == "PNP0501"
    for bad in ("PNP050", "pnp0501", "PN10501"):
        with pytest.raises(ValueError):
            aml.eisa_id(bad)


def test_com1_encodes_as_iasl_writes_it() -> None:
    # Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, 0x01)
    #   Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08)
    #                                     IRQ (Edge, ActiveHigh, Shared) {4} }) }
    expected = bytes.fromhex(
        "5b822d" "434f4d31"
        "08" "5f484944" "0c41d00501"
        "08" "5f554944" "0a01"
        "08" "5f435253" "11110a0e" "4701f803f8030108" "23100011" "7900")
    assert acpi.COM_PORTS[0].aml() == expected


def test_names_are_checked() -> None:
    for bad in ("", "COM10", "1COM", "com1"):
        with pytest.raises(ValueError):
            aml.name_seg(bad)
    assert aml.name_seg("_SB") == b"_SB_"


def test_dsdt_devices_read_back() -> None:
    body = acpi.dsdt()[acpi.SDT_HEADER_SIZE:]
    assert aml.decode_devices(body) == list(acpi.COM_PORTS)
    assert [(d.io_base, d.irq) for d in acpi.COM_PORTS] == [
        (0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3)]


@pytest.mark.parametrize("cut", [1, 5, 20, 60, 100])
def test_truncated_aml_is_an_aml_error(cut: int) -> None:
    body = acpi.dsdt()[acpi.SDT_HEADER_SIZE:]
    with pytest.raises(aml.AmlError):
        aml.decode_devices(body[:-cut])
