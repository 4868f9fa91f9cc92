/*
 * repstring.S - REP MOVS and REP STOS: what they leave behind in the cases a CPU defines, and
 * what a megabyte of them costs against the same work as a loop.
 *
 * A repeated string instruction runs its element operation RCX times, stepping RSI and RDI by
 * the element size (backwards with DF set), one element after the other (Intel SDM vol. 2B,
 * MOVS, STOS and the REP prefix): a destination that overlaps its source ahead of it repeats
 * the source's first elements, and a store over code that has run makes the new code run. The
 * checks (CHECK lines) hold on every library:
 *
 *   stos_cross_*     REP STOSQ of STOS_QWORDS qwords from 24 bytes before a page's end: RCX,
 *                    RDI, the first and last qword, and the qword after them untouched
 *   movs_copy_diff   the timed REP MOVSQ of a megabyte: the copy's checksum less the source's
 *   movsb_ahead      REP MOVSB one byte ahead of its source: the first byte, 63 times
 *   movsq_ahead      REP MOVSQ one qword ahead: the first qword, 63 times
 *   movsd_ahead_part REP MOVSD 2 bytes ahead (an element overlaps the one it copies from)
 *   movsb_backward   REP MOVSB with DF set, 16 bytes from the end of a buffer
 *   code_patched     REP MOVSB of `mov eax, 2; ret` over a function that returned 1, which
 *                    then runs: 2
 *
 * Then the cost, the fastest of PASSES passes, in TSC cycles (the host's on emulate):
 *
 *   TIME rep_movsq_cycles    REP MOVSQ of a megabyte
 *   TIME loop_movq_cycles    the same copy as a loop of MOV, one qword a round
 *   TIME rep_stosq_cycles    REP STOSQ of a megabyte
 *
 * QEMU 5.0 (the unicorn wheel) runs a repeated string instruction one iteration per execution
 * of a block that jumps back to itself, about what the loop costs; engine patch 0017 does the
 * iterations that stay within a page at once. Then "REPSTRING DONE" and the number of failed
 * lines to the exit port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "timing64.inc"

        .set COPY_BYTES, 1 << 20
        .set PASSES, 4
        .set STOS_QWORDS, 1000
        .set STOS_VALUE, 0x1122334455667788

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start

        /* The source: qword i = i * 0x9e3779b97f4a7c15 (any pattern that differs qword to
         * qword), and its checksum, a rotate-and-add over every qword. */
        lea     rdi, [rip + source]
        mov     ecx, COPY_BYTES / 8
        xor     eax, eax
        mov     rdx, 0x9e3779b97f4a7c15
1:      mov     [rdi], rax
        add     rax, rdx
        add     rdi, 8
        dec     ecx
        jnz     1b
        lea     rsi, [rip + source]
        call    checksum
        mov     [rip + source_sum], rax

/* --- the cost ---------------------------------------------------------------------------- */

        mov     r12, -1
        mov     r13, -1
        mov     r14, -1
        mov     r15d, PASSES
2:      READ_TSC r8
        lea     rsi, [rip + source]
        lea     rdi, [rip + target]
        mov     ecx, COPY_BYTES / 8
        rep     movsq
        BEST_TIME r8, r12
        READ_TSC r8
        lea     rsi, [rip + source]
        lea     rdi, [rip + scratch]
        mov     ecx, COPY_BYTES / 8
3:      mov     rax, [rsi]
        mov     [rdi], rax
        add     rsi, 8
        add     rdi, 8
        dec     ecx
        jnz     3b
        BEST_TIME r8, r13
        READ_TSC r8
        lea     rdi, [rip + scratch]
        mov     ecx, COPY_BYTES / 8
        xor     eax, eax
        rep     stosq
        BEST_TIME r8, r14
        dec     r15d
        jnz     2b
        mov     [rip + movs_cycles], r12
        mov     [rip + loop_cycles], r13
        mov     [rip + stos_cycles], r14

/* --- what they leave behind -------------------------------------------------------------- */

        lea     rsi, [rip + target]
        call    checksum
        sub     rax, [rip + source_sum]
        EXPECT  "movs_copy_diff", rax, 0

        lea     rdi, [rip + stos_area + 4096 - 24]
        mov     ecx, STOS_QWORDS
        mov     rax, STOS_VALUE
        rep     stosq
        mov     r12, rcx
        mov     r13, rdi
        EXPECT  "stos_cross_rcx", r12, 0
        EXPECT  "stos_cross_rdi", r13, stos_area+4096-24+STOS_QWORDS*8
        mov     rax, [rip + stos_area + 4096 - 24]
        EXPECT  "stos_cross_first", rax, STOS_VALUE
        mov     rax, [rip + stos_area + 4096 - 24 + (STOS_QWORDS - 1) * 8]
        EXPECT  "stos_cross_last", rax, STOS_VALUE
        mov     rax, [rip + stos_area + 4096 - 24 + STOS_QWORDS * 8]
        EXPECT  "stos_cross_after", rax, 0

        /* Bytes 1..64, then a copy one byte ahead of itself: 64 times byte 1. */
        lea     rdi, [rip + small]
        mov     ecx, 64
        mov     eax, 1
4:      mov     [rdi], al
        inc     rdi
        inc     eax
        dec     ecx
        jnz     4b
        lea     rsi, [rip + small]
        lea     rdi, [rip + small + 1]
        mov     ecx, 63
        rep     movsb
        mov     rax, [rip + small + 56]
        EXPECT  "movsb_ahead", rax, 0x0101010101010101

        /* Qwords 1..64, then a copy one qword ahead of itself: 64 times qword 1. */
        lea     rdi, [rip + small]
        mov     ecx, 64
        mov     eax, 1
5:      mov     [rdi], rax
        add     rdi, 8
        inc     eax
        dec     ecx
        jnz     5b
        lea     rsi, [rip + small]
        lea     rdi, [rip + small + 8]
        mov     ecx, 63
        rep     movsq
        mov     rax, [rip + small + 63 * 8]
        EXPECT  "movsq_ahead", rax, 1

        /* Bytes 01..0c, then REP MOVSD 2 bytes ahead, 3 elements. Each element is read whole,
         * then written: 01 02 | 01 02 03 04, then 03 04 07 08 at 6, 07 08 0b 0c at 10. A copy of
         * the 12 bytes at once would leave 01 02 01 02 03 04 05 06 instead. */
        mov     dword ptr [rip + small], 0x04030201
        mov     dword ptr [rip + small + 4], 0x08070605
        mov     dword ptr [rip + small + 8], 0x0c0b0a09
        mov     dword ptr [rip + small + 12], 0
        lea     rsi, [rip + small]
        lea     rdi, [rip + small + 2]
        mov     ecx, 3
        rep     movsd
        mov     rax, [rip + small]
        EXPECT  "movsd_ahead_part", rax, 0x0403040302010201

        /* DF set: the 16 bytes that end at the source's end, copied downwards. */
        lea     rsi, [rip + source + 15]
        lea     rdi, [rip + small + 15]
        mov     ecx, 16
        std
        rep     movsb
        cld
        mov     rax, [rip + small]
        EXPECT  "movsb_backward", rax, 0

        /* Code that ran, then overwritten by REP MOVSB, then run again. */
        call    patchable
        mov     r12, rax
        lea     rsi, [rip + new_code]
        lea     rdi, [rip + patchable]
        mov     ecx, new_code_end - new_code
        rep     movsb
        call    patchable
        shl     r12, 8
        or      rax, r12
        EXPECT  "code_patched", rax, 0x102

        TIME    rep_movsq_cycles, "qword ptr [rip + movs_cycles]"
        TIME    loop_movq_cycles, "qword ptr [rip + loop_cycles]"
        TIME    rep_stosq_cycles, "qword ptr [rip + stos_cycles]"
        DONE    msg_done

/* RAX = the rotate-and-add checksum of the COPY_BYTES at RSI. Clobbers RCX, RDX, RSI. */
checksum:
        xor     eax, eax
        mov     ecx, COPY_BYTES / 8
1:      rol     rax, 7
        add     rax, [rsi]
        add     rsi, 8
        dec     ecx
        jnz     1b
        ret

        .section .rodata
msg_start: .asciz "REPSTRING START\n"
msg_done:  .asciz "REPSTRING DONE\n"
new_code:
        .byte   MOV_EAX_IMM32
        .long   2
        .byte   RET
new_code_end:

        .section .data
        .p2align 12
patchable:                                      /* mov eax, 1; ret, in a page of its own */
        .byte   MOV_EAX_IMM32
        .long   1
        .byte   RET
        .p2align 12
        .p2align 3
source_sum:  .quad 0
movs_cycles: .quad 0
loop_cycles: .quad 0
stos_cycles: .quad 0

        .section .bss
        .p2align 12
        .fill 4096, 1, 0
stack_top:
small:     .fill 4096, 1, 0
stos_area: .fill 3 * 4096, 1, 0
source:    .fill COPY_BYTES, 1, 0
target:    .fill COPY_BYTES, 1, 0
scratch:   .fill COPY_BYTES, 1, 0
