/*
 * uartflood.S - a console's worth of bytes through COM1, interleaved with the register accesses
 * that change what the UART's ports mean, all of which must keep their order and effect.
 *
 * A kernel's console writes poll the line status register (LSR) for an empty transmitter and
 * write the data register (THR), two port accesses a byte (TI PC16550D datasheet, SNLS378,
 * tables 2-4). Between floods of such bytes the guest opens the divisor latch (LCR.DLAB) and
 * writes the divisor through the same port as THR, reads it back, closes the latch, and sends
 * a byte in loopback mode (MCR.LOOP), which must come back in RBR and not reach the line.
 * Engine patch 0010 lets a vCPU answer LSR and queue THR writes itself while the UART is in
 * plain transmit mode (vmmarch_cli/posted_io.py); none of this may leak into the output or be
 * reordered. The test compares the console with the expected bytes exactly.
 *
 * The flood is timed with RDTSC: `TIME uartflood_cycles`, FLOOD bytes.
 *
 *     CHECK <name> <16 hex digits> <ok|FAIL>
 *
 * then "UARTFLOOD DONE", and the number of failed lines to the exit port 0xf4.
 */

        .intel_syntax noprefix
        .include "board.inc"  /* EXIT_PORT, COM1: the VMM's ports (examples/build.py) */
        .include "report64.inc"
        .include "timing64.inc"

        /* The UART's registers and bits come from board.inc. COM1_THR is also the receive
         * buffer (RBR) and, with LCR.DLAB, the divisor latch's low byte (DLL). */
        .set LCR_8N1, 0x03                      /* 8 data bits, no parity, 1 stop bit */
        .set DIVISOR, 0x0c                      /* 9600 baud; must never reach the line */
        .set LOOPED, 0x5a                       /* sent in loopback; must never reach it */
        .set FLOOD, 20000                       /* bytes of the timed flood */
        .set LINE, 64                           /* the flood's line length, newline included */

        .section .text.entry, "ax", @progbits
        .globl  _start
_start:
        BEGIN   stack_top, msg_start

        /* The timed flood: LINE-1 letters and a newline, FLOOD bytes, each after polling LSR
         * as a kernel's serial console does. */
        READ_TSC r12
        xor     ebx, ebx                        /* bytes sent */
1:      mov     eax, ebx
        xor     edx, edx
        mov     ecx, LINE
        div     ecx                             /* edx = the column */
        mov     al, '\n'
        cmp     edx, LINE - 1
        je      2f
        mov     eax, edx
        and     eax, 0x0f
        add     al, 'a'
2:      call    polled_putc
        inc     ebx
        cmp     ebx, FLOOD
        jne     1b
        READ_TSC r13
        sub     r13, r12
        mov     [rip + flood_cycles], r13

        /* The divisor latch: its low byte is the THR port's other meaning. */
        mov     dx, COM1_LCR
        mov     al, LCR_8N1 | LCR_DLAB
        out     dx, al
        mov     dx, COM1_THR
        mov     al, DIVISOR
        out     dx, al
        mov     dx, COM1_DLM
        xor     eax, eax
        out     dx, al
        mov     dx, COM1_THR
        in      al, dx
        movzx   eax, al
        mov     [rip + divisor_read], rax
        mov     dx, COM1_LCR
        mov     al, LCR_8N1
        out     dx, al
        lea     rsi, [rip + msg_after_latch]
        call    polled_puts

        /* Loopback: the byte comes back in RBR, with LSR.DR, and never reaches the line. */
        mov     dx, COM1_MCR
        mov     al, MCR_OUT2 | MCR_LOOP
        out     dx, al
        mov     al, LOOPED
        call    polled_putc
        mov     dx, COM1_LSR
        in      al, dx
        and     eax, LSR_DR
        mov     [rip + looped_ready], rax
        mov     dx, COM1_THR
        in      al, dx
        movzx   eax, al
        mov     [rip + looped_back], rax
        mov     dx, COM1_MCR
        mov     al, MCR_OUT2
        out     dx, al
        lea     rsi, [rip + msg_after_loop]
        call    polled_puts

        TIME    uartflood_cycles, "qword ptr [rip + flood_cycles]"
        EXPECT  "divisor_read", "qword ptr [rip + divisor_read]", DIVISOR
        EXPECT  "looped_ready", "qword ptr [rip + looped_ready]", LSR_DR
        EXPECT  "looped_back", "qword ptr [rip + looped_back]", LOOPED
        DONE    msg_done

/* AL to COM1 once LSR says the transmitter holding register is empty. */
polled_putc:
        push    rax
        mov     dx, COM1_LSR
4:      in      al, dx
        test    al, LSR_THRE
        jz      4b
        pop     rax
        mov     dx, COM1_THR
        out     dx, al
        ret

/* The NUL-terminated string at RSI, each byte through polled_putc. */
polled_puts:
5:      mov     al, [rsi]
        test    al, al
        jz      6f
        call    polled_putc
        inc     rsi
        jmp     5b
6:      ret

        .section .rodata
msg_start:       .asciz "UARTFLOOD START\n"
msg_after_latch: .asciz "after the latch\n"
msg_after_loop:  .asciz "after the loop\n"
msg_done:        .asciz "UARTFLOOD DONE\n"

        .section .data
        .p2align 3
flood_cycles: .quad 0
divisor_read: .quad 0
looped_ready: .quad 0
looped_back:  .quad 0

        .section .bss
        .p2align 12
        .fill 4096, 1, 0
stack_top:
