/*
 * jmpcache.S - indirect calls to many distinct addresses, timed: the size of the jump cache.
 *
 * A translating CPU finds the block for an indirect jump, a call through a register or a `ret`
 * in a small table indexed by a hash of the virtual PC (QEMU's tb_jmp_cache), and in a shared
 * hash table when that slot holds another block. QEMU 5.0, and so unicorn 2.1.4, gives it
 * 2^12 slots, and its hash keeps only 6 bits of an address within its page: the code of a
 * large kernel does not fit, and a Linux boot looks 1.34 million jumps up in the hash table.
 * Engine patch 0015 makes it 2^14 slots (0.33 million).
 *
 * Two passes of the same number of calls, each to a `ret` alone in its 64-byte line:
 *
 *   narrow: NARROW targets (64 KiB of code), one slot each in either cache;
 *   wide:   WIDE targets (512 KiB), which share 4,096 slots two by two in a 2^12 cache, so
 *           every call misses there (each call evicts the block the next pass needs), and have
 *           a slot each in a 2^14 cache.
 *
 * Each is timed with RDTSC (SDM vol. 2B; on the emulate backend the host's TSC), the fastest of
 * PASSES passes (one the host did not preempt):
 *
 *     TIME jmpcache_narrow_cycles <16 hex digits>
 *     TIME jmpcache_wide_cycles <16 hex digits>
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * The check (every call returned) passes everywhere; tests/backends/test_engine_patches.py
 * compares the two times within each library. Then "JMPCACHE DONE" and the number of failed
 * lines to port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "report64.inc"
        .include "timing64.inc"

        .set LINE, 64                           /* bytes between two targets */
        .set NARROW, 1024
        .set WIDE, 8192
        .set CALLS, 65536                       /* a pass: 64 rounds narrow, 8 rounds wide */
        .set PASSES, 16

        /* r12 = the fastest of PASSES passes of CALLS calls to the `targets` lines in turn,
         * wrapping after `count` of them; r8 = the calls that returned in the last pass. */
        .macro TIMED_CALLS targets, count
        mov     r12, -1
        mov     r13d, PASSES
1:      xor     r8d, r8d
        mov     ecx, CALLS
        xor     r9d, r9d                        /* the next target's offset */
        lea     rbx, [rip + \targets]
        READ_TSC r14                            /* (clobbers RAX and RDX) */
2:      lea     rax, [rbx + r9]
        call    rax                             /* a block ends: its successor is looked up */
        inc     r8d
        add     r9d, LINE
        and     r9d, \count * LINE - 1          /* counts are powers of two */
        dec     ecx
        jnz     2b
        BEST_TIME r14, r12
        dec     r13d
        jnz     1b
        .endm

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start

        TIMED_CALLS narrow, NARROW
        TIME    jmpcache_narrow_cycles, r12
        EXPECT  "narrow_calls", r8, CALLS

        TIMED_CALLS wide, WIDE
        TIME    jmpcache_wide_cycles, r12
        EXPECT  "wide_calls", r8, CALLS

        DONE    msg_done

        .section .text.targets, "ax", @progbits
        .p2align 12
narrow:
        .rept   NARROW
        ret
        .p2align 6
        .endr
        .p2align 12
wide:
        .rept   WIDE
        ret
        .p2align 6
        .endr

        .section .rodata
msg_start: .asciz "JMPCACHE START\n"
msg_done:  .asciz "JMPCACHE DONE\n"

        .section .bss
        .p2align 12
        .fill 4096, 1, 0
stack_top:
