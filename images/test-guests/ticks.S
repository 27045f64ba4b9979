# ticks: the PIT drives IRQ0 at 100 Hz through the 8259A; the guest halts between ticks.
#
# Serial output (exact bytes), about 1 s of guest time:
#     tick 10\n
#     tick 20\n
#     ...
#     tick 100\n
# (ten lines, n = 10, 20, ..., 100). Exit: status 0 through port 0x501.
#
# Devices: PIC (master remapped to 0x20, only IRQ0 unmasked), PIT channel 0 mode 2 at 100 Hz
# (divisor 11932), COM1 output. The IRQ0 handler (vector 0x20) increments a counter and EOIs.
# The main loop is `cli; check; sti; hlt`: a line is printed as soon as the counter reaches the
# next multiple of 10 (if several ticks passed while printing, none is skipped or repeated).
# CPL0 work: ~10 instructions + 2 port writes per tick, ~250 instructions + ~20 port accesses
# per line.

.include "defs.inc"

.equ HZ, 100
.equ EVERY, 10
.ifdef TICKS_LONG
.equ LAST, 1000                 # ticks-long.elf: ten seconds, for attaching a backup to it
.else
.ifdef TICKS_MINUTE
.equ LAST, 6000                 # ticks-minute.elf: a minute, for switching a pair back and forth
.else
.equ LAST, 100
.endif
.endif

.text
.globl main
main:
        mov     $HZ, %edi
        call    timer_start             # IRQ0 counts timer_ticks
        mov     $EVERY, %ebx            # next tick count to print
1:      cli
        mov     timer_ticks(%rip), %rax
        cmp     %rbx, %rax
        jae     2f
        sti
        hlt                             # sti; hlt: no lost wake-up
        jmp     1b
2:      sti
        lea     msg_tick(%rip), %rdi
        call    print_str
        mov     %rbx, %rdi
        call    print_dec
        mov     $'\n', %edi
        call    putc
        add     $EVERY, %ebx
        cmp     $LAST, %ebx
        jbe     1b
        cli
        xor     %edi, %edi
        call    exit


.section .rodata
msg_tick: .asciz "tick "

