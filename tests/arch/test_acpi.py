"""ACPI tables (ACPI 6.5 chapter 5.2): checksums, links, MADT entry order and counts for
1..max CPUs, written through the pipeline into guest memory and read back from there."""

import itertools
import struct
from collections.abc import Iterator

import pytest

from vmmarch_cli.arch.x86_64 import (
    acpi,
    aml,
    board,
    boot_params,
    e820,
    layout,
    mptable,
    pipeline,
    pvh,
)
from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.memory import MmapGuestMemory


@pytest.fixture
def memory() -> Iterator[MmapGuestMemory]:
    mem = MmapGuestMemory([(0, 4 * layout.MiB)])
    yield mem
    mem.close()


def _plan(cpus: int, protocol: BootProtocol = BootProtocol.LINUX64) -> pipeline.BootPlan:
    return pipeline.BootPlan(entry=0x100_0000, cmdline=b"console=ttyS0", protocol=protocol,
                             ram_regions=((0, 4 * layout.MiB),), cpu_count=cpus)


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 37, 128, acpi.MAX_CPUS])
def test_tables_read_back_from_guest_memory(memory: MmapGuestMemory, cpus: int) -> None:
    pipeline.write_acpi(_plan(cpus), memory)
    rsdp = acpi.read_rsdp(memory.read, layout.ACPI_RSDP_START)
    assert rsdp["signature"] == "RSD PTR " and rsdp["revision"] == 2
    assert rsdp["length"] == 36 and rsdp["checksum_ok"]
    tables = acpi.read_all(memory.read, layout.ACPI_RSDP_START)
    assert [t.signature for t in tables] == ["XSDT", "FACP", "DSDT", "APIC"]
    for t in tables:
        assert t.checksum_ok, t.signature
        assert t.data[10:16] == acpi.OEM_ID
        # 5.2.5.1: the RSDP and tables live in the BIOS area the e820 map reserves
        assert t.address >= layout.SYSTEM_MEM_START and t.address + len(t.data) <= layout.BIOS_END
        assert t.address % 8 == 0
    _, fadt, dsdt, madt = tables
    assert len(fadt.data) == 276 and fadt.revision == 6
    flags = struct.unpack_from("<I", fadt.data, 112)[0]
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert struct.unpack_from("<Q", fadt.data, 140)[0] == dsdt.address
    assert struct.unpack_from("<I", fadt.data, 40)[0] == 0  # 32-bit DSDT unused: X_DSDT set
    assert aml.decode_devices(dsdt.data[36:]) == list(acpi.COM_PORTS)

    body = struct.unpack_from("<II", madt.data, 36)
    assert body == (layout.APIC_DEFAULT_ADDRESS, acpi.MADT_PCAT_COMPAT)
    records = acpi.decode_madt(madt)
    kinds = [r["type"] for r in records]
    assert kinds == (["local_apic"] * cpus + ["io_apic"]
                     + ["interrupt_override"] * len(board.ISA_IRQS_USED) + ["local_apic_nmi"])
    lapics = records[:cpus]
    assert [r["apic_id"] for r in lapics] == list(range(cpus))
    assert [r["uid"] for r in lapics] == list(range(cpus))
    assert all(r["flags"] == acpi.LAPIC_ENABLED for r in lapics)
    ioapic = records[cpus]
    assert ioapic["ioapic_id"] == cpus  # no clash with any CPU's APIC ID
    assert ioapic["address"] == layout.IOAPIC_ADDRESS and ioapic["gsi_base"] == 0
    assert [(r["source"], r["gsi"]) for r in records[cpus + 1:-1]] == [(3, 3), (4, 4)]
    assert records[-1] == {"type": "local_apic_nmi", "uid": 0xFF, "flags": 0, "lint": 1}


def test_tables_do_not_overlap_each_other_or_the_mp_table() -> None:
    t = acpi.build(acpi.MAX_CPUS)
    spans = sorted((a, a + len(d)) for a, d in t.blobs)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    mp = mptable.build(acpi.MAX_CPUS)
    assert mp.address + len(mp.data) <= spans[0][0]


def test_reserved_in_every_e820_map() -> None:
    t = acpi.build(4)
    for size in (256 * layout.MiB, 3 * layout.GiB, 5 * layout.GiB):
        entries = e820.memory_map(e820.ram_layout(size))
        covering = [e for e in entries if e.address <= t.rsdp_address and t.end <= e.end]
        assert [e.type for e in covering] == [e820.E820_RESERVED]


def test_too_many_cpus() -> None:
    with pytest.raises(ValueError, match=r"1\.\.254"):
        acpi.madt(acpi.MAX_CPUS + 1)
    with pytest.raises(ValueError):
        acpi.madt(0)


def test_rsdp_checksums_cover_both_ranges() -> None:
    data = bytearray(acpi.rsdp(0x1234_5678))
    assert sum(data[:20]) % 256 == 0 and sum(data) % 256 == 0
    data[25] ^= 1  # a byte only the extended checksum covers
    assert sum(data[:20]) % 256 == 0 and sum(data) % 256 != 0


def test_both_protocols_point_the_kernel_at_the_rsdp(memory: MmapGuestMemory) -> None:
    pipeline.write_zero_page(_plan(2), memory)
    page = memory.read(layout.ZERO_PAGE_START, boot_params.ZERO_PAGE_SIZE)
    assert boot_params.get(page, "acpi_rsdp_addr") == layout.ACPI_RSDP_START
    pipeline.write_start_info(_plan(2, BootProtocol.PVH), memory)
    info = pvh.read_start_info(memory.read(layout.PVH_INFO_START, pvh.HvmStartInfo.sizeof()))
    assert info.rsdp_paddr == layout.ACPI_RSDP_START


def test_both_protocols_write_acpi() -> None:
    for protocol in (BootProtocol.LINUX64, BootProtocol.PVH):
        names = [name for name, _ in pipeline.MEMORY_STEPS[protocol]]
        assert "acpi" in names and "mptable" in names


def test_corrupt_lengths_are_refused(memory: MmapGuestMemory) -> None:
    pipeline.write_acpi(_plan(2), memory)
    tables = acpi.read_all(memory.read, layout.ACPI_RSDP_START)
    xsdt = tables[0]
    memory.write(xsdt.address + 4, struct.pack("<I", 0xFFFF_FFFF))
    with pytest.raises(ValueError, match="claims length"):
        acpi.read_all(memory.read, layout.ACPI_RSDP_START)
    with pytest.raises(ValueError, match="no RSDP"):
        acpi.read_all(memory.read, layout.ACPI_RSDP_START + 16)
