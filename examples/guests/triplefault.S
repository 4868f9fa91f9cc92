/*
 * triplefault.S - a guest that prints "TRIPLE" on COM1 and then triple-faults.
 *
 * It loads an IDT with limit 0, then executes UD2. The #UD (vector 6) cannot
 * be delivered because its gate lies beyond the IDT limit, which raises #GP;
 * #GP cannot be delivered either, which makes a double fault (#DF); #DF
 * cannot be delivered, which is a triple fault: the CPU enters shutdown
 * (Intel SDM vol 3A, "Interrupt 8 - Double Fault Exception (#DF)", which
 * covers the benign/contributory classes and the shutdown case).
 * Under KVM that is KVM_EXIT_SHUTDOWN. UD2 is used rather than INT3 because
 * the nested kvm_pvm host fails INT3 at CPL0 with an emulation error instead
 * of delivering it.
 *
 * Output: exactly "TRIPLE\n". It never writes the exit port.
 * (A software emulator with no fault escalation, e.g. unicorn, simply stops
 * with an invalid-instruction error at the UD2.)
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "serial.inc"

        .section .text.entry, "ax", @progbits
        .globl  _start
        .type   _start, @function
_start:
        cli
        PUTS_POLLED msg, PUTC_SPIN      /* poll LSR.THRE (bounded), then send */

        lidt    [rip + null_idtr]       /* IDT limit 0: no gate is reachable */
        ud2                             /* #UD -> #GP -> #DF -> shutdown */

        /* Not reached on a real CPU or KVM. */
.Lpark:
        hlt
        jmp     .Lpark

        .section .rodata, "a", @progbits
msg:    .asciz "TRIPLE\n"

        .data                           /* keeps the RW segment non-empty */
        .balign 8
null_idtr:
        .word   0                       /* limit */
        .quad   0                       /* base */

        .section .note.GNU-stack, "", @progbits
