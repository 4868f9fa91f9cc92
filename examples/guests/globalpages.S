/*
 * globalpages.S - what a CR3 load leaves in the TLB, and what a store after it costs.
 *
 * With CR4.PGE set, a translation whose last paging entry has G (bit 8) set is global: MOV to
 * CR3 invalidates every other translation and may keep it (Intel SDM vol. 3A 4.10.2.4 and
 * 4.10.4.1). Toggling CR4.PGE invalidates the global ones too, and INVLPG invalidates the
 * translation of its page, global or not, including a 2 MiB page's whole (4.10.4.1).
 *
 * The guest maps the same PAGES physical 4 KiB pages twice, at GLOBAL with G set and at LOCAL
 * without it, and checks the rules a CPU must keep:
 *
 *   local_remapped   a non-global PTE changed with no INVLPG: after MOV to CR3 the new page
 *   global_pge_flush a global PTE changed: after CR4.PGE off and on the new page
 *   global_invlpg    a global PTE changed: after INVLPG of it the new page
 *   big_invlpg       a global 2 MiB page, used at two of its 4 KiB pages, moved; a MOV to CR3
 *                    between the uses and the INVLPG; the INVLPG names the first 4 KiB page
 *                    and the read is at the other: the new page
 *
 * Then it times ROUNDS rounds of "MOV to CR3, then one access to each of the PAGES pages",
 * best of PASSES passes, in TSC cycles:
 *
 *   TIME global_read_cycles   reads through GLOBAL
 *   TIME local_read_cycles    reads through LOCAL
 *   TIME local_write_cycles   stores through LOCAL
 *
 * QEMU 5.0 (the unicorn wheel) drops every translation at a CR3 load, so both reads walk the
 * page tables again each round; engine patch 0016 keeps the global ones. The wheel also puts
 * every TLB entry it fills on the store slow path until the page's first store; engine patch
 * 0017 fills an entry for a page without code on the fast path, so a store costs what a read
 * does.
 *
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * then "GLOBALPAGES DONE", and the number of failed lines to the exit port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "timing64.inc"
        .include "paging64.inc"

        .set GLOBAL, 0x40000000                 /* PDPT[1] -> PD_HIGH[0] -> PT_GLOBAL */
        .set LOCAL, 0x40200000                  /* PD_HIGH[1] -> PT_LOCAL */
        .set BIG, 0x40400000                    /* PD_HIGH[2]: a 2 MiB global page */
        .set PAGES, 256
        .set ROUNDS, 64
        .set PASSES, 8
        .set OLD_VALUE, 0x11
        .set NEW_VALUE, 0x22

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start

        /* .bss is ours to zero (examples/README.md): the tables must start empty. */
        ZERO_QWORDS pml4, stack_top
        IDENTITY_1G pd_low                      /* this code, its data, the stack */
        PT_ENTRY pdpt, 0, pd_low, PTE_P_RW
        PT_ENTRY pdpt, 1, pd_high, PTE_P_RW
        PT_ENTRY pml4, 0, pdpt, PTE_P_RW
        PT_ENTRY pd_high, 0, pt_global, PTE_P_RW
        PT_ENTRY pd_high, 1, pt_local, PTE_P_RW
        PT_ENTRY pd_high, 2, big_old, "PTE_P_RW | PTE_PS | PTE_G"
        /* PT_GLOBAL[i] and PT_LOCAL[i] -> the same page `pages + i * 4 KiB`. */
        lea     rdi, [rip + pt_global]
        lea     rsi, [rip + pt_local]
        lea     rax, [rip + pages]
        or      rax, PTE_P_RW
        mov     ecx, PAGES
1:      mov     [rsi], rax
        or      rax, PTE_G
        mov     [rdi], rax
        and     rax, ~PTE_G
        add     rax, PAGE_4K
        add     rdi, 8
        add     rsi, 8
        dec     ecx
        jnz     1b
        /* The pages a remapped entry points at, before and after; the same in the 2 MiB pages. */
        mov     byte ptr [rip + old_page], OLD_VALUE
        mov     byte ptr [rip + new_page], NEW_VALUE
        mov     byte ptr [rip + big_old + 5 * PAGE_4K], OLD_VALUE
        mov     byte ptr [rip + big_new + 5 * PAGE_4K], NEW_VALUE
        lea     r12, [rip + pml4]
        mov     cr3, r12
        mov     rax, cr4
        or      rax, CR4_PGE
        mov     cr4, rax

/* --- what each invalidation must drop -------------------------------------------------- */

        /* A non-global entry: MOV to CR3 drops it. */
        lea     rax, [rip + old_page]
        or      rax, PTE_P_RW
        mov     [rip + pt_local], rax
        mov     rbx, LOCAL
        movzx   eax, byte ptr [rbx]             /* its translation is in the TLB now */
        lea     rax, [rip + new_page]
        or      rax, PTE_P_RW
        mov     [rip + pt_local], rax
        mov     cr3, r12
        movzx   eax, byte ptr [rbx]
        EXPECT  "local_remapped", rax, NEW_VALUE

        /* A global entry: CR4.PGE off and on drops it. */
        lea     rax, [rip + old_page]
        or      rax, PTE_P_RW | PTE_G
        mov     [rip + pt_global], rax
        mov     rbx, GLOBAL
        movzx   eax, byte ptr [rbx]
        lea     rax, [rip + new_page]
        or      rax, PTE_P_RW | PTE_G
        mov     [rip + pt_global], rax
        mov     cr3, r12                        /* may keep it */
        mov     rax, cr4
        and     rax, ~CR4_PGE
        mov     cr4, rax
        or      rax, CR4_PGE
        mov     cr4, rax
        movzx   eax, byte ptr [rbx]
        EXPECT  "global_pge_flush", rax, NEW_VALUE

        /* A global entry: INVLPG drops it. */
        movzx   eax, byte ptr [rbx]             /* NEW_VALUE, in the TLB */
        lea     rax, [rip + old_page]
        or      rax, PTE_P_RW | PTE_G
        mov     [rip + pt_global], rax
        mov     cr3, r12
        invlpg  [rbx]
        movzx   eax, byte ptr [rbx]
        EXPECT  "global_invlpg", rax, OLD_VALUE

        /* A global 2 MiB page used at two of its 4 KiB pages: INVLPG of one drops the page. */
        mov     rbx, BIG
        movzx   eax, byte ptr [rbx]
        movzx   eax, byte ptr [rbx + 5 * PAGE_4K]
        mov     cr3, r12
        PT_ENTRY pd_high, 2, big_new, "PTE_P_RW | PTE_PS | PTE_G"
        invlpg  [rbx]
        movzx   eax, byte ptr [rbx + 5 * PAGE_4K]
        EXPECT  "big_invlpg", rax, NEW_VALUE

        /* Back to the pages the timed loops use. */
        lea     rax, [rip + pages]
        or      rax, PTE_P_RW | PTE_G
        mov     [rip + pt_global], rax
        and     rax, ~PTE_G
        mov     [rip + pt_local], rax
        mov     rax, cr4                        /* drop everything once more */
        and     rax, ~CR4_PGE
        mov     cr4, rax
        or      rax, CR4_PGE
        mov     cr4, rax

/* --- the cost of a CR3 load ------------------------------------------------------------ */

        .macro TIMED_ROUNDS base, access, best
        mov     \best, -1
        mov     r10d, PASSES
.Lpass\@:
        READ_TSC r8
        mov     r9d, ROUNDS
.Lround\@:
        mov     cr3, r12
        mov     rdi, \base
        mov     ecx, PAGES
.Lpage\@:
        \access
        add     rdi, PAGE_4K
        dec     ecx
        jnz     .Lpage\@
        dec     r9d
        jnz     .Lround\@
        BEST_TIME r8, \best
        dec     r10d
        jnz     .Lpass\@
        .endm

        TIMED_ROUNDS GLOBAL, "movzx eax, byte ptr [rdi]", r13
        TIMED_ROUNDS LOCAL, "movzx eax, byte ptr [rdi]", r14
        TIMED_ROUNDS LOCAL, "mov byte ptr [rdi], 1", r15
        mov     [rip + global_read], r13
        mov     [rip + local_read], r14
        mov     [rip + local_write], r15
        TIME    global_read_cycles, "qword ptr [rip + global_read]"
        TIME    local_read_cycles, "qword ptr [rip + local_read]"
        TIME    local_write_cycles, "qword ptr [rip + local_write]"

        DONE    msg_done

        .section .rodata
msg_start: .asciz "GLOBALPAGES START\n"
msg_done:  .asciz "GLOBALPAGES DONE\n"

        .section .data
        .p2align 3
global_read: .quad 0
local_read:  .quad 0
local_write: .quad 0

        .section .bss
        .p2align 12
pml4:      .fill 4096, 1, 0
pdpt:      .fill 4096, 1, 0
pd_low:    .fill 4096, 1, 0
pd_high:   .fill 4096, 1, 0
pt_global: .fill 4096, 1, 0
pt_local:  .fill 4096, 1, 0
old_page:  .fill 4096, 1, 0
new_page:  .fill 4096, 1, 0
        .fill 4096, 1, 0
stack_top:
pages:     .fill PAGES * PAGE_4K, 1, 0
        .p2align 21
big_old:   .fill PAGE_2M, 1, 0
big_new:   .fill PAGE_2M, 1, 0
