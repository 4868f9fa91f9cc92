/*
 * idtcheck.S - exception and interrupt delivery through the guest's IDT, as the CPU does it.
 *
 * Each check makes one event happen (a fault, a trap, a software interrupt; at CPL 0 or from
 * ring 3) and lets a common handler record what the CPU handed it: the vector, the error code,
 * the frame (RIP, CS, RFLAGS, RSP, SS), the stack the handler ran on, RFLAGS inside the handler
 * and CR2. The handler then rewrites the frame to resume at the check's continuation (in ring 0)
 * and returns with iretq. One line per fact on COM1:
 *
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * then "IDTCHECK DONE", and the number of failed lines goes to the exit port 0xf4.
 *
 * What is expected (Intel SDM vol. 3A chapter 6):
 *   6.12.1  a fault pushes the RIP of the faulting instruction, a trap/INT n the next one;
 *   6.12.1.3 an interrupt gate clears IF, a trap gate leaves it;
 *   6.13    #GP, #PF (and #DF, #TS, #NP, #SS, #AC) push an error code: for a selector fault the
 *           selector (6.13: index, TI, EXT); for #PF the P/W/U bits (4.7, figure 4-12);
 *   6.12.1.1 INT n from CPL 3 through a gate with DPL < 3 is #GP with error code
 *           vector * 8 + 2 (IDT bit);
 *   6.14.2  64-bit mode pushes SS:RSP always; on a privilege change the CPU loads RSP from
 *           TSS.RSP0, and a gate with IST != 0 switches to TSS.IST[n] whatever the CPL;
 *   4.7     #PF loads CR2 with the faulting linear address.
 *
 * GDT as in usersyscall.S: 0x08 kernel code64, 0x10 kernel data, 0x23 user data, 0x2b user
 * code64, 0x30 TSS.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "gdt64.inc"
        .include "paging64.inc"

        GDT_RING3                           /* KERNEL_CS .. TSS_SEL; gdt, gdtr in .data */

        /* A linear address outside the VMM's 4 GiB identity map: not present at the PDPT. */
        .set UNMAPPED, 0x140000000
        /* The second 2 MiB page: present, but without the U bit (a supervisor page). */
        .set SUPERVISOR_PAGE, PAGE_2M

        .set USER_RFLAGS, RFLAGS_IF | RFLAGS_1  /* ring 3 runs with interrupts on */

        .include "ring3.inc"
        .include "idt64.inc"  /* after KERNEL_CS: it stores the selector */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        cli
        lea     rsp, [rip + kstack_top]
        /* U bit for the 2 MiB page holding this guest: PML4[0], PDPT[0], PD[8] (SDM 4.6). */
        USER_PAGE
        /* TSS descriptor base, RSP0 and IST1 (SDM 7.7, figure 7-11). */
        TSS_BASE
        TSS_STACK TSS_RSP0, rsp0_top
        TSS_STACK TSS_IST1, ist1_top
        LOAD_GDT

        SET_GATE VECTOR_DE, stub_0
        SET_GATE VECTOR_BP, stub_3
        SET_GATE VECTOR_UD, stub_6, TRAP_GATE
        SET_GATE VECTOR_GP, stub_13
        SET_GATE VECTOR_PF, stub_14
        SET_GATE 0x41, stub_41
        SET_GATE 0x42, stub_42, "INTR_GATE | IST1"
        SET_GATE 0x80, stub_80, USER_INTR_GATE
        lidt    [rip + idtr]
        lea     rsi, [rip + msg_start]
        call    puts

/* --- CPL 0 ------------------------------------------------------------------------------ */

        /* #DE through an interrupt gate: a fault (RIP of the DIV), IF cleared in the handler. */
        ARM     2f
        xor     ecx, ecx
        mov     eax, 1
        sti
fault_de:
        div     ecx
2:      cli
        EXPECT  "de_vector", "qword ptr [rip + seen_vector]", VECTOR_DE
        EXPECT  "de_rip", "qword ptr [rip + seen_rip]", fault_de
        EXPECT  "de_cs", "qword ptr [rip + seen_cs]", KERNEL_CS
        EXPECT  "de_ss", "qword ptr [rip + seen_ss]", KERNEL_DS
        EXPECT  "de_frame_if", "qword ptr [rip + seen_frame_if]", RFLAGS_IF
        EXPECT  "de_handler_if", "qword ptr [rip + seen_handler_if]", 0
        EXPECT  "de_same_stack", "qword ptr [rip + seen_stack]", 0

        /* #UD through a trap gate: IF stays set in the handler. */
        ARM     2f
        sti
fault_ud:
        ud2
2:      cli
        EXPECT  "ud_vector", "qword ptr [rip + seen_vector]", VECTOR_UD
        EXPECT  "ud_rip", "qword ptr [rip + seen_rip]", fault_ud
        EXPECT  "ud_handler_if", "qword ptr [rip + seen_handler_if]", RFLAGS_IF

        /* #GP with a selector error code: a selector past the GDT limit (SDM 6.13). */
        ARM     2f
        mov     ax, 0x1238
fault_gp:
        mov     fs, ax
2:      EXPECT  "gp_vector", "qword ptr [rip + seen_vector]", VECTOR_GP
        EXPECT  "gp_error", "qword ptr [rip + seen_error]", 0x1238
        EXPECT  "gp_rip", "qword ptr [rip + seen_rip]", fault_gp

        /* #PF, write to a linear address that is not mapped: error P=0 W=1 U=0, CR2. */
        ARM     2f
        mov     rbx, UNMAPPED
fault_pf_write:
        mov     qword ptr [rbx], 1
2:      EXPECT  "pf_write_vector", "qword ptr [rip + seen_vector]", VECTOR_PF
        EXPECT  "pf_write_error", "qword ptr [rip + seen_error]", 2
        EXPECT  "pf_write_cr2", "qword ptr [rip + seen_cr2]", UNMAPPED
        EXPECT  "pf_write_rip", "qword ptr [rip + seen_rip]", fault_pf_write

        /* #PF on a read: error 0. */
        ARM     2f
        mov     rbx, UNMAPPED + 0x1234
fault_pf_read:
        mov     rax, qword ptr [rbx]
2:      EXPECT  "pf_read_error", "qword ptr [rip + seen_error]", 0
        EXPECT  "pf_read_cr2", "qword ptr [rip + seen_cr2]", UNMAPPED+0x1234

        /* INT3: a trap, RIP after the one-byte instruction. */
        ARM     2f
trap_bp:
        int3
2:      EXPECT  "bp_vector", "qword ptr [rip + seen_vector]", VECTOR_BP
        EXPECT  "bp_rip", "qword ptr [rip + seen_rip]", trap_bp+1

        /* INT n at CPL 0 through a DPL 0 gate: RIP after the two-byte instruction. */
        ARM     2f
trap_int41:
        int     0x41
2:      EXPECT  "int41_vector", "qword ptr [rip + seen_vector]", 0x41
        EXPECT  "int41_rip", "qword ptr [rip + seen_rip]", trap_int41+2

        /* A gate with IST 1: the handler runs on TSS.IST1 even without a privilege change. */
        ARM     2f
        int     0x42
2:      EXPECT  "ist_vector", "qword ptr [rip + seen_vector]", 0x42
        EXPECT  "ist_stack", "qword ptr [rip + seen_stack]", 2

/* --- from CPL 3 --------------------------------------------------------------------------- */

        /* INT 0x80 through a DPL 3 gate: the CPU switches to TSS.RSP0 and pushes the user SS:RSP. */
        ARM     2f
        TO_USER USER_CS, user_int80, USER_RFLAGS
2:      EXPECT  "user_int80_vector", "qword ptr [rip + seen_vector]", 0x80
        EXPECT  "user_int80_cs", "qword ptr [rip + seen_cs]", USER_CS
        EXPECT  "user_int80_ss", "qword ptr [rip + seen_ss]", USER_DS
        EXPECT  "user_int80_rsp", "qword ptr [rip + seen_rsp]", ustack_top-8
        EXPECT  "user_int80_stack", "qword ptr [rip + seen_stack]", 1

        /* INT 0x41 from CPL 3 through a DPL 0 gate: #GP(0x41 * 8 + 2). */
        ARM     2f
        TO_USER USER_CS, user_int41, USER_RFLAGS
2:      EXPECT  "user_int41_vector", "qword ptr [rip + seen_vector]", VECTOR_GP
        EXPECT  "user_int41_error", "qword ptr [rip + seen_error]", 0x41*8+2
        EXPECT  "user_int41_rip", "qword ptr [rip + seen_rip]", user_int41

        /* HLT at CPL 3: #GP(0). */
        ARM     2f
        TO_USER USER_CS, user_hlt, USER_RFLAGS
2:      EXPECT  "user_hlt_vector", "qword ptr [rip + seen_vector]", VECTOR_GP
        EXPECT  "user_hlt_error", "qword ptr [rip + seen_error]", 0
        EXPECT  "user_hlt_rip", "qword ptr [rip + seen_rip]", user_hlt

        /* A read of a supervisor page from CPL 3: #PF with P=1 W=0 U=1. */
        ARM     2f
        TO_USER USER_CS, user_pf, USER_RFLAGS
2:      EXPECT  "user_pf_vector", "qword ptr [rip + seen_vector]", VECTOR_PF
        EXPECT  "user_pf_error", "qword ptr [rip + seen_error]", 5
        EXPECT  "user_pf_cr2", "qword ptr [rip + seen_cr2]", SUPERVISOR_PAGE
        EXPECT  "user_pf_cs", "qword ptr [rip + seen_cs]", USER_CS
        EXPECT  "user_pf_stack", "qword ptr [rip + seen_stack]", 1

        DONE    msg_done

user_int80:
        push    0x1234                       /* user RSP = ustack_top - 8 at the INT */
        int     0x80
        jmp     .
user_int41:
        int     0x41
        jmp     .
user_hlt:
        hlt
        jmp     .
user_pf:
        mov     rax, qword ptr [SUPERVISOR_PAGE]
        jmp     .

/* Handler stubs (idt64.inc): the vector and an error code slot, then `common`. */
        STUB    0, 0
        STUB    3, 0
        STUB    6, 0
        STUB    d, 1
        STUB    e, 1
        STUB    41, 0
        STUB    42, 0
        STUB    80, 0
        .set stub_13, stub_d
        .set stub_14, stub_e

/* Stack: vector, error, RIP, CS, RFLAGS, RSP, SS. Record them, then return to the armed
 * continuation in ring 0 on the kernel stack it was armed with. */
common:
        push    rax
        mov     rax, [rsp + 8]
        mov     [rip + seen_vector], rax
        mov     rax, [rsp + 16]
        mov     [rip + seen_error], rax
        mov     rax, [rsp + 24]
        mov     [rip + seen_rip], rax
        mov     rax, [rsp + 32]
        mov     [rip + seen_cs], rax
        mov     rax, [rsp + 40]
        and     rax, RFLAGS_IF
        mov     [rip + seen_frame_if], rax
        mov     rax, [rsp + 48]
        mov     [rip + seen_rsp], rax
        mov     rax, [rsp + 56]
        mov     [rip + seen_ss], rax
        pushfq
        pop     rax
        and     rax, RFLAGS_IF
        mov     [rip + seen_handler_if], rax
        mov     rax, cr2
        mov     [rip + seen_cr2], rax
        /* Which stack: 0 the interrupted one (kernel stack), 1 TSS.RSP0, 2 TSS.IST1. */
        xor     eax, eax
        lea     rdx, [rip + rsp0_top]
        cmp     rsp, rdx
        ja      4f
        lea     rdx, [rip + rsp0_top - 4096]
        cmp     rsp, rdx
        jb      4f
        mov     eax, 1
4:      lea     rdx, [rip + ist1_top]
        cmp     rsp, rdx
        ja      5f
        lea     rdx, [rip + ist1_top - 4096]
        cmp     rsp, rdx
        jb      5f
        mov     eax, 2
5:      mov     [rip + seen_stack], rax
        RESUME_ARMED                        /* ring 0 at the continuation, armed stack */

        .section .rodata
msg_start: .asciz "IDTCHECK START\n"
msg_done:  .asciz "IDTCHECK DONE\n"

        .section .data                      /* on from GDT_RING3's gdtr */
idtr:   .word IDT64_SIZE - 1
        .quad idt
resume_rip:       .quad 0
resume_rsp:       .quad 0
seen_vector:      .quad 0
seen_error:       .quad 0
seen_rip:         .quad 0
seen_cs:          .quad 0
seen_frame_if:    .quad 0
seen_rsp:         .quad 0
seen_ss:          .quad 0
seen_handler_if:  .quad 0
seen_cr2:         .quad 0
seen_stack:       .quad 0
        .p2align 4
tss:    .fill TSS64_SIZE, 1, 0

        .section .bss
        .p2align 12
idt:    .fill IDT64_SIZE, 1, 0
        .fill 4096, 1, 0
kstack_top:
        .fill 4096, 1, 0
rsp0_top:
        .fill 4096, 1, 0
ist1_top:
        .fill 4096, 1, 0
ustack_top:
