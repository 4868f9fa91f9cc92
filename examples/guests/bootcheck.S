/*
 * bootcheck.S - a tiny 64-bit guest that checks the state the VMM hands over.
 *
 * The VMM loads this ELF by PT_LOAD at p_paddr (0x1000000) and enters it at
 * e_entry (0x1000000) in the state the Linux 64-bit boot protocol describes
 * (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): long mode, paging
 * on with an identity map, RSI = physical address of struct boot_params,
 * interrupts off, __BOOT_CS / __BOOT_DS segments.
 *
 * The guest reads each piece of state, compares it with the value the VMM is
 * supposed to set (embedded below), and prints, after a "BOOTCHECK START"
 * banner line, ONE line per check on COM1:
 *
 *     CHECK <name> <value: 16 lowercase hex digits> <ok|FAIL>
 *
 * followed by the informational lines
 *
 *     CPUID_1 <eax> <ebx> <ecx> <edx>      (8 lowercase hex digits each)
 *     BOOTCHECK DONE <n_failed>            (decimal)
 *
 * and then writes n_failed (clamped to 255) to the exit port 0xf4 with a
 * 1-byte OUT. The "cmdline" check is preceded by "CMDLINE <string>".
 * Every line ends in a single '\n'.
 *
 * Instruction set: integer instructions, port I/O, rdmsr, cpuid, sgdt,
 * fnstcw and fxsave only. On the nested kvm_pvm host used for development,
 * ring-0 code is run by KVM's instruction emulator, which fails on SSE
 * (stmxcsr, pxor, ...), int3, popcnt, clac/stac, rdtscp, xgetbv, cmpxchg16b
 * and AVX (see the shared reference note "int3-and-emulation-failures.md").
 * So: no SSE except fxsave, no int3.
 *
 * Register convention inside the guest: routines may clobber rax, rcx, rdx,
 * rsi, rdi, r8-r11 and preserve rbx, rbp, r12-r15 (SysV-like). The main flow
 * keeps the boot_params pointer in r15.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "serial.inc"
        .include "exit.inc"
        .include "gdt64.inc"
        .include "paging64.inc"
        .include "cmdline.inc"

/* ---- constants ---------------------------------------------------------- */

        .set MSR_MISC_ENABLE, 0x1a0     /* IA32_MISC_ENABLE  (SDM vol 4, table 2-2) */
        .set MSR_MTRR_DEF,    0x2ff     /* IA32_MTRR_DEF_TYPE (SDM vol 3A 12.11.2.1) */

        .set EFER_LMA_BIT, 10           /* EFER.LMA, bit 10 (SDM vol 3A 2.2.1) */
        .set CR4_OSFXSR,   0x200        /* CR4 bit 9 (SDM vol 3A 2.5) */

        /* struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h) */
        .set BP_E820_ENTRIES, 0x1e8     /* u8 */
        .set BP_BOOT_FLAG,    0x1fe     /* u16, hdr.boot_flag = 0xAA55 */
        .set BP_HEADER,       0x202     /* u32, hdr.header = "HdrS" */
        .set BP_LOADER,       0x210     /* u8,  hdr.type_of_loader */
        .set BP_CMD_LINE_PTR, 0x228     /* u32, hdr.cmd_line_ptr */
        .set BP_CMDLINE_SIZE, 0x238     /* u32, hdr.cmdline_size */
        .set BP_E820_TABLE,   0x2d0     /* struct boot_e820_entry[128] */
        .set E820_ENTRY_SIZE, 20        /* u64 addr, u64 size, u32 type (packed) */
        .set E820_MAX_ZP,     128       /* E820_MAX_ENTRIES_ZEROPAGE */
        .set E820_TYPE_RAM,   1

        .set BOOT_PARAMS_PA,  0x7000    /* where this VMM puts the zero page */
        .set LOAD_ADDR,       0x1000000 /* linked == loaded address (bootcheck.ld) */
        .set IDMAP_MAGIC,     0x1d3a7c0ffee5a5a5 /* stored in magic_var by identity_map */

        /*
         * high_map: 0xffffffff81000000 is Linux's __START_KERNEL_map + 16 MiB.
         * Under 4-level paging (SDM vol 3A 4.5) it splits into PML4 index 511
         * (bits 47:39), PDPT index 510 (bits 38:30), PD index 8 (bits 29:21).
         */
        .set HIGH_BASE,       0xffffffff81000000
        .set HIGH_PML4_IDX,   511
        .set HIGH_PDPT_IDX,   510
        .set HIGH_PD_IDX,     8

/* ---- macros ------------------------------------------------------------- */

/*
 * REPORT name: print "CHECK <name> <rax as 16 hex digits> ok|FAIL".
 * Expects the value in RAX and EDX = 1 (ok) or 0 (FAIL). Counts failures.
 * The name string is emitted into .rodata next to the call site.
 */
        .macro REPORT name:req
        .pushsection .rodata.names, "a", @progbits
.Lname\@:
        .asciz "\name"
        .popsection
        lea     rdi, [rip + .Lname\@]
        mov     rsi, rax
        call    report
        .endm

/* CHECK_EQ name, expected: ok iff RAX == expected (all 64 bits). */
        .macro CHECK_EQ name:req, expected:req
        movabs  rcx, \expected
        xor     edx, edx
        cmp     rax, rcx
        sete    dl
        REPORT  \name
        .endm

/* CHECK_BIT name, bit: ok iff bit <bit> of RAX is set. */
        .macro CHECK_BIT name:req, bit:req
        xor     edx, edx
        bt      rax, \bit
        setc    dl
        REPORT  \name
        .endm

/* READ_MSR msr: RAX = 64-bit value of MSR <msr> (rdmsr gives EDX:EAX). */
        .macro READ_MSR msr:req
        mov     ecx, \msr
        rdmsr
        shl     rdx, 32
        or      rax, rdx
        .endm

/* PUTS label: print the NUL-terminated string at <label>. */
        .macro PUTS label:req
        lea     rdi, [rip + \label]
        call    puts
        .endm

/* ---- entry -------------------------------------------------------------- */

        .section .text.entry, "ax", @progbits
        .globl  _start
        .type   _start, @function
_start:
        /*
         * Save the entry registers before anything can change them. MOV does
         * not touch RFLAGS, so the PUSHFQ below still sees the entry flags.
         * PUSHFQ uses 8 bytes of the VMM's entry stack (RSP = 0x8ff0), which
         * the boot protocol allows; we switch to our own stack right after.
         */
        mov     qword ptr [rip + entry_rsi], rsi
        mov     qword ptr [rip + entry_rsp], rsp
        pushfq
        pop     qword ptr [rip + entry_rflags]

        /*
         * Zero .bss (a loader need not clear p_memsz - p_filesz). No call
         * before this: the stack lives in .bss. DF=0 at entry is one of the
         * checked values, but CLD anyway - the flags are already saved.
         */
        cld
        ZERO_QWORDS __bss_start, __bss_end

        lea     rsp, [rip + stack_top]
        xor     ebp, ebp
        mov     r15, qword ptr [rip + entry_rsi]
        jmp     main

        .text

/* ---- main --------------------------------------------------------------- */

main:
        PUTS    str_banner

        /*
         * long_mode: IA32_EFER.LMA (bit 10) is set by the CPU when IA-32e
         * mode is active (SDM vol 3A 2.2.1, 10.8.5). Value = EFER.
         */
        READ_MSR MSR_EFER
        CHECK_BIT long_mode, EFER_LMA_BIT

        /*
         * cr0 = PG (bit 31) | ET (bit 4) | PE (bit 0) = 0x80000011: paging and
         * protection on, as the 64-bit boot protocol requires (boot.rst;
         * SDM vol 3A 2.5). ET is reserved-as-1 on modern CPUs.
         */
        mov     rax, cr0
        CHECK_EQ cr0, 0x80000011

        /* cr3 = 0x9000: the VMM's PML4 page, no PCID/PWT/PCD bits (SDM vol 3A 4.5). */
        mov     rax, cr3
        CHECK_EQ cr3, 0x9000

        /*
         * cr4 = PAE (bit 5) only. PAE is mandatory for IA-32e paging
         * (SDM vol 3A 4.1.1). Read here, before we set OSFXSR for fxsave.
         */
        mov     rax, cr4
        CHECK_EQ cr4, 0x20

        /* efer = LME (bit 8) | LMA (bit 10) = 0x500; no SCE/NXE (SDM vol 3A 2.2.1). */
        READ_MSR MSR_EFER
        CHECK_EQ efer, 0x500

        /*
         * Segments: boot.rst says __BOOT_CS (0x10) and __BOOT_DS (0x18), the
         * GDT indices 2 and 3 of the 32/64-bit boot protocol.
         */
        xor     eax, eax
        mov     ax, cs
        CHECK_EQ cs, BOOT_CS

        xor     eax, eax
        mov     ax, ds
        CHECK_EQ ds, BOOT_DS

        xor     eax, eax
        mov     ax, ss
        CHECK_EQ ss, BOOT_DS

        /*
         * GDT contents, via SGDT (SDM vol 3A 3.5.1, 3.4.5):
         *  0x00af9b000000ffff: base 0, limit 0xfffff, G=1, L=1, D=0, P=1,
         *                      DPL=0, type 0xb (execute/read, accessed)
         *  0x00cf93000000ffff: base 0, limit 0xfffff, G=1, D/B=1, P=1,
         *                      DPL=0, type 0x3 (read/write, accessed)
         * (the same descriptors Linux's boot code and Firecracker use).
         */
        sgdt    [rip + gdtr_buf]
        mov     rbx, qword ptr [rip + gdtr_buf + 2]     /* GDTR.base */
        mov     rax, qword ptr [rbx + BOOT_CS]
        CHECK_EQ gdt_code, DESC_CODE64

        mov     rax, qword ptr [rbx + BOOT_DS]
        CHECK_EQ gdt_data, DESC_DATA

        mov     rax, rbx
        CHECK_EQ gdtr_base, 0x500

        /*
         * reload_segments: do what a kernel does first - a far return to
         * reload CS from the GDT (SDM vol 2 RET, "far return"), then load the
         * data selector into DS/ES/SS. If a descriptor were bad this would
         * fault (triple fault: no IDT yet). Value = CS read afterwards.
         */
        RELOAD_CS BOOT_CS
        mov     eax, BOOT_DS
        mov     ds, eax
        mov     es, eax
        mov     ss, eax
        xor     eax, eax
        mov     ax, cs
        CHECK_EQ reload_segments, BOOT_CS

        /*
         * pml4_0: PML4[0] (the qword at CR3) must point to the PDPT at 0xa000
         * with P (bit 0) and R/W (bit 1) set (SDM vol 3A 4.5, table 4-15).
         * The raw entry is printed; the CPU may have set A (bit 5).
         */
        mov     rax, cr3
        and     rax, -PAGE_4K
        mov     rax, qword ptr [rax]
        mov     rcx, rax
        and     rcx, -PAGE_4K
        mov     r8d, eax
        and     r8d, PTE_P_RW
        xor     edx, edx
        cmp     rcx, 0xa000
        jne     1f
        cmp     r8d, PTE_P_RW
        sete    dl
1:      REPORT  pml4_0

        /*
         * identity_map: virtual == physical. Write a magic through a
         * RIP-relative address, read it back through the absolute (linked =
         * physical) address; then read hdr.header through the fixed physical
         * address 0x7000 + 0x202 instead of through RSI. Value = that qword;
         * ok iff the magic round-trips and its low dword is "HdrS".
         */
        movabs  rax, IDMAP_MAGIC
        mov     qword ptr [rip + magic_var], rax
        mov     rcx, qword ptr [magic_var]
        xor     edx, edx
        cmp     rcx, rax
        jne     1f
        mov     rax, qword ptr [BOOT_PARAMS_PA + BP_HEADER]
        cmp     eax, 0x53726448
        sete    dl
        jmp     2f
1:      mov     rax, qword ptr [BOOT_PARAMS_PA + BP_HEADER]
2:      REPORT  identity_map

        /*
         * high_map: does the backend honour a non-identity 4-level mapping
         * the guest builds itself? Linux runs at the "high kernel mapping"
         * (__START_KERNEL_map = 0xffffffff80000000), which its early boot
         * code sets up in page tables of its own; a backend that only copes
         * with the VMM's identity tables, or caches translations across a
         * CR3 write, would break there.
         *
         * Map the 2 MiB page at physical 16 MiB (where this guest is loaded)
         * at HIGH_BASE = 0xffffffff81000000 (SDM vol 3A 4.5):
         *   PD[8]        = 0x1000000 | P|RW|PS   (table 4-18, 2 MiB page)
         *   PDPT[510]    = &high_pd   | P|RW     (table 4-17)
         *   PML4[511]    = &high_pdpt | P|RW     (table 4-15)
         * The PML4 is the VMM's, at CR3[51:12] (table 4-12); it only uses
         * PML4[0], so slot 511 is free. high_pdpt/high_pd are 4 KiB aligned
         * in .bss (zeroed at entry), and as the guest runs identity mapped
         * their linked addresses are their physical addresses. MOV to CR3
         * then invalidates the (non-global) TLB entries (SDM vol 3A
         * 4.10.4.1), so the new entries are used.
         *
         * Read magic_var (IDMAP_MAGIC, stored by identity_map) through
         * HIGH_BASE + (magic_var - LOAD_ADDR) and through its identity
         * address. Value = the qword read through the high mapping; ok iff
         * it equals both the identity read and IDMAP_MAGIC. If the mapping
         * is not honoured at all the read page-faults, and with no IDT that
         * is a triple fault: the run then ends without the later CHECK lines.
         *
         * Afterwards PML4[511] is cleared and CR3 reloaded again, so the
         * VMM's tables are left as found (high_pdpt/high_pd stay unused).
         */
        mov     r8, cr3
        and     r8, -PAGE_4K                    /* PML4 physical address */
        lea     r9, [rip + high_pdpt]
        lea     r10, [rip + high_pd]
        mov     qword ptr [r10 + HIGH_PD_IDX * 8], LOAD_ADDR | PTE_P_RW | PTE_PS
        lea     rax, [r10 + PTE_P_RW]
        mov     qword ptr [r9 + HIGH_PDPT_IDX * 8], rax
        lea     rax, [r9 + PTE_P_RW]
        mov     qword ptr [r8 + HIGH_PML4_IDX * 8], rax
        mov     rax, cr3                        /* flush the TLB (4.10.4.1) */
        mov     cr3, rax

        movabs  r11, HIGH_BASE
        lea     rcx, [rip + magic_var]
        sub     rcx, LOAD_ADDR
        add     rcx, r11                        /* high alias of magic_var */
        /*
         * The high alias of code, e.g. of main, is formed the same way (it
         * is where a kernel would jump to leave the identity map). It is
         * only computed, never executed, and not checked.
         */
        lea     r13, [rip + main]
        sub     r13, LOAD_ADDR
        add     r13, r11                        /* high alias of main */

        mov     rbx, qword ptr [rcx]            /* through the high mapping */
        mov     rax, qword ptr [magic_var]      /* through the identity map */
        movabs  rcx, IDMAP_MAGIC
        xor     r12d, r12d
        cmp     rbx, rax
        jne     1f
        cmp     rbx, rcx
        sete    r12b
1:      mov     qword ptr [r8 + HIGH_PML4_IDX * 8], 0
        mov     rax, cr3                        /* flush again */
        mov     cr3, rax
        mov     rax, rbx
        mov     edx, r12d
        REPORT  high_map

        /* bp_hdrs: hdr.header = 0x53726448 "HdrS" (boot.rst, offset 0x202). */
        mov     eax, dword ptr [r15 + BP_HEADER]
        CHECK_EQ bp_hdrs, 0x53726448

        /* bp_boot_flag: hdr.boot_flag = 0xAA55 (boot.rst, offset 0x1FE). */
        movzx   eax, word ptr [r15 + BP_BOOT_FLAG]
        CHECK_EQ bp_boot_flag, 0xaa55

        /*
         * bp_loader: hdr.type_of_loader = 0xFF, "undefined" boot loader
         * (boot.rst, offset 0x210, "type_of_loader").
         */
        movzx   eax, byte ptr [r15 + BP_LOADER]
        CHECK_EQ bp_loader, 0xff

        /* bp_e820_entries: e820_entries (zero-page.rst, 0x1E8); need >= 2. */
        movzx   eax, byte ptr [r15 + BP_E820_ENTRIES]
        xor     edx, edx
        cmp     eax, 2
        setae   dl
        REPORT  bp_e820_entries

        /*
         * e820_sorted: entries must have strictly increasing addr and must
         * not overlap (addr[i] >= addr[i-1] + size[i-1], no 64-bit wrap);
         * 1 <= count <= 128. Value = count.
         */
        movzx   eax, byte ptr [r15 + BP_E820_ENTRIES]
        mov     r9d, eax                        /* entries left */
        lea     rsi, [r15 + BP_E820_TABLE]
        xor     edx, edx
        test    r9d, r9d
        jz      .Le820_done
        cmp     r9d, E820_MAX_ZP
        ja      .Le820_done
        mov     r10, qword ptr [rsi]            /* previous addr */
        mov     r11, r10
        add     r11, qword ptr [rsi + 8]        /* previous end */
        jc      .Le820_done
.Le820_next:
        dec     r9d
        jz      .Le820_good
        add     rsi, E820_ENTRY_SIZE
        mov     rcx, qword ptr [rsi]
        cmp     rcx, r10
        jbe     .Le820_done                     /* not strictly increasing */
        cmp     rcx, r11
        jb      .Le820_done                     /* overlaps the previous one */
        mov     r10, rcx
        mov     r11, rcx
        add     r11, qword ptr [rsi + 8]
        jc      .Le820_done
        jmp     .Le820_next
.Le820_good:
        mov     edx, 1
.Le820_done:
        REPORT  e820_sorted

        /*
         * e820_low_ram: the first entry must be usable RAM (type 1) at
         * address 0 - real-mode IVT/BDA area. Value = that entry's size.
         */
        xor     edx, edx
        xor     eax, eax
        cmp     byte ptr [r15 + BP_E820_ENTRIES], 0
        je      1f
        mov     rax, qword ptr [r15 + BP_E820_TABLE + 8]
        cmp     qword ptr [r15 + BP_E820_TABLE], 0
        jne     1f
        cmp     dword ptr [r15 + BP_E820_TABLE + 16], E820_TYPE_RAM
        sete    dl
1:      REPORT  e820_low_ram

        /*
         * cmdline: print "CMDLINE <string>" (control characters shown as '?'
         * so the line stays one line), then check that strlen + 1 equals
         * hdr.cmdline_size as written by this VMM (Firecracker-style: the
         * size including the NUL). Note boot.rst documents cmdline_size as
         * the kernel's maximum; here it is the VMM's actual size.
         * Value = cmdline_size. Fails if cmd_line_ptr is 0.
         */
        PUTS    str_cmdline
        mov     ebx, dword ptr [r15 + BP_CMD_LINE_PTR]  /* zero-extended */
        xor     r12d, r12d                              /* strlen */
        test    rbx, rbx
        jz      .Lcmd_printed
        PUT_CMDLINE rbx, r12, r12d, .Lcmd_printed
        mov     eax, dword ptr [r15 + BP_CMDLINE_SIZE]
        xor     edx, edx
        test    rbx, rbx
        jz      1f
        lea     ecx, [r12 + 1]
        cmp     eax, ecx
        sete    dl
1:      REPORT  cmdline

        /*
         * MSRs the VMM sets (same values as Firecracker's boot MSRs):
         * MISC_ENABLE = 1 (fast strings, SDM vol 4 table 2-2),
         * MTRRdefType = 0x806 (E=1, default type 6 = WB; SDM vol 3A 12.11.2.1),
         * LSTAR = 0 (syscall entry not yet set up; SDM vol 3A 5.8.8).
         */
        READ_MSR MSR_MISC_ENABLE
        CHECK_EQ msr_misc_enable, 1

        READ_MSR MSR_MTRR_DEF
        CHECK_EQ msr_mtrr_def, 0x806

        READ_MSR MSR_LSTAR
        CHECK_EQ msr_lstar, 0

        /* fcw = 0x37f: the x87 FINIT/reset control word (SDM vol 1 8.1.5). */
        fnstcw  word ptr [rip + fcw_buf]
        movzx   eax, word ptr [rip + fcw_buf]
        CHECK_EQ fcw, 0x37f

        /*
         * mxcsr = 0x1f80: all exceptions masked, round-to-nearest, the reset
         * value (SDM vol 1 10.2.3). Read with FXSAVE (MXCSR at byte 24 of the
         * 512-byte area, SDM vol 2 FXSAVE table 3-53), not STMXCSR, which the
         * kvm_pvm emulator rejects. FXSAVE needs CR4.OSFXSR for the SSE part;
         * CR4 is restored afterwards.
         */
        mov     rbx, cr4
        mov     rax, rbx
        or      rax, CR4_OSFXSR
        mov     cr4, rax
        fxsave  [rip + fxsave_area]
        mov     cr4, rbx
        mov     eax, dword ptr [rip + fxsave_area + 24]
        CHECK_EQ mxcsr, 0x1f80

        /*
         * cpuid_hypervisor: CPUID.1:ECX bit 31 is the "hypervisor present"
         * bit, reserved on bare metal (SDM vol 2 CPUID; KVM sets it).
         * Value = CPUID.1:ECX.
         */
        mov     eax, 1
        xor     ecx, ecx
        cpuid
        mov     eax, ecx
        CHECK_BIT cpuid_hypervisor, 31

        /* apic_id: CPUID.1:EBX[31:24] = initial APIC ID, 0 for vCPU 0 (SDM vol 2 CPUID). */
        mov     eax, 1
        xor     ecx, ecx
        cpuid
        mov     eax, ebx
        shr     eax, 24
        CHECK_EQ apic_id, 0

        /*
         * rflags = 0x2 at entry: only the always-1 bit 1; IF=0 because
         * boot.rst requires interrupts disabled; DF=0 (SDM vol 1 3.4.3).
         */
        mov     rax, qword ptr [rip + entry_rflags]
        CHECK_EQ rflags, 0x2

        /* rsp = 0x8ff0: the VMM's boot stack pointer (Firecracker's BOOT_STACK_POINTER). */
        mov     rax, qword ptr [rip + entry_rsp]
        CHECK_EQ rsp, 0x8ff0

        /* ---- informational: CPUID_1 eax ebx ecx edx ---- */
        mov     eax, 1
        xor     ecx, ecx
        cpuid
        mov     r12d, eax
        mov     r13d, ebx
        mov     r14d, ecx
        mov     ebx, edx
        PUTS    str_cpuid1
        mov     edi, r12d
        call    put_hex32
        mov     eax, ' '
        call    putc
        mov     edi, r13d
        call    put_hex32
        mov     eax, ' '
        call    putc
        mov     edi, r14d
        call    put_hex32
        mov     eax, ' '
        call    putc
        mov     edi, ebx
        call    put_hex32
        mov     eax, 10
        call    putc

        /* ---- summary and exit ---- */
        PUTS    str_done
        mov     edi, dword ptr [rip + n_failed]
        call    put_dec
        mov     eax, 10
        call    putc

        EXIT_CLAMPED "dword ptr [rip + n_failed]"   /* then, if the VMM ignores it, park */

/* ---- output routines ---------------------------------------------------- */

/*
 * putc: write the byte in AL to COM1. Polls LSR until THRE (bit 5) so we never
 * overrun a real 16550; gives up after PUTC_SPIN polls and sends anyway
 * (serial.inc). Clobbers rax, rcx, rdx, r8.
 */
putc:
        mov     r8d, eax                /* the byte to send */
        SEND_POLLED r8d, PUTC_SPIN
        ret

/* puts: write the NUL-terminated string at RDI. */
puts:
        push    rbx
        mov     rbx, rdi
1:      movzx   eax, byte ptr [rbx]
        test    eax, eax
        jz      2f
        call    putc
        inc     rbx
        jmp     1b
2:      pop     rbx
        ret

/* put_hex_n: write the low ESI nibbles of RDI as lowercase hex, most significant first. */
put_hex_n:
        push    rbx
        push    r12
        mov     rbx, rdi
        mov     r12d, esi
1:      dec     r12d
        js      3f
        lea     ecx, [r12 * 4]
        mov     rax, rbx
        shr     rax, cl
        and     eax, 0xf
        cmp     eax, 10
        jb      2f
        add     eax, 'a' - '0' - 10
2:      add     eax, '0'
        call    putc
        jmp     1b
3:      pop     r12
        pop     rbx
        ret

/* put_hex64: RDI as 16 hex digits. put_hex32: EDI as 8 hex digits. */
put_hex64:
        mov     esi, 16
        jmp     put_hex_n
put_hex32:
        mov     esi, 8
        jmp     put_hex_n

/* put_dec: write RDI as an unsigned decimal number. */
put_dec:
        mov     rax, rdi
        mov     ecx, 10
        xor     r8d, r8d                /* digit count */
1:      xor     edx, edx
        div     rcx
        add     edx, '0'
        push    rdx
        inc     r8d
        test    rax, rax
        jnz     1b
2:      pop     rax
        push    r8
        call    putc
        pop     r8
        dec     r8d
        jnz     2b
        ret

/*
 * report: print "CHECK <name> <value> ok|FAIL\n".
 * RDI = name (NUL-terminated), RSI = value, EDX = 1 ok / 0 FAIL.
 * Increments n_failed on FAIL.
 */
report:
        push    rbx
        push    r12
        push    r13
        mov     rbx, rdi
        mov     r12, rsi
        mov     r13d, edx
        PUTS    str_check
        mov     rdi, rbx
        call    puts
        mov     eax, ' '
        call    putc
        mov     rdi, r12
        call    put_hex64
        mov     eax, ' '
        call    putc
        lea     rdi, [rip + str_ok]
        test    r13d, r13d
        jnz     1f
        inc     dword ptr [rip + n_failed]
        lea     rdi, [rip + str_fail]
1:      call    puts
        pop     r13
        pop     r12
        pop     rbx
        ret

/* ---- data --------------------------------------------------------------- */

        .section .rodata, "a", @progbits
str_banner:     .asciz "BOOTCHECK START\n"
str_check:      .asciz "CHECK "
str_ok:         .asciz "ok\n"
str_fail:       .asciz "FAIL\n"
str_cmdline:    .asciz "CMDLINE "
str_cpuid1:     .asciz "CPUID_1 "
str_done:       .asciz "BOOTCHECK DONE "

        .data
        .balign 8
entry_rsi:      .quad 0                 /* RSI at entry: &boot_params */
entry_rsp:      .quad 0                 /* RSP at entry */
entry_rflags:   .quad 0                 /* RFLAGS at entry */
magic_var:      .quad 0
n_failed:       .long 0

        .bss
        .balign 4096                    /* paging structures: 4 KiB aligned */
high_pdpt:      .skip 4096              /* high_map: PDPT (SDM vol 3A 4.5) */
high_pd:        .skip 4096              /* high_map: PD */
        .balign 16
fxsave_area:    .skip 512               /* FXSAVE needs 16-byte alignment */
gdtr_buf:       .skip 16                /* SGDT: u16 limit, u64 base */
fcw_buf:        .skip 8
        .balign 16
stack_bottom:   .skip 16384
stack_top:

        .section .note.GNU-stack, "", @progbits
