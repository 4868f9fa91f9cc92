/*
 * usersyscall.S - can a user process reach the kernel on this hypervisor?
 *
 * The guest enters ring 3 with iretq and makes one SYSCALL (Intel SDM vol. 2B, SYSCALL: CS
 * and SS come from IA32_STAR[47:32], CPL becomes 0, RIP = IA32_LSTAR). The entry at LSTAR
 * records the CS it runs with and executes ud2; the #UD handler, reached through the IDT
 * (which switches to ring 0 via the TSS's RSP0 on every hypervisor measured), prints
 *
 *     SYSCALL_CS <16 hex digits> <ok|FAIL>
 *
 * and writes the status to the exit port 0xf4: 0 when SYSCALL ran the entry with the kernel
 * CS (0x08 here), 1 when it did not. On hardware KVM and in an emulator the answer is 0. On
 * a KVM that emulates guest ring 0 for guests not written for it (kvm_pvm), the entry runs
 * with CS=0x33, SS=0x2b and CPL 3, so a stock kernel's first system call faults: see
 * docs/limited-kvm.md.
 *
 * GDT (Linux's order, SDM 3.4.5): 0x08 kernel code64, 0x10 kernel data, 0x18 user code32,
 * 0x20 user data, 0x28 user code64, 0x30 a 64-bit TSS. STAR = 0x0018_0008 << 32, so SYSRET
 * would load CS 0x28|3 and SS 0x20|3 (SDM vol. 2B, SYSRET).
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "gdt64.inc"
        .include "paging64.inc"

        GDT_RING3                           /* KERNEL_CS .. TSS_SEL; gdt, gdtr in .data */

        .include "ring3.inc"
        .include "idt64.inc"  /* after KERNEL_CS: it stores the selector */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        cli
        lea     rsp, [rip + kstack_top]
        /* Ring 3 needs the U bit at every level for the 2 MiB page holding this guest (the
         * VMM's identity map leaves it clear): PML4[0], PDPT[0], PD[8] (SDM vol. 3A 4.6). */
        USER_PAGE
        /* The TSS descriptor's base, and RSP0 for ring-3 -> ring-0 interrupts (SDM 7.7). */
        TSS_BASE
        TSS_STACK TSS_RSP0, kstack_top
        /* One interrupt gate, #UD. */
        SET_GATE VECTOR_UD, ud_handler
        lidt    [rip + idtr]
        LOAD_GDT
        mov     ecx, MSR_STAR
        xor     eax, eax
        mov     edx, STAR_SELECTORS
        wrmsr
        mov     ecx, MSR_LSTAR
        lea     rax, [rip + syscall_entry]
        mov     rdx, rax
        shr     rdx, 32
        wrmsr
        mov     ecx, MSR_FMASK
        mov     eax, 0x47700                /* TF, DF, IF, IOPL, AC cleared on entry */
        xor     edx, edx
        wrmsr
        mov     ecx, MSR_EFER
        rdmsr
        or      eax, EFER_SCE
        wrmsr
        TO_USER USER_CS, user_code, RFLAGS_1    /* IRETQ to ring 3, interrupts off */

user_code:
        mov     eax, 39                     /* any number: the entry does not look at it */
        syscall
        jmp     .                           /* never reached: the entry ends in ud2 */

syscall_entry:
        mov     ax, cs
        mov     word ptr [rip + entry_cs], ax
        ud2                                 /* into the kernel through the IDT, either way */

ud_handler:
        lea     rsi, [rip + msg]
        call    puts
        movzx   rax, word ptr [rip + entry_cs]
        call    puthex
        xor     ebx, ebx
        cmp     word ptr [rip + entry_cs], KERNEL_CS
        je      2f
        mov     ebx, 1
2:      lea     rsi, [rip + msg_ok]
        test    ebx, ebx
        jz      3f
        lea     rsi, [rip + msg_fail]
3:      call    puts
        mov     eax, ebx
        EXIT_PARK

        .section .rodata
msg:      .asciz "SYSCALL_CS "
msg_ok:   .asciz " ok\n"
msg_fail: .asciz " FAIL\n"

        .section .data                      /* on from GDT_RING3's gdtr */
idtr:   .word IDT64_SIZE - 1
        .quad idt
entry_cs: .quad 0
        .p2align 4
tss:    .fill TSS64_SIZE, 1, 0

        .section .bss
        .p2align 12
idt:    .fill IDT64_SIZE, 1, 0
        .fill 4096, 1, 0
kstack_top:
        .fill 4096, 1, 0
ustack_top:
