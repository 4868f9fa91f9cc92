/*
 * syscallcheck.S - SYSCALL as Intel SDM vol. 2B ("SYSCALL - Fast System Call") defines it.
 *
 * From ring 3 the guest executes SYSCALL three times; the entry at IA32_LSTAR records what the
 * CPU handed it, and exceptions go through the IDT to a handler that records them:
 *
 *   1. IA32_EFER.SCE set, 64-bit mode: RCX = the next RIP, R11 = RFLAGS with RF cleared (the
 *      user RFLAGS here has RF set: IRETQ loaded it, and SYSCALL is the first instruction),
 *      RFLAGS = RFLAGS AND NOT IA32_FMASK (AC, DF, IF here), CS = IA32_STAR[47:32] with RPL 0
 *      (so CPL 0), SS = IA32_STAR[47:32] + 8, RSP unchanged (no stack switch);
 *   2. SCE clear: #UD, a fault (RIP of the SYSCALL, CS of ring 3), and the entry does not run;
 *   3. SCE set but in compatibility mode (a 32-bit user code segment): #UD as well ("not
 *      recognized in compatibility mode").
 *
 * The unicorn wheel has no SYSCALL of its own: the backend's Python hook does 1 right, but it
 * jumps to LSTAR whatever SCE says (2) and leaves SYSCALL a no-op outside 64-bit mode (3), so
 * those checks FAIL there. The engine (patch 0005) follows the SDM.
 *
 * One line per fact on COM1 ("CHECK <name> <16 hex digits> <ok|FAIL>"), "SYSCALLCHECK DONE",
 * and the number of failed lines to the exit port 0xf4.
 *
 * GDT as in usersyscall.S (Linux's order): 0x08 kernel code64, 0x10 kernel data, 0x18 user
 * code32, 0x20 user data, 0x28 user code64, 0x30 a 64-bit TSS (RSP0 for exceptions from ring 3).
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "gdt64.inc"
        .include "paging64.inc"

        GDT_RING3                           /* KERNEL_CS .. TSS_SEL; gdt, gdtr in .data */

        .set FMASK, RFLAGS_AC | RFLAGS_DF | RFLAGS_IF
        .set USER_RFLAGS, RFLAGS_RF | RFLAGS_AC | RFLAGS_DF | RFLAGS_IF | RFLAGS_CF | RFLAGS_1

        .include "ring3.inc"
        .include "idt64.inc"  /* after KERNEL_CS: it stores the selector */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        cli
        lea     rsp, [rip + kstack_top]
        /* Ring 3 needs the U bit at every level for the 2 MiB page holding this guest (the
         * VMM's identity map leaves it clear): PML4[0], PDPT[0], PD[8] (SDM vol. 3A 4.6). */
        USER_PAGE
        /* The TSS descriptor's base, and RSP0 for exceptions from ring 3 (SDM 7.7). */
        TSS_BASE
        TSS_STACK TSS_RSP0, kstack_top
        LOAD_GDT
        /* #UD, #GP and #PF go to the recording handler (#GP/#PF only if something is wrong). */
        SET_GATE VECTOR_UD, stub_6
        SET_GATE VECTOR_GP, stub_d
        SET_GATE VECTOR_PF, stub_e
        lidt    [rip + idtr]
        lea     rsi, [rip + msg_start]
        call    puts

        /* STAR[47:32] = 0x08: SYSCALL's CS 0x08 and SS 0x10; STAR[63:48] = 0x18: SYSRET's CS
         * 0x2b and SS 0x23 (unused here). LSTAR = the entry; FMASK = AC, DF, IF. */
        mov     ecx, MSR_STAR
        xor     eax, eax
        mov     edx, STAR_SELECTORS
        wrmsr
        mov     ecx, MSR_LSTAR
        lea     rax, [rip + syscall_entry]
        mov     rdx, rax
        shr     rdx, 32
        wrmsr
        mov     ecx, MSR_FMASK
        mov     eax, FMASK
        xor     edx, edx
        wrmsr

/* --- 1: SYSCALL with SCE set, from 64-bit ring 3 ----------------------------------------- */

        call    sce_on
        ARM     2f
        TO_USER USER_CS, user_syscall, USER_RFLAGS
2:      EXPECT  "syscall_entered", "qword ptr [rip + entries]", 1
        EXPECT  "syscall_rcx", "qword ptr [rip + entry_rcx]", user_syscall_next
        EXPECT  "syscall_r11", "qword ptr [rip + entry_r11]", USER_RFLAGS & ~RFLAGS_RF
        EXPECT  "syscall_rflags", "qword ptr [rip + entry_rflags]", USER_RFLAGS & ~(FMASK | RFLAGS_RF)
        EXPECT  "syscall_cs", "qword ptr [rip + entry_cs]", KERNEL_CS
        EXPECT  "syscall_ss", "qword ptr [rip + entry_ss]", KERNEL_DS
        EXPECT  "syscall_rsp", "qword ptr [rip + entry_rsp]", ustack_top

/* --- 2: SCE clear: #UD ------------------------------------------------------------------- */

        call    sce_off
        mov     qword ptr [rip + entries], 0
        mov     qword ptr [rip + seen_vector], -1
        ARM     2f
        TO_USER USER_CS, user_nosce, RFLAGS_1
2:      EXPECT  "nosce_vector", "qword ptr [rip + seen_vector]", VECTOR_UD
        EXPECT  "nosce_rip", "qword ptr [rip + seen_rip]", user_nosce
        EXPECT  "nosce_cs", "qword ptr [rip + seen_cs]", USER_CS
        EXPECT  "nosce_entry_runs", "qword ptr [rip + entries]", 0

/* --- 3: SCE set, compatibility mode: #UD ------------------------------------------------- */

        call    sce_on
        mov     qword ptr [rip + entries], 0
        mov     qword ptr [rip + seen_vector], -1
        ARM     2f
        TO_USER USER_CS32, user_compat, RFLAGS_1
2:      EXPECT  "compat_vector", "qword ptr [rip + seen_vector]", VECTOR_UD
        EXPECT  "compat_rip", "qword ptr [rip + seen_rip]", user_compat
        EXPECT  "compat_cs", "qword ptr [rip + seen_cs]", USER_CS32
        EXPECT  "compat_entry_runs", "qword ptr [rip + entries]", 0

        DONE    msg_done

sce_on: mov     ecx, MSR_EFER
        rdmsr
        or      eax, EFER_SCE
        wrmsr
        ret

sce_off:
        mov     ecx, MSR_EFER
        rdmsr
        and     eax, ~EFER_SCE
        wrmsr
        ret

/* Ring 3 code. */
user_syscall:
        syscall                             /* first instruction after IRETQ: RF still set */
user_syscall_next:
        jmp     .
user_nosce:
        syscall
        jmp     .
        .code32
user_compat:
        syscall
        /* Only if SYSCALL did nothing: back to 64-bit user code, where ud2 reaches the
         * handler in a mode every backend delivers in, with a RIP that is not user_compat. */
        push    USER_CS
        push    offset user_compat_fell_through
        retf
        .code64
user_compat_fell_through:
        ud2
        jmp     .

/* The entry: ring 0 (if SYSCALL did its job) on the user's stack. Record, then resume on the
 * kernel stack at the continuation. */
syscall_entry:
        mov     [rip + entry_rcx], rcx
        mov     [rip + entry_r11], r11
        mov     [rip + entry_rsp], rsp
        pushfq
        pop     qword ptr [rip + entry_rflags]
        mov     ax, cs
        movzx   eax, ax
        mov     [rip + entry_cs], rax
        mov     ax, ss
        movzx   eax, ax
        mov     [rip + entry_ss], rax
        inc     qword ptr [rip + entries]
        cld
        mov     rsp, [rip + resume_rsp]
        jmp     qword ptr [rip + resume_rip]

/* Handler stubs (idt64.inc): the vector and an error code slot, then `common`. */
        STUB    6, 0
        STUB    d, 1
        STUB    e, 1

/* Stack: vector, error, RIP, CS, RFLAGS, RSP, SS. Record vector, RIP and CS, then return to
 * the armed continuation in ring 0 on the kernel stack it was armed with. */
common:
        push    rax
        mov     rax, [rsp + 8]
        mov     [rip + seen_vector], rax
        mov     rax, [rsp + 24]
        mov     [rip + seen_rip], rax
        mov     rax, [rsp + 32]
        mov     [rip + seen_cs], rax
        RESUME_ARMED

        .section .rodata
msg_start: .asciz "SYSCALLCHECK START\n"
msg_done:  .asciz "SYSCALLCHECK DONE\n"

        .section .data                      /* on from GDT_RING3's gdtr */
idtr:   .word IDT64_SIZE - 1
        .quad idt
resume_rip:   .quad 0
resume_rsp:   .quad 0
entries:      .quad 0
entry_rcx:    .quad 0
entry_r11:    .quad 0
entry_rflags: .quad 0
entry_cs:     .quad 0
entry_ss:     .quad 0
entry_rsp:    .quad 0
seen_vector:  .quad -1
seen_rip:     .quad 0
seen_cs:      .quad 0
        .p2align 4
tss:    .fill TSS64_SIZE, 1, 0

        .section .bss
        .p2align 12
idt:    .fill IDT64_SIZE, 1, 0
        .fill 4096, 1, 0
kstack_top:
        .fill 4096, 1, 0
ustack_top:
