"""Guest-physical layout of the boot structures. Data only.

Addresses follow Firecracker's ``arch/x86_64/layout.rs`` so that a guest booted by either VMM
finds the same things in the same places; where we differ, the line says why.
"""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: GDT (Linux 64-bit boot: null, unused, __BOOT_CS at 0x10, __BOOT_DS at 0x18, a 16-byte TSS).
BOOT_GDT_START = 0x500
#: An IDT with no gates, after the 48-byte GDT: any exception before the kernel loads its own
#: IDT is a triple fault, which the VMM reports with the registers.
BOOT_IDT_START = 0x540
#: Xen PVH ``hvm_start_info`` and its module list.
PVH_INFO_START = 0x6000
PVH_MODLIST_START = 0x6040
#: Linux ``boot_params`` ("zero page"), 4 KiB; the PVH memmap reuses the address.
ZERO_PAGE_START = 0x7000
PVH_MEMMAP_START = 0x7000
#: Boot stack: RSP and RBP at entry (grows down, below the page tables).
BOOT_STACK_POINTER = 0x8FF0
#: Identity page tables: PML4, one PDPT, then one page directory per GiB mapped.
PML4_START = 0x9000
PDPT_START = 0xA000
PD_START = 0xB000
#: Gigabytes identity-mapped with 2 MiB pages: the whole 32-bit space, so the kernel and its
#: init_size fit wherever it is loaded below 4 GiB (Firecracker maps only 1 GiB).
IDENTITY_MAP_GIB = 4
#: Kernel command line, NUL-terminated.
CMDLINE_START = 0x20000
#: COMMAND_LINE_SIZE on x86 (arch/x86/include/asm/setup.h); a bzImage may allow more.
CMDLINE_MAX_SIZE = 2048
#: End of conventional memory usable as RAM: the EBDA-sized KiB below 640 KiB holds the MP table.
EBDA_START = 0x9FC00
#: System area: MP table at 0x9fc00, then up to the end of the BIOS area, reserved in e820.
SYSTEM_MEM_START = 0x9FC00
BIOS_END = 0x100000
#: ACPI RSDP and the tables after it, in the BIOS read-only area a kernel scans for the RSDP
#: (ACPI 6.5, 5.2.5.1: 0xE0000-0xFFFFF), reserved in e820 with the rest of the system area.
ACPI_RSDP_START = 0xE0000
#: Where the kernel (or any high memory) may begin.
HIMEM_START = 0x100000
#: The 32-bit MMIO gap: RAM stops at 3 GiB and resumes at 4 GiB.
MMIO32_START = 0xC000_0000
MMIO32_END = 0x1_0000_0000
#: Default IOAPIC and local APIC MMIO addresses (Intel MP spec 1.4, 3.6.1).
IOAPIC_ADDRESS = 0xFEC0_0000
APIC_DEFAULT_ADDRESS = 0xFEE0_0000
#: Three pages KVM needs for the real-mode TSS on VMX (KVM_SET_TSS_ADDR), inside the gap.
KVM_TSS_ADDRESS = 0xFFFB_D000
