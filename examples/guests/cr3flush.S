/*
 * cr3flush.S - CR3 writes: the code at an address after a switch of address space, and what a
 * TLB flush costs when the TLB is large.
 *
 * Two address spaces (Intel SDM vol. 3A 4.5, 4-level paging) share the identity map of the low
 * 1 GiB (this code, its data, the stack) and differ at REMAP: in space A it maps a 2 MiB page
 * holding `mov eax, 1; ret`, in space B one holding `mov eax, 2; ret`. The guest switches
 * between them with MOV to CR3 and calls REMAP through a register after each switch (an
 * indirect call, as a kernel's calls through function pointers), ROUNDS times: a CPU runs the
 * code the current tables map (SDM 4.10.4.1: MOV to CR3 invalidates the TLB entries of the old
 * space). An emulator that kept running the block translated from space A's page in space B
 * returns 1 there (engine patch 0008 keeps its jump cache across a flush and checks a block's
 * pages before it reuses one).
 *
 * Then the cost of a flush with a large TLB: the guest touches SPREAD_PAGES distinct 4 KiB
 * pages, so that the emulator's software TLB grows to thousands of entries, and times
 * FLUSHES rounds of "write CR3, touch two pages" with RDTSC: `TIME cr3flush_cycles`. QEMU 5.0
 * (the unicorn wheel) clears its whole table at each flush; engine patch 0007 clears the
 * entries filled since the last one.
 *
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * then "CR3FLUSH DONE", and the number of failed lines to the exit port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "timing64.inc"
        .include "paging64.inc"

        .set REMAP, 0x40000000                  /* PDPT[1]: outside the shared identity map */
        .set ROUNDS, 1000
        .set SPREAD_PAGES, 8192                 /* 32 MiB of .bss, one store per 4 KiB page */
        .set FLUSHES, 4000

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start

        /* .bss is ours to zero (examples/README.md): the tables must start empty. */
        ZERO_QWORDS pml4_a, stack_top
        /* PD_LOW: identity 0..1 GiB in 2 MiB pages, shared by both spaces. */
        IDENTITY_1G pd_low
        /* The two functions, each alone in its 2 MiB page. */
        lea     rdi, [rip + page_a]
        mov     byte ptr [rdi], MOV_EAX_IMM32
        mov     dword ptr [rdi + 1], 1
        mov     byte ptr [rdi + 5], RET
        lea     rdi, [rip + page_b]
        mov     byte ptr [rdi], MOV_EAX_IMM32
        mov     dword ptr [rdi + 1], 2
        mov     byte ptr [rdi + 5], RET
        /* Space A: PML4_A[0] -> PDPT_A; PDPT_A[0] -> PD_LOW, PDPT_A[1] -> PD_A: REMAP -> A. */
        PT_ENTRY pd_a, 0, page_a, "PTE_P_RW | PTE_PS"
        PT_ENTRY pdpt_a, 0, pd_low, PTE_P_RW
        mov     qword ptr [rip + pdpt_b], rax   /* PDPT_B[0]: the same PD_LOW */
        PT_ENTRY pdpt_a, 1, pd_a, PTE_P_RW
        PT_ENTRY pml4_a, 0, pdpt_a, PTE_P_RW
        /* Space B: the same, with REMAP -> B. */
        PT_ENTRY pd_b, 0, page_b, "PTE_P_RW | PTE_PS"
        PT_ENTRY pdpt_b, 1, pd_b, PTE_P_RW
        PT_ENTRY pml4_b, 0, pdpt_b, PTE_P_RW

/* --- the code at REMAP after each switch ------------------------------------------------ */

        lea     r12, [rip + pml4_a]
        lea     r13, [rip + pml4_b]
        xor     r14d, r14d                      /* sum of the results in space A */
        xor     r15d, r15d                      /* ... in space B */
        mov     ebx, ROUNDS
2:      mov     cr3, r12
        mov     rax, REMAP
        call    rax
        add     r14, rax
        mov     cr3, r13
        mov     rax, REMAP
        call    rax
        add     r15, rax
        dec     ebx
        jnz     2b
        EXPECT  "space_a_sum", r14, ROUNDS
        EXPECT  "space_b_sum", r15, (2*ROUNDS)

/* --- a flush with a large TLB --------------------------------------------------------- */

        /* Fill the software TLB: one store in each of SPREAD_PAGES pages, a few times over (it
         * grows at a flush, by how many entries the last 100 ms used). */
        mov     ebx, 4
3:      lea     rdi, [rip + spread]
        mov     ecx, SPREAD_PAGES
4:      mov     byte ptr [rdi], 1
        add     rdi, PAGE_4K
        dec     ecx
        jnz     4b
        mov     cr3, r12
        dec     ebx
        jnz     3b
        /* Refill it once more, then time the flushes. */
        lea     rdi, [rip + spread]
        mov     ecx, SPREAD_PAGES
5:      mov     byte ptr [rdi], 1
        add     rdi, PAGE_4K
        dec     ecx
        jnz     5b
        READ_TSC r8
        lea     rdi, [rip + spread]
        mov     ecx, FLUSHES
6:      mov     cr3, r12
        mov     byte ptr [rdi], 2
        mov     byte ptr [rdi + PAGE_4K], 2
        dec     ecx
        jnz     6b
        READ_TSC r9
        sub     r9, r8
        mov     [rip + flush_cycles], r9
        TIME    cr3flush_cycles, "qword ptr [rip + flush_cycles]"
        EXPECT  "flushes_done", rcx, 0

        DONE    msg_done

        .section .rodata
msg_start: .asciz "CR3FLUSH START\n"
msg_done:  .asciz "CR3FLUSH DONE\n"

        .section .data
        .p2align 3
flush_cycles: .quad 0

        .section .bss
        .p2align 12
pml4_a:   .fill 4096, 1, 0
pml4_b:   .fill 4096, 1, 0
pdpt_a:   .fill 4096, 1, 0
pdpt_b:   .fill 4096, 1, 0
pd_low:   .fill 4096, 1, 0
pd_a:     .fill 4096, 1, 0
pd_b:     .fill 4096, 1, 0
        .fill 4096, 1, 0
stack_top:
        .p2align 21
page_a:   .fill PAGE_2M, 1, 0
page_b:   .fill PAGE_2M, 1, 0
spread:   .fill SPREAD_PAGES * PAGE_4K, 1, 0
