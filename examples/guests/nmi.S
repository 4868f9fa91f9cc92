/*
 * nmi.S - a non-maskable interrupt through the local APIC, as Linux sends one to a stuck CPU.
 *
 * Linux asks every other CPU for its backtrace with an NMI IPI when RCU or a watchdog finds one
 * stuck (nmi_cpu_backtrace), and stops the others with one when a panic's ordinary IPI goes
 * unanswered. An NMI is taken whatever RFLAGS.IF says, through IDT vector 2 (SDM vol. 3A 6.7),
 * and while its handler runs the CPU holds any further NMI until the next IRET (6.7.1).
 *
 * The guest software-enables its xAPIC (SVR, SDM 10.4.7.1) and, with interrupts off, sends
 * itself an NMI through the ICR: delivery mode 100b, shorthand "self" (10.6.1, figure 10-12; the
 * vector field is ignored for an NMI). The handler counts; the first time, it sends itself a
 * second NMI and waits a while, which must not interrupt it; after its IRET the second one is
 * taken. One line per fact on COM1:
 *
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * and the number of failed lines to the exit port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "gdt64.inc"
        .include "apic.inc"

        .set WAIT_LOOPS, 200000             /* PAUSEs to wait for an NMI to arrive */
        .set KERNEL_CS, BOOT_CS             /* the VMM's boot GDT */

        .include "idt64.inc"  /* after KERNEL_CS: it stores the selector */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start
        SET_GATE VECTOR_NMI, nmi_handler
        lidt    [rip + idtr]
        mov     rbx, APIC
        mov     dword ptr [rbx + APIC_SVR], SVR_ENABLE | SPURIOUS_VECTOR

        /* Interrupts stay off (BEGIN): only a non-maskable interrupt can arrive. */
        mov     dword ptr [rbx + APIC_ICR_LOW], ICR_SELF | ICR_NMI
        mov     ecx, WAIT_LOOPS
1:      cmp     qword ptr [rip + nmis], 2
        jae     2f
        pause
        dec     ecx
        jnz     1b
2:      EXPECT  "nmis_taken", "qword ptr [rip + nmis]", 2
        EXPECT  "nmi_held_until_iret", "qword ptr [rip + nmis_inside]", 1
        EXPECT  "nmi_frame_if", "qword ptr [rip + frame_if]", 0

        DONE    msg_done

/* Count; the first time, send a second NMI, which waits for this handler's IRET. */
nmi_handler:
        push    rax
        push    rbx
        push    rcx
        inc     qword ptr [rip + nmis]
        mov     rax, [rsp + 24 + 16]                /* RFLAGS in the frame */
        and     rax, RFLAGS_IF
        or      [rip + frame_if], rax
        cmp     qword ptr [rip + nmis], 1
        jne     4f
        mov     rbx, APIC
        mov     dword ptr [rbx + APIC_ICR_LOW], ICR_SELF | ICR_NMI
        mov     ecx, WAIT_LOOPS
3:      pause
        dec     ecx
        jnz     3b
        mov     rax, [rip + nmis]
        mov     [rip + nmis_inside], rax            /* still 1: the second one was held */
4:      pop     rcx
        pop     rbx
        pop     rax
        iretq

        .section .rodata
msg_start: .asciz "NMI START\n"
msg_done:  .asciz "NMI DONE\n"

        .section .data
        .p2align 4
idtr:   .word IDT64_SIZE - 1
        .quad idt
nmis:        .quad 0
nmis_inside: .quad 0
frame_if:    .quad 0

        .section .bss
        .p2align 12
idt:    .fill IDT64_SIZE, 1, 0
        .fill 4096, 1, 0
stack_top:
