/*
 * resume.S - a guest that must not notice being saved to a snapshot and restored later.
 *
 * It reads the TSC, fills a page with a pattern, starts its local APIC timer (periodic, SDM
 * 10.5.4) and prints "RESUME READY" after a few ticks: the point where a test takes a snapshot
 * (`vmm-arch boot --expect 'RESUME READY' --snapshot FILE`). It then waits for AFTER_TICKS more
 * ticks, which a restored guest only gets if its timer came back armed, printing "RESUME HALF"
 * half-way (where a resumed run can be saved again), and checks:
 *
 *   tsc_continues   the TSC advanced by less than 2^33 (~3 s at a few GHz) from start to end:
 *                   a restore seconds later must not show the guest the time it was stopped;
 *   memory_kept     the pattern is still there;
 *   timer_ticks     every tick was taken, in service (ISR) when its handler ran.
 *
 * One line per fact on COM1 (CHECK <name> <16 hex digits> <ok|FAIL>), then the number of
 * failed lines to the exit port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "x86.inc"
        .include "report64.inc"
        .include "gdt64.inc"
        .include "apic.inc"

        .set PERIOD, 10000                  /* timer counts: 10 ms at the emulate backend's 1 MHz */
        .set BEFORE_TICKS, 2
        .set AFTER_TICKS, 50
        .set TSC_SHIFT, 33                  /* tsc_continues: the elapsed TSC >> 33 is 0 */
        .set PATTERN_WORDS, 512
        .set GOLDEN, 0x9e3779b97f4a7c15     /* 2^64 / phi: a pattern with every bit in use */
        .set KERNEL_CS, BOOT_CS             /* the VMM's boot GDT */

        .include "idt64.inc"  /* after KERNEL_CS: it stores the selector */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start
        SET_GATE TIMER_VECTOR, timer_handler
        lidt    [rip + idtr]
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        mov     [rip + tsc_start], rax
        call    fill_pattern

        START_TIMER rbx
        mov     dword ptr [rbx + APIC_TIMER_INITIAL], PERIOD
        mov     rdi, BEFORE_TICKS
        call    wait_ticks
        lea     rsi, [rip + msg_ready]
        call    puts
        mov     rdi, BEFORE_TICKS + AFTER_TICKS / 2
        call    wait_ticks
        lea     rsi, [rip + msg_half]
        call    puts
        mov     rdi, BEFORE_TICKS + AFTER_TICKS
        call    wait_ticks
        mov     dword ptr [rbx + APIC_LVT_TIMER], LVT_MASKED | LVT_PERIODIC | TIMER_VECTOR

        rdtsc
        shl     rdx, 32
        or      rax, rdx
        sub     rax, [rip + tsc_start]
        shr     rax, TSC_SHIFT
        mov     [rip + tsc_elapsed_high], rax
        EXPECT  "tsc_continues", "qword ptr [rip + tsc_elapsed_high]", 0
        call    count_pattern_misses
        mov     [rip + misses], rax
        EXPECT  "memory_kept", "qword ptr [rip + misses]", 0
        mov     rax, [rip + ticks]
        sub     rax, [rip + in_service]
        mov     [rip + ticks_not_in_service], rax
        EXPECT  "timer_ticks", "qword ptr [rip + ticks_not_in_service]", 0

        DONE    msg_done

/* Wait with `sti; hlt` until RDI ticks have been taken. */
wait_ticks:
1:      sti
        hlt
        cli
        cmp     [rip + ticks], rdi
        jb      1b
        ret

/* pattern[i] = i * GOLDEN */
fill_pattern:
        lea     rdi, [rip + pattern]
        xor     ecx, ecx
        mov     rdx, GOLDEN
1:      mov     rax, rcx
        imul    rax, rdx
        mov     [rdi + rcx * 8], rax
        inc     rcx
        cmp     rcx, PATTERN_WORDS
        jb      1b
        ret

/* RAX = the words of the pattern that changed */
count_pattern_misses:
        lea     rdi, [rip + pattern]
        xor     ecx, ecx
        xor     esi, esi
        mov     rdx, GOLDEN
1:      mov     rax, rcx
        imul    rax, rdx
        cmp     [rdi + rcx * 8], rax
        je      2f
        inc     rsi
2:      inc     rcx
        cmp     rcx, PATTERN_WORDS
        jb      1b
        mov     rax, rsi
        ret

/* The timer: count, note whether its vector is in service (ISR bit), EOI. */
timer_handler:
        push    rax
        push    rbx
        COUNT_TICK ticks, in_service
        pop     rbx
        pop     rax
        iretq

        .section .rodata
msg_start: .asciz "RESUME START\n"
msg_ready: .asciz "RESUME READY\n"
msg_half:  .asciz "RESUME HALF\n"
msg_done:  .asciz "RESUME DONE\n"

        .section .data
        .p2align 4
idtr:   .word IDT64_SIZE - 1
        .quad idt
tsc_start:            .quad 0
tsc_elapsed_high:     .quad 0
misses:               .quad 0
ticks:                .quad 0
in_service:           .quad 0
ticks_not_in_service: .quad 0

        .section .bss
        .p2align 12
idt:    .fill IDT64_SIZE, 1, 0
pattern: .fill PATTERN_WORDS * 8, 1, 0
        .fill 4096, 1, 0
stack_top:
