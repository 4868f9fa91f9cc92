/*
 * faultnest.S - exceptions the CPU delivers on its own: a fault while delivering one, and
 * exceptions in 32-bit protected mode.
 *
 * What is expected (Intel SDM vol. 3A chapter 6):
 *   6.15 (interrupt 8, table 6-5) a page fault while the CPU delivers a page fault is a double
 *        fault: #DF with error code 0; its gate has IST 1, so it runs on TSS.IST1 (6.14.5)
 *        even though the faulting stack was the handler's own (CPL 0, no stack switch);
 *   6.13 a fault on the IDT entry of an exception sets EXT in the error code: #UD through a
 *        64-bit gate whose P bit is clear is #NP(6 * 8 + IDT (2) + EXT (1)); through an entry
 *        of type 0, #GP with the same error code (the type is checked before P: SDM vol. 2A,
 *        INT n, operation "IA-32e-MODE"); #UD is benign, so neither becomes #DF (table 6-5);
 *   6.10-6.12 in 32-bit protected mode (after leaving long mode, 9.8.5.4) exceptions and INT n go
 *        through a 32-bit IDT of 8-byte gates, pushing EFLAGS, CS, EIP (and an error code).
 *
 * The unicorn wheel's backend delivers from Python and refuses a delivery that would fault,
 * so it stops at the nested #PF ("delivering #PF would fault": status 70), and it delivers in
 * 64-bit mode only (it also checks P before the type, so zero_gate_vector FAILs there first).
 * The engine (patch 0004) delivers through the IDT in its CPU loop, as QEMU does.
 *
 * With `faultnest.triple` on the command line the guest then also makes #DF's IST stack
 * unmapped and faults the same way again: #PF, #DF, and a fault delivering #DF is a triple
 * fault (6.15, interrupt 8: "shutdown"), which the VMM reports as a guest fault (status 70).
 *
 * One line per fact on COM1 ("CHECK <name> <16 hex digits> <ok|FAIL>"), "FAULTNEST DONE", and
 * the number of failed lines to the exit port 0xf4.
 *
 * GDT: 0x08 kernel code64, 0x10 flat data, 0x18 code32 (L=0, D=1), 0x20 a 64-bit TSS.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "report32.inc"
        .include "gdt64.inc"
        .include "leave64.inc"

        GDT_CODE32 tss=1                    /* KERNEL_CS, KERNEL_DS, CODE32, TSS_SEL; gdt */
        .include "idt32.inc"  /* after CODE32: it stores the selector */

        .set ERROR_EXT, 1                       /* SDM 6.13, figure 6-6 */
        .set ERROR_IDT, 2
        /* Linear addresses outside the VMM's identity map of the low 4 GiB (not present at the
         * PDPT, SDM 4.5): a stack, #DF's stack for the triple fault, and a data address. */
        .set BAD_STACK, 0x140000800
        .set BAD_IST, 0x150000800
        .set UNMAPPED, 0x180000000
        /* boot_params (Linux boot protocol, RSI at the 64-bit entry): cmd_line_ptr */
        .set BP_CMD_LINE_PTR, 0x228

        .include "ring3.inc"
        .include "idt64.inc"  /* after KERNEL_CS: it stores the selector */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        cli
        lea     rsp, [rip + kstack_top]
        mov     ebx, dword ptr [rsi + BP_CMD_LINE_PTR]
        lea     rsi, [rip + msg_start]
        call    puts
        mov     rsi, rbx
        call    wants_triple
        mov     [rip + triple], rax

        /* TSS descriptor base and IST1 (SDM 7.7, figure 7-11), GDT, segments, TR. */
        TSS_BASE
        TSS_STACK TSS_IST1, ist1_top
        LOAD_GDT

        /* Gates: #NP, #GP, #PF interrupt gates; #DF on IST 1. #UD's is set per check. */
        SET_GATE VECTOR_NP, stub_b
        SET_GATE VECTOR_GP, stub_d
        SET_GATE VECTOR_PF, stub_e
        SET_GATE VECTOR_DF, stub_8, "INTR_GATE | IST1"
        lidt    [rip + idtr]

/* --- 64-bit mode ------------------------------------------------------------------------- */

        /* #UD through a 64-bit interrupt gate with P clear: #NP(6 * 8 + IDT + EXT), RIP of the
         * ud2 (a fault). #UD is benign, so #NP is delivered, not #DF (table 6-5). */
        SET_GATE VECTOR_UD, stub_b, "INTR_GATE & ~GATE_P"
        ARM     2f
fault_ud_np:
        ud2
2:      EXPECT  "np_vector", "qword ptr [rip + seen_vector]", VECTOR_NP
        EXPECT  "np_error", "qword ptr [rip + seen_error]", VECTOR_UD*8+ERROR_IDT+ERROR_EXT
        EXPECT  "np_rip", "qword ptr [rip + seen_rip]", fault_ud_np

        /* #UD through an entry of type 0 (not a gate): the type is checked before P (SDM vol.
         * 2A, INT n, "IA-32e-MODE"), so #GP(6 * 8 + IDT + EXT). */
        SET_GATE VECTOR_UD, stub_b, 0
        ARM     2f
fault_ud_gp:
        ud2
2:      EXPECT  "zero_gate_vector", "qword ptr [rip + seen_vector]", VECTOR_GP
        EXPECT  "zero_gate_error", "qword ptr [rip + seen_error]", VECTOR_UD*8+ERROR_IDT+ERROR_EXT
        EXPECT  "zero_gate_rip", "qword ptr [rip + seen_rip]", fault_ud_gp

        /* A #PF at CPL 0 on an unmapped stack: pushing its frame faults, so #DF on IST1. */
        mov     qword ptr [rip + counts + VECTOR_PF * 8], 0
        mov     qword ptr [rip + counts + VECTOR_DF * 8], 0
        ARM     2f
        mov     rbx, UNMAPPED
        mov     rsp, BAD_STACK
        mov     rax, qword ptr [rbx]
2:      EXPECT  "nested_pf_handled", "qword ptr [rip + counts + VECTOR_PF * 8]", 0
        EXPECT  "df_count", "qword ptr [rip + counts + VECTOR_DF * 8]", 1
        EXPECT  "df_vector", "qword ptr [rip + seen_vector]", VECTOR_DF
        EXPECT  "df_error", "qword ptr [rip + seen_error]", 0
        EXPECT  "df_on_ist1", "qword ptr [rip + seen_frame]", ist1_top-6*8
        mov     rax, [rip + seen_cr2]               /* the push that faulted: BAD_STACK's page */
        shr     rax, 12
        EXPECT  "df_cr2_page", rax, BAD_STACK>>12

        cmp     qword ptr [rip + triple], 0
        je      3f
        /* The same with #DF's own stack unmapped: a triple fault; nothing after this runs. */
        lea     rsi, [rip + msg_triple]
        call    puts
        mov     rax, BAD_IST
        mov     [rip + tss + TSS_IST1], rax
        mov     rbx, UNMAPPED
        mov     rsp, BAD_STACK
        mov     rax, qword ptr [rbx]
        jmp     .

/* --- 32-bit protected mode --------------------------------------------------------------- */

3:      LEAVE_LONG_MODE CODE32, KERNEL_DS
        mov     edi, VECTOR_DE
        mov     esi, offset stub32_0
        call    set_gate32
        mov     edi, VECTOR_GP
        mov     esi, offset stub32_d
        call    set_gate32
        mov     edi, 0x41
        mov     esi, offset stub32_41
        call    set_gate32
        lidt    [idtr32]

        /* #DE: a fault (EIP of the div), through a 32-bit interrupt gate. */
        xor     ecx, ecx
        mov     eax, 1
        mov     dword ptr [resume32], offset 4f
pm_fault_de:
        div     ecx
4:      EXPECT32 "pm_de_vector", "dword ptr [seen32_vector]", VECTOR_DE
        EXPECT32 "pm_de_eip", "dword ptr [seen32_eip]", pm_fault_de
        EXPECT32 "pm_de_cs", "dword ptr [seen32_cs]", CODE32

        /* #GP with a selector error code: a selector beyond the GDT limit (SDM 6.13). */
        mov     dword ptr [resume32], offset 4f
        mov     ax, 0x1238
pm_fault_gp:
        mov     fs, ax
4:      EXPECT32 "pm_gp_vector", "dword ptr [seen32_vector]", VECTOR_GP
        EXPECT32 "pm_gp_error", "dword ptr [seen32_error]", 0x1238
        EXPECT32 "pm_gp_eip", "dword ptr [seen32_eip]", pm_fault_gp

        /* INT n: a trap, EIP after the two-byte instruction; the gate clears IF. */
        mov     dword ptr [resume32], offset 4f
        sti
pm_int41:
        int     0x41
4:      cli
        EXPECT32 "pm_int41_vector", "dword ptr [seen32_vector]", 0x41
        EXPECT32 "pm_int41_eip", "dword ptr [seen32_eip]", pm_int41+2
        EXPECT32 "pm_int41_frame_if", "dword ptr [seen32_eflags]", RFLAGS_IF
        EXPECT32 "pm_int41_handler_if", "dword ptr [seen32_handler_if]", 0

        DONE32  msg_done

/* 32-bit stubs: vector, then an error-code slot (0 where the CPU pushes none). */
        .macro STUB32 vector, pushes_error
stub32_\vector:
        .if \pushes_error == 0
        push    0
        .endif
        push    0x\vector
        jmp     common32
        .endm
        STUB32  0, 0
        STUB32  d, 1
        STUB32  41, 0

/* Stack: vector, error, EIP, CS, EFLAGS (no privilege change: no SS:ESP, SDM 6.12.1). Record,
 * then return to `resume32` on the same stack. */
common32:
        push    eax
        mov     eax, [esp + 4]
        mov     [seen32_vector], eax
        mov     eax, [esp + 8]
        mov     [seen32_error], eax
        mov     eax, [esp + 12]
        mov     [seen32_eip], eax
        mov     eax, [esp + 16]
        mov     [seen32_cs], eax
        mov     eax, [esp + 20]
        and     eax, RFLAGS_IF
        mov     [seen32_eflags], eax
        pushfd
        pop     eax
        and     eax, RFLAGS_IF
        mov     [seen32_handler_if], eax
        mov     eax, [resume32]
        mov     [esp + 12], eax
        and     dword ptr [esp + 20], ~RFLAGS_IF
        pop     eax
        add     esp, 8
        iretd

        .code64

/* 1 in RAX when the NUL-terminated string at RSI holds "faultnest.triple", else 0. */
wants_triple:
        xor     eax, eax
        test    rsi, rsi
        jz      8f
6:      cmp     byte ptr [rsi], 0
        je      8f
        lea     rdi, [rip + word_triple]
        mov     rdx, rsi
7:      mov     cl, byte ptr [rdi]
        test    cl, cl
        jz      9f                              /* the whole word matched */
        cmp     cl, byte ptr [rdx]
        jne     10f
        inc     rdi
        inc     rdx
        jmp     7b
10:     inc     rsi
        jmp     6b
9:      mov     eax, 1
8:      ret

/* 64-bit stubs (idt64.inc): the vector and an error-code slot, then `common`. */
        STUB    8, 1
        STUB    b, 1
        STUB    d, 1
        STUB    e, 1

/* Stack: vector, error, RIP, CS, RFLAGS, RSP, SS. Count the vector; record the error code,
 * RIP, where the CPU's frame starts (its error code) and CR2; return to the armed continuation
 * in ring 0 on the kernel stack it was armed with. */
common:
        push    rax
        push    rbx
        mov     rax, [rsp + 16]
        mov     [rip + seen_vector], rax
        lea     rbx, [rip + counts]
        and     eax, 31
        inc     qword ptr [rbx + rax * 8]
        mov     rax, [rsp + 24]
        mov     [rip + seen_error], rax
        mov     rax, [rsp + 32]
        mov     [rip + seen_rip], rax
        lea     rax, [rsp + 24]
        mov     [rip + seen_frame], rax
        mov     rax, cr2
        mov     [rip + seen_cr2], rax
        mov     rax, [rip + resume_rip]
        mov     [rsp + 32], rax
        mov     qword ptr [rsp + 40], KERNEL_CS
        mov     rax, [rip + resume_rsp]
        mov     [rsp + 56], rax
        mov     qword ptr [rsp + 64], KERNEL_DS
        pop     rbx
        pop     rax
        add     rsp, 16
        iretq

        .section .rodata
msg_start:   .asciz "FAULTNEST START\n"
msg_triple:  .asciz "FAULTNEST TRIPLE\n"
msg_done:    .asciz "FAULTNEST DONE\n"
word_triple: .asciz "faultnest.triple"

        .section .data                      /* on from GDT_CODE32's gdtr */
idtr:   .word IDT64_SIZE - 1
        .quad idt
idtr32: .word IDT32_SIZE - 1
        .long idt32
triple:      .quad 0
resume_rip:  .quad 0
resume_rsp:  .quad 0
seen_vector: .quad -1
seen_error:  .quad -1
seen_rip:    .quad 0
seen_frame:  .quad 0
seen_cr2:    .quad 0
counts:      .fill 32, 8, 0                  /* deliveries by vector, 0-31 */
resume32:          .long 0
seen32_vector:     .long -1
seen32_error:      .long -1
seen32_eip:        .long 0
seen32_cs:         .long 0
seen32_eflags:     .long 0
seen32_handler_if: .long 0
        .p2align 4
tss:    .fill TSS64_SIZE, 1, 0

        .section .bss
        .p2align 12
idt:    .fill IDT64_SIZE, 1, 0
idt32:  .fill IDT32_SIZE, 1, 0
        .p2align 12
        .fill 4096, 1, 0
kstack_top:
        .fill 4096, 1, 0
ist1_top:
