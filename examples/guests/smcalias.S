/*
 * smcalias.S - code patched through a second, non-executable mapping of its page must run new.
 *
 * Linux's text_poke writes kernel code through a temporary writable alias of the code's page.
 * The guest does the same with its own page tables (Intel SDM vol. 3A 4.5, 2 MiB pages): one
 * physical 2 MiB page, ALIASED, is mapped at EXEC_VIEW (executable) and at NX_VIEW (XD set,
 * SDM 4.6.2, which needs IA32_EFER.NXE). Through NX_VIEW it writes a function
 * `mov eax, 0x11; ret` while the page holds no code, calls it through EXEC_VIEW, patches the
 * immediate to 0x22 through NX_VIEW and calls it again. A CPU runs the new code: its check for
 * self-modifying code is made on the physical address (SDM vol. 3A 11.6), and a branch to the
 * stored code is enough to run it (8.1.3). The unicorn wheel returns 0x11 again: a store
 * through a non-executable mapping takes that TLB entry off the store slow path for good, and
 * translating the page later protects only the executing address (engine patch 0002 restores
 * QEMU's rule; bench/unicorn_fix.py's `_alias_guest` is the same experiment on a bare unicorn).
 *
 * Also the control every emulator gets right: two functions in the page the code runs from,
 * patched by two stores in one translation block, then both called.
 *
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * then "SMCALIAS DONE", and the number of failed lines to the exit port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "paging64.inc"

        /* PDPT[1] (linear 1 GiB..2 GiB): the two views of ALIASED, both outside the identity
         * map of the low 1 GiB that PDPT[0] gives. */
        .set EXEC_VIEW, 0x40000000
        .set NX_VIEW, 0x40200000
        .set FUNC, 0x100                        /* the function's offset in the page */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start

        /* .bss is ours to zero (examples/README.md): the tables must start empty. */
        ZERO_QWORDS pml4, stack_top
        /* Own tables: PML4[0] -> PDPT; PDPT[0] -> PD_LOW, identity 0..1 GiB in 2 MiB pages
         * (this code, its data, the stack); PDPT[1] -> PD_ALIAS with the two views. */
        IDENTITY_1G pd_low
        PT_ENTRY pd_alias, "(EXEC_VIEW >> 21) % 512", aliased, "PTE_P_RW | PTE_PS"
        mov     qword ptr [rip + pd_alias + (NX_VIEW >> 21) % 512 * 8], rax
        mov     dword ptr [rip + pd_alias + (NX_VIEW >> 21) % 512 * 8 + 4], PTE_XD_HIGH
        PT_ENTRY pdpt, 0, pd_low, PTE_P_RW
        PT_ENTRY pdpt, 1, pd_alias, PTE_P_RW
        PT_ENTRY pml4, 0, pdpt, PTE_P_RW
        /* XD is a reserved bit (a #PF) unless EFER.NXE is set (SDM 4.6.2). */
        mov     ecx, MSR_EFER
        rdmsr
        or      eax, EFER_NXE
        wrmsr
        lea     rax, [rip + pml4]
        mov     cr3, rax

/* --- the alias: written through NX_VIEW, run through EXEC_VIEW ---------------------------- */

        /* From here to the second call: no CR3 write, no INVLPG, nothing that flushes a TLB
         * (a flush would hide the bug by putting NX_VIEW's entry back on the slow path). */
        mov     rbx, NX_VIEW + FUNC
        mov     byte ptr [rbx], MOV_EAX_IMM32       /* the page holds no code yet */
        mov     dword ptr [rbx + 1], 0x11
        mov     byte ptr [rbx + 5], RET
        mov     rax, EXEC_VIEW + FUNC
        call    rax                                 /* translates the page's first block */
        mov     [rip + alias_first], rax
        mov     dword ptr [rbx + 1], 0x22           /* patch through the NX view */
        mov     rax, EXEC_VIEW + FUNC
        call    rax
        mov     [rip + alias_patched], rax
        EXPECT  "alias_first", "qword ptr [rip + alias_first]", 0x11
        EXPECT  "alias_patched", "qword ptr [rip + alias_patched]", 0x22

/* --- the control: the running page patched in place -------------------------------------- */

        call    same_page
        EXPECT  "same_page_a_before", "qword ptr [rip + same_a_before]", 0x11
        EXPECT  "same_page_b_before", "qword ptr [rip + same_b_before]", 0x33
        EXPECT  "same_page_a_after", "qword ptr [rip + same_a_after]", 0x22
        EXPECT  "same_page_b_after", "qword ptr [rip + same_b_after]", 0x44

        DONE    msg_done

/* One 4 KiB page holds the caller and both functions: the stores below hit the page the
 * running block was translated from, and nothing is translated between the two stores. */
        .section .text.samepage, "ax", @progbits
        .p2align 12
same_page:
        call    func_a
        mov     [rip + same_a_before], rax
        call    func_b
        mov     [rip + same_b_before], rax
        mov     dword ptr [rip + func_a + 1], 0x22
        mov     dword ptr [rip + func_b + 1], 0x44
        call    func_a
        mov     [rip + same_a_after], rax
        call    func_b
        mov     [rip + same_b_after], rax
        ret
func_a: mov     eax, 0x11
        ret
func_b: mov     eax, 0x33
        ret
        .p2align 12                             /* the page ends here: nothing else in it */

        .section .rodata
msg_start: .asciz "SMCALIAS START\n"
msg_done:  .asciz "SMCALIAS DONE\n"

        .section .data
        .p2align 3
alias_first:   .quad 0
alias_patched: .quad 0
same_a_before: .quad 0
same_b_before: .quad 0
same_a_after:  .quad 0
same_b_after:  .quad 0

        .section .bss
        .p2align 12
pml4:     .fill 4096, 1, 0
pdpt:     .fill 4096, 1, 0
pd_low:   .fill 4096, 1, 0
pd_alias: .fill 4096, 1, 0
        .fill 4096, 1, 0
stack_top:
        .p2align 21
aliased:  .fill PAGE_2M, 1, 0                   /* the physical page mapped twice */
