# serial.S: COM1 (16550A at 0x3f8) output and input by polling, plus number formatting.
#
# Output is byte-exact: no "\n" -> "\r\n" translation. Every byte costs two or more port
# accesses (LSR poll, THR write), i.e. VM exits.
#
#   serial_init          115200 8N1, FCR = 0 (no FIFO; keeps bytes received before it),
#                        MCR = DTR|RTS|OUT2, IER = 0
#   putc(dil)            wait for LSR.THRE, write THR
#   print_str(rdi)       NUL-terminated string
#   print_dec(rdi)       unsigned decimal, no padding
#   print_hex(rdi)       16 lowercase hex digits, no prefix
#   print_hex_n(rdi, rsi) the low rsi (1..16) hex digits of rdi, lowercase, no prefix
#   serial_getc_poll     wait for LSR.DR, return the byte in al (busy-waits: see echo.S for IRQ4)
#   serial_rx_ready      rax = 1 if LSR.DR, else 0

.include "defs.inc"

.text
.globl serial_init
serial_init:
        push    %rdx
        push    %rax
        mov     $UART_IER, %dx
        xor     %al, %al
        out     %al, %dx                # no UART interrupts
        mov     $UART_LCR, %dx
        mov     $0x80, %al              # DLAB
        out     %al, %dx
        mov     $UART_THR, %dx
        mov     $1, %al                 # divisor 1: 115200 baud
        out     %al, %dx
        mov     $UART_IER, %dx
        xor     %al, %al
        out     %al, %dx
        mov     $UART_LCR, %dx
        mov     $0x03, %al              # 8N1, DLAB off
        out     %al, %dx
        mov     $UART_FCR, %dx
        xor     %al, %al                # FIFO off (16450 mode): enabling or resetting the FIFO
        out     %al, %dx                # would drop input that arrived before serial_init
        mov     $UART_MCR, %dx
        mov     $0x0b, %al              # DTR, RTS, OUT2 (OUT2 gates the IRQ line on a PC)
        out     %al, %dx
        pop     %rax
        pop     %rdx
        ret

.globl putc
putc:
        push    %rdx
        mov     $UART_LSR, %dx
1:      in      %dx, %al
        test    $LSR_THRE, %al
        jz      1b
        mov     $UART_THR, %dx
        mov     %dil, %al
        out     %al, %dx
        pop     %rdx
        ret

.globl print_str
print_str:
        push    %rdi
        push    %rsi
        mov     %rdi, %rsi
1:      movzbl  (%rsi), %edi
        test    %edi, %edi
        jz      2f
        call    putc
        inc     %rsi
        jmp     1b
2:      pop     %rsi
        pop     %rdi
        ret

.globl print_dec
print_dec:
        push    %rdi
        push    %rcx
        push    %rdx
        sub     $32, %rsp
        lea     31(%rsp), %rcx
        movb    $0, (%rcx)
        mov     %rdi, %rax
1:      xor     %edx, %edx
        mov     $10, %edi
        div     %rdi
        add     $'0', %dl
        dec     %rcx
        mov     %dl, (%rcx)
        test    %rax, %rax
        jnz     1b
        mov     %rcx, %rdi
        call    print_str
        add     $32, %rsp
        pop     %rdx
        pop     %rcx
        pop     %rdi
        ret

.globl print_hex
print_hex:
        push    %rsi
        mov     $16, %esi
        call    print_hex_n
        pop     %rsi
        ret

.globl print_hex_n
print_hex_n:
        push    %rdi
        push    %rcx
        push    %rdx
        mov     %rdi, %rdx
        lea     (,%rsi,4), %ecx         # shift of the first digit: 4 * (n - 1)
        sub     $4, %ecx
1:      mov     %rdx, %rax
        shr     %cl, %rax
        and     $0xf, %eax
        lea     hexdigits(%rip), %rdi
        movzbl  (%rdi,%rax), %edi
        call    putc
        sub     $4, %ecx
        jns     1b
        pop     %rdx
        pop     %rcx
        pop     %rdi
        ret

.globl serial_rx_ready
serial_rx_ready:
        push    %rdx
        mov     $UART_LSR, %dx
        in      %dx, %al
        and     $LSR_DR, %eax
        pop     %rdx
        ret

.globl serial_getc_poll
serial_getc_poll:
        push    %rdx
        mov     $UART_LSR, %dx
1:      in      %dx, %al
        test    $LSR_DR, %al
        jz      1b
        mov     $UART_RBR, %dx
        in      %dx, %al
        movzbl  %al, %eax
        pop     %rdx
        ret

.section .rodata
hexdigits: .ascii "0123456789abcdef"
