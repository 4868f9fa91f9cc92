/*
 * irq32.S - local APIC timer interrupts taken in 32-bit protected mode.
 *
 * The guest leaves long mode from its 64-bit entry (Intel SDM vol. 3A 9.8.5.4: compatibility
 * mode, paging off, IA32_EFER.LME off) and runs on with paging off, a 32-bit IDT of 8-byte
 * gates (SDM 6.11) and the xAPIC as apictimer.S programs it (SVR, SDM 10.4.7.1; periodic timer,
 * 10.5.4). It waits in `sti; hlt` for TICKS timer interrupts; the handler counts, checks that
 * the timer's vector is in service (ISR, 10.8.4), notes the frame (EIP, CS, EFLAGS: no privilege
 * change, so no SS:ESP, SDM 6.12.1) and writes EOI. Then it masks the timer and checks that no
 * more come and that nothing is left in service. Every other vector from 0x20 up has a gate to
 * a handler that counts strays.
 *
 * The unicorn wheel's backend injects interrupts from Python between bursts, in 64-bit mode
 * only: it stops at the first tick ("external interrupts are delivered in 64-bit mode only",
 * status 70). The engine (patch 0006) takes its INTR line in the CPU loop in any mode.
 *
 * One line per fact on COM1 ("CHECK <name> <16 hex digits> <ok|FAIL>"), "IRQ32 DONE", and the
 * number of failed lines to the exit port 0xf4.
 *
 * GDT: 0x08 code64, 0x10 flat data, 0x18 code32 (L=0, D=1).
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "report32.inc"
        .include "gdt64.inc"
        .include "leave64.inc"
        .include "apic.inc"

        GDT_CODE32                          /* KERNEL_CS, KERNEL_DS, CODE32; gdt, gdtr */
        .include "idt32.inc"  /* after CODE32: it stores the selector */

        .set TICKS, 5
        .set FIRST_EXTERNAL, 0x20               /* 0-31 are exceptions (SDM 6.2) */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start
        lgdt    [rip + gdtr]
        RELOAD_CS KERNEL_CS
        LEAVE_LONG_MODE CODE32, KERNEL_DS

        /* A stray gate for every external vector, then the timer's own. */
        mov     edi, FIRST_EXTERNAL
2:      mov     esi, offset stray_handler
        call    set_gate32
        inc     edi
        cmp     edi, 256
        jb      2b
        mov     edi, TIMER_VECTOR
        mov     esi, offset timer_handler
        call    set_gate32
        lidt    [idtr32]

        START_TIMER ebx                     /* as apictimer.S */
3:      sti
        hlt
after_hlt:
        cli
        cmp     dword ptr [ticks], TICKS
        jb      3b
        EXPECT32 "timer_ticks", "dword ptr [ticks]", TICKS
        EXPECT32 "timer_in_service", "dword ptr [in_service]", TICKS
        EXPECT32 "timer_frame_eip", "dword ptr [frame_eip]", after_hlt
        EXPECT32 "timer_frame_cs", "dword ptr [frame_cs]", CODE32
        EXPECT32 "timer_frame_if", "dword ptr [frame_if]", RFLAGS_IF
        EXPECT32 "timer_handler_if", "dword ptr [handler_if]", 0
        EXPECT32 "cr0_paging_off", "dword ptr [seen_cr0_pg]", 0

        /* Masked: no tick while interrupts are open for a while. A tick requested before the
         * mask may still be taken (masking does not clear IRR): drain first, then count. */
        mov     dword ptr [ebx + APIC_LVT_TIMER], LVT_MASKED | LVT_PERIODIC | TIMER_VECTOR
        call    spin_with_interrupts
        mov     eax, [ticks]
        mov     [ticks_at_mask], eax
        call    spin_with_interrupts
        mov     eax, [ticks]
        sub     eax, [ticks_at_mask]
        EXPECT32 "masked_ticks", eax, 0
        mov     eax, dword ptr [ebx + TIMER_ISR]
        and     eax, 1 << TIMER_ISR_BIT
        EXPECT32 "isr_clear_after_eoi", eax, 0
        EXPECT32 "stray_interrupts", "dword ptr [strays]", 0

        DONE32  msg_done

/* Interrupts open for a while, then closed again. */
spin_with_interrupts:
        IRQ_WINDOW
        ret

/* The timer: count, note whether its vector is in service (ISR bit) and the frame, EOI.
 * Stack after the two pushes: EBX, EAX, then the CPU's EIP, CS, EFLAGS. */
timer_handler:
        push    eax
        push    ebx
        inc     dword ptr [ticks]
        mov     ebx, APIC
        mov     eax, dword ptr [ebx + TIMER_ISR]
        bt      eax, TIMER_ISR_BIT
        jnc     6f
        inc     dword ptr [in_service]
6:      mov     eax, [esp + 8]
        mov     [frame_eip], eax
        mov     eax, [esp + 12]
        mov     [frame_cs], eax
        mov     eax, [esp + 16]
        and     eax, RFLAGS_IF
        mov     [frame_if], eax
        pushfd
        pop     eax
        and     eax, RFLAGS_IF
        mov     [handler_if], eax
        mov     eax, cr0
        and     eax, CR0_PG
        mov     [seen_cr0_pg], eax
        mov     dword ptr [ebx + APIC_EOI], 0
        pop     ebx
        pop     eax
        iretd

stray_handler:
        push    ebx
        inc     dword ptr [strays]
        mov     ebx, APIC
        mov     dword ptr [ebx + APIC_EOI], 0
        pop     ebx
        iretd
        .code64

        .section .rodata
msg_start: .asciz "IRQ32 START\n"
msg_done:  .asciz "IRQ32 DONE\n"

        .section .data                      /* on from GDT_CODE32's gdtr */
idtr32: .word IDT32_SIZE - 1
        .long idt32
ticks:         .long 0
in_service:    .long 0
frame_eip:     .long 0
frame_cs:      .long 0
frame_if:      .long 0
handler_if:    .long -1
seen_cr0_pg:   .long -1
ticks_at_mask: .long 0
strays:        .long 0

        .section .bss
        .p2align 12
idt32:  .fill IDT32_SIZE, 1, 0
        .p2align 12
        .fill 4096, 1, 0
stack_top:
