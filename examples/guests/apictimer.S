/*
 * apictimer.S - the local APIC timer and external interrupts, as a guest kernel uses them.
 *
 * The guest installs an interrupt gate for vector 0xec, software-enables its xAPIC (SVR,
 * SDM 10.4.7.1), programs the timer in periodic mode (LVT timer, divide configuration, initial
 * count; SDM 10.5.4) and waits in `sti; hlt` until the handler has run TICKS times. The handler
 * counts, checks that the vector is in service (ISR, SDM 10.8.4) and writes EOI. Then it sends
 * itself a fixed IPI through the ICR (shorthand "self", SDM 10.6.1) and checks that it arrives,
 * and finally masks the timer and checks that the count stops. One line per fact on COM1:
 *
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * and the number of failed lines to the exit port 0xf4. The APIC is used through its MMIO page
 * at 0xfee00000, which the VMM's identity map covers.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "gdt64.inc"
        .include "apic.inc"

        .set IPI_VECTOR, 0xf7
        .set TICKS, 5
        .set KERNEL_CS, BOOT_CS             /* the VMM's boot GDT */

        .include "idt64.inc"  /* after KERNEL_CS: it stores the selector */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        cli
        lea     rsp, [rip + stack_top]
        SET_GATE TIMER_VECTOR, timer_handler
        SET_GATE IPI_VECTOR, ipi_handler
        lidt    [rip + idtr]
        lea     rsi, [rip + msg_start]
        call    puts

        START_TIMER rbx
1:      sti
        hlt
        cli
        cmp     qword ptr [rip + ticks], TICKS
        jb      1b
        EXPECT  "timer_ticks", "qword ptr [rip + ticks]", TICKS
        EXPECT  "timer_in_service", "qword ptr [rip + in_service]", TICKS
        EXPECT  "timer_frame_if", "qword ptr [rip + frame_if]", RFLAGS_IF

        /* Mask the timer: no more ticks while interrupts are on for a while. A tick already
         * requested when the LVT was masked may still be taken (masking does not clear IRR), so
         * interrupts are opened once to drain it before counting. */
        mov     dword ptr [rbx + APIC_LVT_TIMER], LVT_MASKED | LVT_PERIODIC | TIMER_VECTOR
        call    spin_with_interrupts
        mov     rax, [rip + ticks]
        mov     [rip + ticks_at_mask], rax
        call    spin_with_interrupts
        mov     rax, [rip + ticks]
        sub     rax, [rip + ticks_at_mask]
        mov     [rip + ticks_after_mask], rax
        EXPECT  "masked_ticks", "qword ptr [rip + ticks_after_mask]", 0

        /* A fixed self-IPI: pending while IF=0, taken once interrupts are open (`sti; hlt`:
         * the STI shadow lets the HLT start, the pending interrupt ends it at once). */
        mov     dword ptr [rbx + APIC_ICR_LOW], ICR_SELF | IPI_VECTOR
        EXPECT  "ipi_before_sti", "qword ptr [rip + ipis]", 0
        sti
        hlt
        cli
        EXPECT  "ipi_after_sti", "qword ptr [rip + ipis]", 1

        DONE    msg_done

/* Interrupts open for a while, then closed again. */
spin_with_interrupts:
        IRQ_WINDOW
        ret

/* The timer: count, note whether 0xec is in service (ISR bit), EOI; and IF in the frame. */
timer_handler:
        push    rax
        push    rbx
        COUNT_TICK ticks, in_service
        mov     rax, [rsp + 16 + 16]                /* RFLAGS in the frame */
        and     rax, RFLAGS_IF
        mov     [rip + frame_if], rax
        pop     rbx
        pop     rax
        iretq

ipi_handler:
        push    rbx
        inc     qword ptr [rip + ipis]
        mov     rbx, APIC
        mov     dword ptr [rbx + APIC_EOI], 0
        pop     rbx
        iretq

        .section .rodata
msg_start: .asciz "APICTIMER START\n"
msg_done:  .asciz "APICTIMER DONE\n"

        .section .data
        .p2align 4
idtr:   .word IDT64_SIZE - 1
        .quad idt
ticks:            .quad 0
in_service:       .quad 0
frame_if:         .quad 0
ticks_at_mask:    .quad 0
ticks_after_mask: .quad 0
ipis:             .quad 0

        .section .bss
        .p2align 12
idt:    .fill IDT64_SIZE, 1, 0
        .fill 4096, 1, 0
stack_top:
