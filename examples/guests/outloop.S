/*
 * outloop.S - per-exit cost benchmark guest.
 *
 * Executes `out 0x80, al` (the POST/diagnostic port, which every VMM can
 * treat as a no-op) outloop_count times, then writes status 0 to the exit
 * port 0xf4 with a 1-byte OUT and halts. Nothing is printed on COM1, so the
 * run makes exactly outloop_count + 1 port-I/O exits.
 *
 * outloop_count is a global 8-byte symbol in .data (default 100000). A
 * benchmark may patch it in the ELF file, or in guest memory before the run,
 * using the symbol's address from the ELF symbol table. A count of 0 is
 * allowed (only the exit-port write happens).
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "exit.inc"

        .set DEFAULT_COUNT, 100000

        .section .text.entry, "ax", @progbits
        .globl  _start
        .type   _start, @function
_start:
        cli
        mov     rcx, qword ptr [rip + outloop_count]
        xor     eax, eax
        test    rcx, rcx
        jz      2f
1:      out     POST_PORT, al
        dec     rcx
        jnz     1b
2:      xor     eax, eax
        EXIT_PARK                       /* status 0 */

        .data
        .balign 8
        .globl  outloop_count
        .type   outloop_count, @object
        .size   outloop_count, 8
outloop_count:
        .quad   DEFAULT_COUNT

        .section .note.GNU-stack, "", @progbits
