/*
 * archcaps.S - IA32_ARCH_CAPABILITIES, the MSR through which a CPU says which
 * speculative-execution attacks it is not affected by.
 *
 * Linux reads it at boot when CPUID.(EAX=07H,ECX=0):EDX[29] says it exists (SDM vol. 2A, CPUID,
 * table 3-8) and turns a mitigation off for each "_NO" bit set (SDM vol. 4, table 2-2): without
 * RDCL_NO it isolates page tables (a CR3 switch on every kernel entry and exit), without MDS_NO
 * it clears CPU buffers on every exit to user mode, without ITS_NO it sends every `ret` through
 * a thunk. The emulate backend's CPU executes nothing speculatively, and says so (patch 0014);
 * the unicorn wheel reads every MSR it does not know as zero, so its backend does not offer the
 * MSR, and both checks FAIL there.
 *
 * One line per fact on COM1 ("CHECK <name> <16 hex digits> <ok|FAIL>") and the number of failed
 * lines to the exit port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"

        .set CPUID_LEAF_FEATURES7, 0x7
        .set ARCH_CAPABILITIES_BIT, 29      /* CPUID.(07H,0):EDX */
        .set MSR_IA32_ARCH_CAPABILITIES, 0x10a
        /* The bits Linux's most costly mitigations on a translating CPU depend on. */
        .set ARCH_CAP_RDCL_NO, 1 << 0
        .set ARCH_CAP_MDS_NO, 1 << 5
        .set ARCH_CAP_ITS_NO, 1 << 62
        .set NOT_AFFECTED, ARCH_CAP_RDCL_NO | ARCH_CAP_MDS_NO | ARCH_CAP_ITS_NO

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start
        mov     eax, CPUID_LEAF_FEATURES7
        xor     ecx, ecx
        cpuid
        shr     edx, ARCH_CAPABILITIES_BIT
        and     edx, 1
        mov     [rip + reported], rdx
        EXPECT  "cpuid_reports_msr", "qword ptr [rip + reported]", 1

        mov     ecx, MSR_IA32_ARCH_CAPABILITIES
        rdmsr
        shl     rdx, 32
        or      rax, rdx
        movabs  rdx, NOT_AFFECTED
        and     rax, rdx
        mov     [rip + capabilities], rax
        EXPECT  "not_affected", "qword ptr [rip + capabilities]", NOT_AFFECTED

        DONE    msg_done

        .section .rodata
msg_start: .asciz "ARCHCAPS START\n"
msg_done:  .asciz "ARCHCAPS DONE\n"

        .section .data
reported:     .quad 0
capabilities: .quad 0

        .section .bss
        .balign 16
        .skip   4096
stack_top:
