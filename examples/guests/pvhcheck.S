/*
 * pvhcheck.S - a tiny guest that checks the state a VMM hands over through
 * the Xen PVH boot ABI (xen docs/misc/pvh.pandoc, "x86/HVM direct boot ABI").
 *
 * The file is an ELF64 x86_64 executable (the VMM only accepts ELF64) whose
 * real entry point is 32-bit code: a loader that supports PVH finds the entry
 * in the ELF note "Xen" / XEN_ELFNOTE_PHYS32_ENTRY (18) (xen
 * include/public/elfnote.h), found through the PT_NOTE program header that
 * pvhcheck.ld emits, and jumps there in 32-bit protected mode with paging
 * off and EBX = physical address of struct hvm_start_info (xen
 * include/public/arch-x86/hvm/start_info.h). e_entry points at a 64-bit stub
 * that is never meant to run: it writes 255 to the exit port, so a loader
 * that wrongly enters at e_entry fails fast instead of hanging.
 *
 * The guest reads each piece of state, compares it with the value the
 * vmm-arch VMM sets (embedded below), and prints, after a "PVHCHECK START"
 * banner line, ONE line per check on COM1:
 *
 *     CHECK <name> <value: 16 lowercase hex digits> <ok|FAIL>
 *
 * The "pvh_cmdline" check is preceded by "CMDLINE <string>", and the
 * "pvh_modules" check is followed by "MODULE0 <paddr> <size>" (16 hex digits
 * each) when there is at least one module. The run ends with
 *
 *     PVHCHECK DONE <n_failed>            (decimal)
 *
 * and n_failed (clamped to 255) is written to the exit port 0xf4 with a
 * 1-byte OUT. Every line ends in a single '\n'.
 *
 * What the ABI promises at the entry point (pvh.pandoc):
 *   ebx: physical address of hvm_start_info;  cr0: PE set, every other
 *   writable bit clear;  cr4: 0;  cs: flat 32-bit code, ds/es/ss: flat 32-bit
 *   data (selectors unspecified);  tr: 32-bit TSS, base 0, limit 0x67;
 *   eflags: VM, IF and TF clear, other bits unspecified (so DF may be set:
 *   we CLD before any string instruction);  all other registers
 *   unspecified - in particular there is NO valid stack.
 * The exact CR0/EFER/selector values checked are what vmm-arch sets
 * (vmmarch_cli/arch/x86_64/regs.py pvh_sregs, gdt.pvh_gdt): CR0 = PE|ET,
 * EFER = 0, CS = 0x08, DS = SS = 0x10, TR = 0x18. Other loaders (QEMU's
 * PVH option ROM / qboot) may use other selectors.
 *
 * All code after the 64-bit stub is .code32: no 64-bit instructions, and
 * (as in bootcheck.S, for the kvm_pvm hosts whose ring 0 is emulated) no SSE
 * and no int3. Addresses are absolute: the image is linked virtual ==
 * physical at 0x1000000 and paging is off.
 *
 * Register convention: routines may clobber eax, ecx, edx and preserve ebx,
 * esi, edi, ebp (cdecl-like). The main flow keeps the start_info pointer in
 * ebp.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "serial.inc"
        .include "exit.inc"
        .include "cmdline.inc"

/* ---- constants ---------------------------------------------------------- */

        /* Entry state vmm-arch sets (see the header comment). */
        .set PVH_CR0,   0x11            /* PE (bit 0) | ET (bit 4, hard-wired 1) */
        .set PVH_CS,    0x08
        .set PVH_DS,    0x10
        .set PVH_TR,    0x18
        .set EFLAGS_MUST_BE_CLEAR, 0x20200  /* VM (bit 17) | IF (bit 9) */

        /*
         * struct hvm_start_info (start_info.h, version 1); all fields
         * little-endian, u64 addresses are physical.
         */
        .set XEN_HVM_START_MAGIC, 0x336ec578
        .set SI_MAGIC,          0x00    /* u32 */
        .set SI_VERSION,        0x04    /* u32, >= 1 */
        .set SI_FLAGS,          0x08    /* u32 */
        .set SI_NR_MODULES,     0x0c    /* u32 */
        .set SI_MODLIST_PADDR,  0x10    /* u64 -> hvm_modlist_entry[nr_modules] */
        .set SI_CMDLINE_PADDR,  0x18    /* u64 -> NUL-terminated string */
        .set SI_RSDP_PADDR,     0x20    /* u64 */
        .set SI_MEMMAP_PADDR,   0x28    /* u64 -> hvm_memmap_table_entry[] (v1) */
        .set SI_MEMMAP_ENTRIES, 0x30    /* u32 (v1) */
        .set SI_SIZE,           0x38

        /* struct hvm_modlist_entry: u64 paddr, u64 size, u64 cmdline_paddr, u64 reserved */
        .set MOD_PADDR,         0x00
        .set MOD_SIZE,          0x08

        /* struct hvm_memmap_table_entry: u64 addr, u64 size, u32 type, u32 reserved */
        .set MM_ADDR,           0x00
        .set MM_SIZE,           0x08
        .set MM_TYPE,           0x10
        .set MM_ENTRY_SIZE,     24
        .set MM_TYPE_RAM,       1       /* XEN_HVM_MEMMAP_TYPE_RAM (= E820 RAM) */
        .set MM_MAX,            1024    /* sanity bound for the sorted scan */

/* ---- macros ------------------------------------------------------------- */

/*
 * REPORT name: print "CHECK <name> <EDX:EAX as 16 hex digits> ok|FAIL".
 * Expects the value in EDX:EAX and ECX = 1 (ok) or 0 (FAIL). Counts
 * failures. The name string is emitted into .rodata next to the call site
 * and passed on the stack (the callee reads it at [esp+4]).
 */
        .macro REPORT name:req
        .pushsection .rodata.names, "a", @progbits
.Lname\@:
        .asciz "\name"
        .popsection
        push    offset .Lname\@
        call    report
        add     esp, 4
        .endm

/* CHECK_EQ name, expected: ok iff EAX == expected; printed zero-extended. */
        .macro CHECK_EQ name:req, expected:req
        xor     ecx, ecx
        cmp     eax, \expected
        sete    cl
        xor     edx, edx
        REPORT  \name
        .endm

/* PUTS label: print the NUL-terminated string at <label>. */
        .macro PUTS label:req
        mov     eax, offset \label
        call    puts
        .endm

/* ---- 64-bit e_entry stub ------------------------------------------------ */

/*
 * e_entry (0x1000000). A PVH loader never jumps here; if a loader uses the
 * 64-bit Linux boot protocol by mistake, end the run at once with status 255.
 * These bytes (b0 ff e6 f4 fa f4 eb fd) decode the same in 32- and 64-bit mode.
 */
        .section .text.entry, "ax", @progbits
        .code64
        .globl  _start
        .type   _start, @function
_start:
        mov     al, 0xff
        EXIT_PARK

/* ---- 32-bit PVH entry ----------------------------------------------------- */

        .text
        .code32
        .globl  pvh_start
        .type   pvh_start, @function
pvh_start:
        /*
         * Save EBX (&hvm_start_info) before anything else. No stack exists
         * yet (pvh.pandoc leaves ESP unspecified), so the first stack use
         * must come after loading our own ESP. MOV touches no flags, so the
         * PUSHFD still sees the entry EFLAGS. Both saves go to .data, which
         * the .bss clearing below does not touch.
         */
        mov     dword ptr [entry_ebx], ebx
        mov     esp, offset stack_top
        pushfd
        pop     dword ptr [entry_eflags]

        /*
         * Zero .bss (a loader need not clear p_memsz - p_filesz). DF is
         * unspecified at entry, so CLD first. REP STOSD writes through ES,
         * which the ABI makes a flat data segment. The stack lives in .bss:
         * nothing is on it right now.
         */
        cld
        mov     edi, offset __bss_start
        mov     ecx, offset __bss_end
        sub     ecx, edi
        shr     ecx, 2
        xor     eax, eax
        rep stosd

        xor     ebp, ebp
        jmp     main

/* ---- main --------------------------------------------------------------- */

main:
        PUTS    str_banner

        /*
         * pvh_cr0: "bit 0 (PE) must be set. All the other writeable bits are
         * cleared" (pvh.pandoc). ET (bit 4) is hard-wired to 1 on every CPU
         * since the i486 (SDM vol 3A 2.5), so the value is 0x11; PG clear.
         */
        mov     eax, cr0
        CHECK_EQ pvh_cr0, PVH_CR0

        /* pvh_cr4: "all bits are cleared" (pvh.pandoc). */
        mov     eax, cr4
        CHECK_EQ pvh_cr4, 0

        /*
         * pvh_efer: not named by the ABI, but a 32-bit entry with paging off
         * means no LME/LMA; vmm-arch also leaves SCE/NXE clear, so EFER = 0
         * (SDM vol 3A 2.2.1). Value = all 64 bits (RDMSR gives EDX:EAX).
         */
        mov     ecx, MSR_EFER
        rdmsr
        mov     ebx, eax
        or      ebx, edx
        xor     ecx, ecx
        test    ebx, ebx
        sete    cl
        REPORT  pvh_efer

        /*
         * Segment selectors. pvh.pandoc leaves them unspecified; these are
         * vmm-arch's GDT slots: code 0x08, data 0x10, TSS 0x18.
         */
        xor     eax, eax
        mov     ax, cs
        CHECK_EQ pvh_cs, PVH_CS

        xor     eax, eax
        mov     ax, ds
        CHECK_EQ pvh_ds, PVH_DS

        xor     eax, eax
        mov     ax, ss
        CHECK_EQ pvh_ss, PVH_DS

        /* pvh_tr: the ABI requires a loaded 32-bit TSS; STR gives its selector. */
        xor     eax, eax
        str     ax
        CHECK_EQ pvh_tr, PVH_TR

        /*
         * pvh_eflags: the EFLAGS saved at entry. "bit 17 (VM) must be
         * cleared. Bit 9 (IF) must be cleared. Bit 8 (TF) must be cleared.
         * Other bits are all unspecified" (pvh.pandoc). A set TF would have
         * trapped already, so only VM|IF are tested. Value = EFLAGS.
         */
        mov     eax, dword ptr [entry_eflags]
        xor     ecx, ecx
        test    eax, EFLAGS_MUST_BE_CLEAR
        setz    cl
        xor     edx, edx
        REPORT  pvh_eflags

        /*
         * pvh_magic: hvm_start_info.magic == XEN_HVM_START_MAGIC_VALUE
         * (start_info.h). Value = the u32 at [EBX].
         */
        mov     ebp, dword ptr [entry_ebx]
        mov     eax, dword ptr [ebp + SI_MAGIC]
        CHECK_EQ pvh_magic, XEN_HVM_START_MAGIC

        /*
         * If the magic is wrong, EBX does not point at a start_info and its
         * "addresses" could be anything (reads of unbacked guest-physical
         * memory may stop the VM). Use an all-zero dummy instead: every
         * check below then FAILs (or prints 0) without wild reads.
         */
        cmp     dword ptr [ebp + SI_MAGIC], XEN_HVM_START_MAGIC
        je      1f
        mov     ebp, offset dummy_start_info
1:

        /* pvh_version: >= 1 (version 1 added the memory map fields). */
        mov     eax, dword ptr [ebp + SI_VERSION]
        xor     ecx, ecx
        cmp     eax, 1
        setae   cl
        xor     edx, edx
        REPORT  pvh_version

        /*
         * pvh_cmdline: print "CMDLINE <string>" (control characters shown as
         * '?' so the line stays one line; a paddr at or above 4 GiB, which
         * paging-off code cannot reach, prints nothing), then check that
         * cmdline_paddr != 0. Value = cmdline_paddr (64 bits).
         */
        PUTS    str_cmdline
        mov     esi, dword ptr [ebp + SI_CMDLINE_PADDR]
        cmp     dword ptr [ebp + SI_CMDLINE_PADDR + 4], 0
        jne     .Lcmd_printed
        test    esi, esi
        jz      .Lcmd_printed
        xor     edi, edi                        /* strlen */
        PUT_CMDLINE esi, edi, edi, .Lcmd_printed
        mov     eax, dword ptr [ebp + SI_CMDLINE_PADDR]
        mov     edx, dword ptr [ebp + SI_CMDLINE_PADDR + 4]
        mov     ebx, eax
        or      ebx, edx
        xor     ecx, ecx
        test    ebx, ebx
        setnz   cl
        REPORT  pvh_cmdline

        /* pvh_memmap_entries: at least two (low RAM and RAM above 1 MiB). */
        mov     eax, dword ptr [ebp + SI_MEMMAP_ENTRIES]
        xor     ecx, ecx
        cmp     eax, 2
        setae   cl
        xor     edx, edx
        REPORT  pvh_memmap_entries

        /*
         * pvh_memmap_sorted: 1 <= count <= MM_MAX, the table is below 4 GiB,
         * addresses strictly increase and entries do not overlap
         * (addr[i] >= addr[i-1] + size[i-1], no 64-bit wrap). The 64-bit
         * compares use CMP on the low halves then SBB on the high halves:
         * the final CF is the borrow of the whole 64-bit subtraction.
         * Value = count.
         */
        mov     esi, dword ptr [ebp + SI_MEMMAP_PADDR]
        mov     edi, dword ptr [ebp + SI_MEMMAP_ENTRIES]  /* entries left */
        xor     ecx, ecx
        cmp     dword ptr [ebp + SI_MEMMAP_PADDR + 4], 0
        jne     .Lmm_done
        test    edi, edi
        jz      .Lmm_done
        cmp     edi, MM_MAX
        ja      .Lmm_done
        mov     eax, dword ptr [esi + MM_ADDR]
        mov     edx, dword ptr [esi + MM_ADDR + 4]
        mov     dword ptr [mm_prev_addr], eax
        mov     dword ptr [mm_prev_addr + 4], edx
        add     eax, dword ptr [esi + MM_SIZE]
        adc     edx, dword ptr [esi + MM_SIZE + 4]
        jc      .Lmm_done                       /* end wraps past 2^64 */
        mov     dword ptr [mm_prev_end], eax
        mov     dword ptr [mm_prev_end + 4], edx
.Lmm_next:
        dec     edi
        jz      .Lmm_good
        add     esi, MM_ENTRY_SIZE
        /* addr > prev_addr  <=>  prev_addr - addr borrows */
        mov     eax, dword ptr [mm_prev_addr]
        mov     edx, dword ptr [mm_prev_addr + 4]
        cmp     eax, dword ptr [esi + MM_ADDR]
        sbb     edx, dword ptr [esi + MM_ADDR + 4]
        jnc     .Lmm_done                       /* not strictly increasing */
        /* addr >= prev_end  <=>  addr - prev_end does not borrow */
        mov     eax, dword ptr [esi + MM_ADDR]
        mov     edx, dword ptr [esi + MM_ADDR + 4]
        cmp     eax, dword ptr [mm_prev_end]
        mov     ebx, edx
        sbb     ebx, dword ptr [mm_prev_end + 4]
        jc      .Lmm_done                       /* overlaps the previous one */
        mov     dword ptr [mm_prev_addr], eax
        mov     dword ptr [mm_prev_addr + 4], edx
        add     eax, dword ptr [esi + MM_SIZE]
        adc     edx, dword ptr [esi + MM_SIZE + 4]
        jc      .Lmm_done
        mov     dword ptr [mm_prev_end], eax
        mov     dword ptr [mm_prev_end + 4], edx
        jmp     .Lmm_next
.Lmm_good:
        mov     ecx, 1
.Lmm_done:
        mov     eax, dword ptr [ebp + SI_MEMMAP_ENTRIES]
        xor     edx, edx
        REPORT  pvh_memmap_sorted

        /*
         * pvh_memmap_low_ram: the first entry is RAM (type 1) at address 0,
         * the real-mode IVT/BDA area. Value = that entry's size (64 bits).
         */
        xor     eax, eax
        xor     edx, edx
        xor     ecx, ecx
        cmp     dword ptr [ebp + SI_MEMMAP_ENTRIES], 0
        je      1f
        cmp     dword ptr [ebp + SI_MEMMAP_PADDR + 4], 0
        jne     1f
        mov     esi, dword ptr [ebp + SI_MEMMAP_PADDR]
        mov     eax, dword ptr [esi + MM_SIZE]
        mov     edx, dword ptr [esi + MM_SIZE + 4]
        mov     ebx, dword ptr [esi + MM_ADDR]
        or      ebx, dword ptr [esi + MM_ADDR + 4]
        jnz     1f
        cmp     dword ptr [esi + MM_TYPE], MM_TYPE_RAM
        sete    cl
1:      REPORT  pvh_memmap_low_ram

        /*
         * pvh_modules: nr_modules, informational (always ok): vmm-arch passes
         * the initrd as module 0 when it is given one. Then, if there is a
         * module and the list is reachable (modlist_paddr nonzero, below
         * 4 GiB), "MODULE0 <paddr> <size>" from hvm_modlist_entry[0].
         */
        mov     eax, dword ptr [ebp + SI_NR_MODULES]
        xor     edx, edx
        mov     ecx, 1
        REPORT  pvh_modules

        cmp     dword ptr [ebp + SI_NR_MODULES], 0
        je      .Lmod_done
        cmp     dword ptr [ebp + SI_MODLIST_PADDR + 4], 0
        jne     .Lmod_done
        mov     esi, dword ptr [ebp + SI_MODLIST_PADDR]
        test    esi, esi
        jz      .Lmod_done
        PUTS    str_module0
        mov     eax, dword ptr [esi + MOD_PADDR]
        mov     edx, dword ptr [esi + MOD_PADDR + 4]
        call    put_hex64
        mov     eax, ' '
        call    putc
        mov     eax, dword ptr [esi + MOD_SIZE]
        mov     edx, dword ptr [esi + MOD_SIZE + 4]
        call    put_hex64
        mov     eax, 10
        call    putc
.Lmod_done:

        /* ---- summary and exit ---- */
        PUTS    str_done
        mov     eax, dword ptr [n_failed]
        call    put_dec
        mov     eax, 10
        call    putc

        EXIT_CLAMPED "dword ptr [n_failed]"   /* then, if the VMM ignores it, park */

/* ---- output routines (32-bit) ------------------------------------------- */

/*
 * putc: write the byte in AL to COM1. Polls LSR until THRE (bit 5) so we never
 * overrun a real 16550; gives up after PUTC_SPIN polls and sends anyway
 * (serial.inc). Clobbers eax, ecx, edx.
 */
putc:
        push    ebx
        mov     ebx, eax                /* the byte to send */
        SEND_POLLED ebx, PUTC_SPIN
        pop     ebx
        ret

/* puts: write the NUL-terminated string at EAX. */
puts:
        push    esi
        mov     esi, eax
1:      movzx   eax, byte ptr [esi]
        test    eax, eax
        jz      2f
        call    putc
        inc     esi
        jmp     1b
2:      pop     esi
        ret

/* put_hex32: EAX as 8 lowercase hex digits, most significant first. */
put_hex32:
        push    ebx
        push    esi
        mov     ebx, eax
        mov     esi, 8
1:      rol     ebx, 4                  /* next nibble into the low 4 bits */
        mov     eax, ebx
        and     eax, 0xf
        cmp     eax, 10
        jb      2f
        add     eax, 'a' - '0' - 10
2:      add     eax, '0'
        call    putc
        dec     esi
        jnz     1b
        pop     esi
        pop     ebx
        ret

/* put_hex64: EDX:EAX as 16 lowercase hex digits. */
put_hex64:
        push    eax
        mov     eax, edx
        call    put_hex32
        pop     eax
        jmp     put_hex32

/* put_dec: write EAX as an unsigned decimal number. */
put_dec:
        push    ebx
        xor     ebx, ebx                /* digit count */
        mov     ecx, 10
1:      xor     edx, edx
        div     ecx
        add     edx, '0'
        push    edx
        inc     ebx
        test    eax, eax
        jnz     1b
2:      pop     eax
        call    putc
        dec     ebx
        jnz     2b
        pop     ebx
        ret

/*
 * report: print "CHECK <name> <value> ok|FAIL\n".
 * EDX:EAX = value, ECX = 1 ok / 0 FAIL, [esp+4] = name (NUL-terminated).
 * Increments n_failed on FAIL.
 */
report:
        push    ebx
        push    esi
        push    edi
        mov     ebx, eax
        mov     esi, edx
        mov     edi, ecx
        PUTS    str_check
        mov     eax, dword ptr [esp + 16]   /* 3 saved regs + return address */
        call    puts
        mov     eax, ' '
        call    putc
        mov     eax, ebx
        mov     edx, esi
        call    put_hex64
        mov     eax, ' '
        call    putc
        mov     eax, offset str_ok
        test    edi, edi
        jnz     1f
        inc     dword ptr [n_failed]
        mov     eax, offset str_fail
1:      call    puts
        pop     edi
        pop     esi
        pop     ebx
        ret

/* ---- the PVH ELF note --------------------------------------------------- */

/*
 * Elf64_Nhdr {u32 namesz, u32 descsz, u32 type}, then the name and the
 * descriptor, each padded to 4 bytes (ELF gABI "Note Section"). The
 * descriptor is the 32-bit physical entry address; like Linux
 * (arch/x86/platform/pvh/head.S, _ASM_PTR) it is emitted as 8 bytes, and
 * loaders read the low 32 bits. pvhcheck.ld keeps .note.Xen and gives it a
 * PT_NOTE program header.
 */
        .set XEN_ELFNOTE_PHYS32_ENTRY, 18

        .section .note.Xen, "a", @note
        .balign 4
        .long   2f - 1f                 /* namesz = 4, including the NUL */
        .long   4f - 3f                 /* descsz = 8 */
        .long   XEN_ELFNOTE_PHYS32_ENTRY
1:      .asciz  "Xen"
2:      .balign 4
3:      .quad   pvh_start
4:      .balign 4

/* ---- data --------------------------------------------------------------- */

        .section .rodata, "a", @progbits
str_banner:     .asciz "PVHCHECK START\n"
str_check:      .asciz "CHECK "
str_ok:         .asciz "ok\n"
str_fail:       .asciz "FAIL\n"
str_cmdline:    .asciz "CMDLINE "
str_module0:    .asciz "MODULE0 "
str_done:       .asciz "PVHCHECK DONE "

        .data
        .balign 8
entry_ebx:      .long 0                 /* EBX at entry: &hvm_start_info */
entry_eflags:   .long 0                 /* EFLAGS at entry */
n_failed:       .long 0

        .bss
        .balign 8
mm_prev_addr:   .skip 8                 /* memmap scan: previous entry's addr */
mm_prev_end:    .skip 8                 /* ... and addr + size */
dummy_start_info: .skip SI_SIZE         /* all zero: used when the magic is bad */
        .balign 16
stack_bottom:   .skip 16384
stack_top:

        .section .note.GNU-stack, "", @progbits
