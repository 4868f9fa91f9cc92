"""GDT descriptors against the values every x86 VMM writes (Firecracker gdt.rs, SDM 3.4.5)."""

from vmmarch_cli.arch.x86_64 import gdt


def test_published_descriptor_words() -> None:
    assert gdt.gdt_entry(gdt.CODE64_FLAGS, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    assert gdt.gdt_entry(gdt.DATA_FLAGS, 0, 0xFFFFF) == 0x00CF93000000FFFF
    assert gdt.gdt_entry(0x808B, 0, 0xFFFFF) == 0x008F8B000000FFFF
    assert gdt.gdt_entry(gdt.CODE32_FLAGS, 0, 0xFFFFFFFF) == 0x00CF9B000000FFFF
    assert gdt.gdt_entry(gdt.TSS32_BUSY_FLAGS, 0, gdt.TSS_LIMIT) == 0x00008B0000000067


def test_split_base_and_limit_round_trip() -> None:
    raw = gdt.gdt_entry(0x4093, 0x12345678, 0xABCDE)
    d = gdt.Descriptor.unpack(raw)
    assert d.base == 0x12345678
    assert d.limit_field == 0xABCDE
    assert d.flags == 0x4093
    assert d.limit_bytes == 0xABCDE  # G=0: byte granular


def test_segment_from_gdt_scales_limit_with_g() -> None:
    seg = gdt.segment_from_gdt(gdt.gdt_entry(gdt.CODE64_FLAGS, 0, 0xFFFFF), 2)
    assert seg.selector == 0x10
    assert seg.limit == 0xFFFFFFFF
    assert seg.attributes == 0xA09B
    assert seg.present


def test_linux64_gdt_selectors_follow_boot_protocol() -> None:
    table = gdt.linux64_gdt()
    assert table[0] == 0 and table[1] == 0
    assert table[gdt.BOOT_CS_INDEX] == 0x00AF9B000000FFFF  # __BOOT_CS = 0x10
    assert table[gdt.BOOT_DS_INDEX] == 0x00CF93000000FFFF  # __BOOT_DS = 0x18
    tss = gdt.Descriptor.unpack(table[gdt.BOOT_TSS_INDEX])
    assert tss.flags & 0x1F == 0x0B  # busy TSS, system descriptor (S=0)
    assert tss.limit_bytes == 0x67
    assert len(gdt.pack_table(table)) == 48
