/*
 * stosb.S - the cost of `rep stosb` over 8 MiB of executable memory, as Linux's clear_bss.
 *
 * The VMM's identity map sets no XD bit (SDM vol. 3A 4.6.2), so every page is executable, as
 * Linux's .data and .bss are until mark_rodata_ro(). The unicorn wheel sends every store to such
 * a page down its slow path (notdirty_write) whether or not the page holds code, about 25 ns a
 * byte; QEMU's rule (engine patch 0002) makes a page's stores fast while it holds no translated
 * code, about 2 ns a byte. The guest fills BUFFER_BYTES of its .bss three times, timing each
 * pass with RDTSC (SDM vol. 2B; on the emulate backend the host's TSC), and prints the best:
 *
 *     TIME stosb_cycles <16 hex digits>     TSC cycles of the fastest pass
 *     TIME tsc_mhz <16 hex digits>          CPUID.16H:EAX, the base frequency in MHz (the emulate
 *                                           backend puts its TSC's there), 0 without leaf 16H
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * The checks are that the fill happened (RCX, RDI, the first and last byte, the byte after the
 * buffer untouched); they pass everywhere: the timing is for tests/backends/test_engine_patches.py to
 * compare between libraries. Then "STOSB DONE" and the number of failed lines to port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "report64.inc"
        .include "timing64.inc"

        .set BUFFER_BYTES, 8 << 20
        .set PASSES, 3
        .set FILL, 0xa5                         /* the last pass stores FILL + PASSES - 1 */
        .set LEAF_FREQUENCY, 0x16               /* CPUID.16H (SDM vol. 2A, CPUID) */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start

        mov     r12, -1                         /* the best pass so far */
        mov     r13d, FILL
1:      READ_TSC r14
        lea     rdi, [rip + buffer]
        mov     ecx, BUFFER_BYTES
        mov     eax, r13d
        rep     stosb
        mov     r15, rcx                        /* kept for the checks */
        mov     r9, rdi
        BEST_TIME r14, r12
        inc     r13d
        cmp     r13d, FILL + PASSES
        jb      1b

        /* CPUID.16H exists when leaf 0 says so (SDM vol. 2A, CPUID); else 0 is printed. */
        xor     r14d, r14d
        xor     eax, eax
        cpuid
        cmp     eax, LEAF_FREQUENCY
        jb      2f
        mov     eax, LEAF_FREQUENCY
        xor     ecx, ecx
        cpuid
        mov     r14d, eax
2:      TIME    stosb_cycles, r12
        TIME    tsc_mhz, r14
        EXPECT  "stosb_rcx", r15, 0
        EXPECT  "stosb_rdi_end", r9, buffer+BUFFER_BYTES
        movzx   eax, byte ptr [rip + buffer]
        EXPECT  "stosb_first_byte", rax, FILL+PASSES-1
        movzx   eax, byte ptr [rip + buffer + BUFFER_BYTES - 1]
        EXPECT  "stosb_last_byte", rax, FILL+PASSES-1
        movzx   eax, byte ptr [rip + guard]
        EXPECT  "stosb_guard_byte", rax, 0

        DONE    msg_done

        .section .rodata
msg_start: .asciz "STOSB START\n"
msg_done:  .asciz "STOSB DONE\n"

        .section .bss
        .p2align 12
        .fill 4096, 1, 0
stack_top:
buffer: .fill BUFFER_BYTES, 1, 0
guard:  .fill 8, 1, 0
