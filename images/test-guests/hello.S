# hello: the smallest guest.
#
# Serial output (exact bytes):
#     hello from ftvmm\n
# Exit: status 0 through port 0x501.
# Devices: COM1 output only. No interrupts. ~600 instructions at CPL0 after the runtime.

.include "defs.inc"

.text
.globl main
main:
        lea     msg(%rip), %rdi
        call    print_str
        xor     %edi, %edi
        call    exit

.section .rodata
msg:    .asciz "hello from ftvmm\n"
