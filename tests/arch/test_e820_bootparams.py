"""e820 map and the zero page (bootparam.h offsets, boot.rst fields)."""

import itertools
import struct

from vmmarch_cli.arch.x86_64 import boot_params, e820, layout

MiB = 1 << 20
GiB = 1 << 30


def test_ram_layout_around_the_gap() -> None:
    assert e820.ram_layout(256 * MiB) == [(0, 256 * MiB)]
    assert e820.ram_layout(3 * GiB) == [(0, 3 * GiB)]
    assert e820.ram_layout(3 * GiB + 4096) == [(0, 3 * GiB), (4 * GiB, 4096)]
    assert e820.ram_layout(5 * GiB) == [(0, 3 * GiB), (4 * GiB, 2 * GiB)]


def test_memory_map_sorted_with_low_reserved_areas() -> None:
    m = e820.memory_map(e820.ram_layout(5 * GiB))
    assert m == [
        e820.E820Entry(0, 0x9FC00, e820.E820_RAM),
        e820.E820Entry(0x9FC00, 0x100000 - 0x9FC00, e820.E820_RESERVED),
        e820.E820Entry(0x100000, 3 * GiB - 0x100000, e820.E820_RAM),
        e820.E820Entry(4 * GiB, 2 * GiB, e820.E820_RAM),
    ]
    for a, b in itertools.pairwise(m):
        assert a.end <= b.address
    # the MP table lives in the reserved range
    assert any(e.type == e820.E820_RESERVED and e.address <= layout.SYSTEM_MEM_START < e.end
               for e in m)


def test_zero_page_fields_at_bootparam_h_offsets() -> None:
    entries = e820.memory_map([(0, 256 * MiB)])
    page = boot_params.build(boot_params.ZeroPage(
        cmdline_address=0x20000, cmdline_size=12, e820=entries,
        initrd_address=0x0F000000, initrd_size=0x123456, acpi_rsdp_address=0xE0000,
    ))
    assert len(page) == 4096
    u8 = lambda o: page[o]  # noqa: E731
    u16 = lambda o: struct.unpack_from("<H", page, o)[0]  # noqa: E731
    u32 = lambda o: struct.unpack_from("<I", page, o)[0]  # noqa: E731
    assert u16(0x1FE) == 0xAA55
    assert u32(0x202) == 0x53726448
    assert u8(0x210) == 0xFF
    assert u32(0x228) == 0x20000
    assert u32(0x238) == 12
    assert u32(0x218) == 0x0F000000
    assert u32(0x21C) == 0x123456
    assert u32(0x0C0) == 0 and u32(0x0C4) == 0
    assert struct.unpack_from("<Q", page, 0x070)[0] == 0xE0000
    assert u8(0x1E8) == len(entries) == 3
    assert u8(0x1EF) == 0  # sentinel
    assert struct.unpack_from("<QQI", page, 0x2D0 + 20) == (0x9FC00, 0x60400, 2)
    assert boot_params.read_e820(page) == entries


def test_zero_page_copies_the_image_setup_header_then_overrides() -> None:
    header = bytearray(0x80)
    header[0x206 - 0x1F1 : 0x208 - 0x1F1] = (0x020F).to_bytes(2, "little")  # version
    header[0x210 - 0x1F1] = 0x00  # type_of_loader from the image: must be overridden
    page = boot_params.build(boot_params.ZeroPage(0x20000, 5, [], setup_header=bytes(header)))
    assert boot_params.get(page, "version") == 0x020F
    assert boot_params.get(page, "type_of_loader") == 0xFF


def test_initrd_above_4g_uses_ext_fields() -> None:
    page = boot_params.build(boot_params.ZeroPage(0x20000, 1, [], initrd_address=0x1_2000_0000,
                                                  initrd_size=0x1000))
    assert boot_params.get(page, "ramdisk_image") == 0x2000_0000
    assert boot_params.get(page, "ext_ramdisk_image") == 1


def test_memory_map_just_below_at_and_above_the_gap() -> None:
    gap = layout.MMIO32_START
    for size, high in ((gap - 4096, None), (gap, None), (gap + 4096, 4096)):
        m = e820.memory_map(e820.ram_layout(size))
        ram = [(e.address, e.end) for e in m if e.type == e820.E820_RAM]
        assert ram[:2] == [(0, layout.EBDA_START), (layout.HIMEM_START, min(size, gap))]
        assert ram[2:] == ([] if high is None else [(layout.MMIO32_END, layout.MMIO32_END + high)])
        # nothing in the gap, and every byte of RAM asked for is in the map (less the low hole)
        assert not [e for e in m if e.address < layout.MMIO32_END and e.end > gap]
        hole = layout.HIMEM_START - layout.EBDA_START
        assert sum(e.size for e in m if e.type == e820.E820_RAM) == size - hole
