# echo: serial input through IRQ4, echoed in upper case.
#
# For every byte received on COM1: 'q' ends the run; a byte 'a'..'z' is echoed as 'A'..'Z';
# every other byte (including '\r', '\n', 'Q') is echoed unchanged. On 'q' (which is not
# echoed) the guest prints "\nbye\n" and exits with status 0 through port 0x501. Bytes after
# the 'q' are ignored.
#
# Serial output (exact bytes) for the input "Hello, world\rq":
#     HELLO, WORLD\r\nbye\n
#
# Devices: COM1 with IER = 0x01 (received-data interrupt), PIC with only IRQ4 unmasked
# (vector 0x24). The IRQ4 handler drains the receiver (reads RBR while LSR.DR) into a 256-byte
# ring and EOIs; the main loop takes bytes from the ring with interrupts off and waits with
# `sti; hlt` when it is empty, so the guest never busy-waits at CPL0 for input. If more than
# 255 bytes arrive before the main loop takes them, the extra bytes are dropped.

.include "defs.inc"

.text
.globl main
main:
        mov     $(IRQ_BASE + 4), %edi
        lea     irq4(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        mov     $0x0010, %edi           # IRQ4 only
        call    pic_init
        mov     $UART_IER, %dx
        mov     $0x01, %al              # received data available
        out     %al, %dx
        call    drain_rx                # anything that arrived before IER was set
1:      cli
        mov     rx_tail(%rip), %eax
        cmp     rx_head(%rip), %eax
        jne     2f
        sti
        hlt                             # sti; hlt: the IRQ cannot slip in between
        jmp     1b
2:      lea     rx_ring(%rip), %rcx
        movzbl  (%rcx,%rax), %edi
        inc     %al
        mov     %eax, rx_tail(%rip)
        sti
        cmp     $'q', %dil
        je      3f
        cmp     $'a', %dil
        jb      4f
        cmp     $'z', %dil
        ja      4f
        sub     $('a' - 'A'), %dil
4:      call    putc
        jmp     1b
3:      cli
        lea     msg_bye(%rip), %rdi
        call    print_str
        xor     %edi, %edi
        call    exit

irq4:
        push    %rax
        call    drain_rx
        mov     $PIC_EOI, %al
        out     %al, $PIC1_CMD
        pop     %rax
        iretq

# drain_rx: move every received byte into the ring (interrupts off)
drain_rx:
        push    %rdx
        push    %rcx
        push    %rax
1:      mov     $UART_LSR, %dx
        in      %dx, %al
        test    $LSR_DR, %al
        jz      2f
        mov     $UART_RBR, %dx
        in      %dx, %al
        mov     rx_head(%rip), %ecx
        lea     1(%ecx), %edx
        movzbl  %dl, %edx
        cmp     rx_tail(%rip), %edx
        je      1b                      # ring full: drop the byte
        push    %rdi
        lea     rx_ring(%rip), %rdi
        mov     %al, (%rdi,%rcx)
        pop     %rdi
        mov     %edx, rx_head(%rip)
        jmp     1b
2:      pop     %rax
        pop     %rcx
        pop     %rdx
        ret

.section .rodata
msg_bye: .asciz "\nbye\n"

.bss
.balign 8
rx_head: .long 0                        # next slot the IRQ handler fills (0..255)
rx_tail: .long 0                        # next slot main takes (0..255)
rx_ring: .fill 256, 1, 0
