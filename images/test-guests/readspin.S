# readspin: a port read and an MMIO read, then a stretch of CPL0 code without exits, again and
# again, while the PIT ticks at 100 Hz. A regression guest for record/replay: the recorder's
# checkpoints (taken when a kick finds a tick due) mostly follow the MMIO read, whose completion
# KVM would otherwise perform again over the restored registers (vmm/src/vm.rs, Vm::restore).
# (A port read is safe there: KVM checks RIP before completing it. Measured with this guest.)
#
# Serial output (exact bytes):
#     readspin sum=<hex> ticks=<n>\n
# `sum` adds up every value read from port 0x61 (the PIT's port B: its refresh bit toggles with
# virtual time, so the sum depends on when each read happened, and replay must reproduce it)
# and from the unclaimed MMIO address 0xd0002000 (all ones); `ticks` counts IRQ0s. Both depend
# on timing; a replay must print the same.
# Exit: status 0 through port 0x501.
# CPL0 cost: ROUNDS x (1 IN + ~SPIN_LOOPS x 2 instructions): ~2 s at this machine's 1.3 M
# emulated instructions per second.

.include "defs.inc"

.equ HZ, 100
.equ ROUNDS, 200
.equ SPIN_LOOPS, 5000
.equ MMIO_ADDR, 0xd0002000

.text
.globl main
main:
        mov     $HZ, %edi
        call    timer_start             # IRQ0 counts timer_ticks
        sti
        xor     %ebx, %ebx              # sum
        mov     $ROUNDS, %r12d
1:      xor     %eax, %eax
        in      $0x61, %al              # a port read exit ...
        add     %rax, %rbx
        mov     $MMIO_ADDR, %rsi
        mov     (%rsi), %eax            # ... an MMIO read exit ...
        add     %rax, %rbx
        mov     $SPIN_LOOPS, %ecx       # ... then no exit for a while: ticks come at kicks
2:      dec     %ecx
        jnz     2b
        dec     %r12d
        jnz     1b
        cli
        lea     msg_sum(%rip), %rdi
        call    print_str
        mov     %rbx, %rdi
        call    print_hex
        lea     msg_ticks(%rip), %rdi
        call    print_str
        mov     timer_ticks(%rip), %rdi
        call    print_dec
        mov     $'\n', %edi
        call    putc
        xor     %edi, %edi
        call    exit


.section .rodata
msg_sum:   .asciz "readspin sum="
msg_ticks: .asciz " ticks="

