/*
 * blockloop.S - many tiny translation blocks in a row, timed: the cost of each block's start.
 *
 * An emulator that translates code (QEMU's TCG, unicorn) tests at the start of every block
 * whether it was asked to stop. QEMU does it inline, a load and a branch; unicorn 2.1.4 calls a
 * helper function instead (helper_check_exit_request), a call per block executed, and engine
 * patch 0003 puts QEMU's inline test back. This guest makes that cost stand out: the hot loop is
 * BLOCKS_PER_ROUND unconditional jumps, each to the next instruction, so each is a block of one
 * instruction chained directly to the next (and an `inc; dec; jnz` block closing the round);
 * no memory access at all. ROUNDS rounds are a pass, timed with RDTSC (SDM vol. 2B; on the
 * emulate backend the host's TSC); of PASSES short passes (here 1 ms on the engine, 6 on the
 * wheel) the fastest is printed, one the host did not preempt even on a busy machine:
 *
 *     TIME blockloop_cycles <16 hex digits>  TSC cycles of the fastest pass
 *     TIME blockloop_blocks <16 hex digits>  blocks executed per pass
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * The check (every round ran) passes everywhere; tests/backends/test_engine_patches.py compares the time
 * between libraries. Then "BLOCKLOOP DONE" and the number of failed lines to port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "report64.inc"
        .include "timing64.inc"

        .set BLOCKS_PER_ROUND, 64               /* the jumps; + 1 for the `dec; jnz` block */
        .set ROUNDS, 50000
        .set PASSES, 32

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start

        mov     r12, -1                         /* the best pass so far */
        mov     r13d, PASSES
1:      xor     r8d, r8d
        mov     ecx, ROUNDS
        READ_TSC r14
        .p2align 4
2:
        .rept   BLOCKS_PER_ROUND
        jmp     3f                              /* ends the block: the next one starts at 3 */
3:
        .endr
        inc     r8d
        dec     ecx
        jnz     2b
        BEST_TIME r14, r12
        dec     r13d
        jnz     1b

        TIME    blockloop_cycles, r12
        TIME    blockloop_blocks, (BLOCKS_PER_ROUND+1)*ROUNDS
        EXPECT  "blockloop_rounds", r8, ROUNDS

        DONE    msg_done

        .section .rodata
msg_start: .asciz "BLOCKLOOP START\n"
msg_done:  .asciz "BLOCKLOOP DONE\n"

        .section .bss
        .p2align 12
        .fill 4096, 1, 0
stack_top:
