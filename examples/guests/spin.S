/*
 * spin.S - a guest that prints "SPIN" on COM1 and then loops forever, touching a port now and
 * then so that a VMM sees it alive.
 *
 * It is what a hung kernel looks like to a VMM: tests use it for --timeout (exit 124),
 * Ctrl-C (exit 130) and for stopping vCPU threads cleanly. The `out` to port 0x80 (the POST
 * diagnostic port, ignored by vmm-arch) every 2^20 iterations gives the host an exit to act on
 * even where a backend only checks for stop requests between exits.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "serial.inc"

        .section .text.entry, "ax", @progbits
        .globl  _start
        .type   _start, @function
_start:
        cli
        PUTS_POLLED msg                 /* each byte once THRE says the UART can take it */
        xor     ecx, ecx
4:      inc     ecx
        test    ecx, 0xfffff            /* every 2^20 iterations ... */
        jnz     4b
        out     POST_PORT, al           /* ... one exit to the VMM */
        jmp     4b

        .section .rodata
msg:    .asciz  "SPIN\n"

        .section .data
        .quad   0                       /* a non-empty data segment (see bootcheck.ld) */
