# pio: a benchmark guest: 100000 port writes to an unclaimed port, as fast as the guest can.
#
# Serial output (exact bytes):
#     pio done\n
# Exit: status 0 through port 0x501.
# Devices: port 0x80 (claimed by nothing: the VMM ignores writes), COM1 output.
# Used by scripts/bench to measure synchronous exits per second: each loop iteration is one
# OUT (one exit) plus two instructions at CPL0.

.include "defs.inc"

.equ PIO_COUNT, 100000

.text
.globl main
main:
        mov     $PIO_COUNT, %ecx
1:      outb    %al, $0x80
        dec     %ecx
        jnz     1b
        lea     msg(%rip), %rdi
        call    print_str
        xor     %edi, %edi
        call    exit

.section .rodata
msg:    .asciz "pio done\n"
