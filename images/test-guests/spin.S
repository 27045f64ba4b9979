# spin: a long pure-integer computation at CPL3 while the PIT interrupts it at 100 Hz.
#
# Serial output (exact bytes except <n>):
#     spin checksum=7c050136522e90c6 ticks=<n>\n
# <n> (decimal) is the number of timer ticks that arrived during the run: it depends on wall
# time (about 1 s natively, so roughly 70-120). The checksum is deterministic.
# Exit: status 0 through port 0x501.
#
# What it does:
#  - kernel (CPL0): own page tables (lib/paging.S: the .user.* pages are U/S=1), the runtime's
#    counting IRQ0 handler (timer_start in lib/hw.S: 6 instructions + 1 port write), a #UD
#    handler (the "done" call, see below), PIC (only IRQ0 unmasked),
#    PIT 100 Hz mode 2, TSS.RSP0 = istack; then iretq to CPL3 (CS 0x2b, SS 0x23,
#    RFLAGS 0x202: IF=1, IOPL=0) at user_spin on a user stack.
#  - user (CPL3): SPIN_ITERS iterations of xorshift64 (x ^= x<<13; x ^= x>>7; x ^= x<<17)
#    from x = 0x9e3779b97f4a7c15, summing every x (mod 2^64) into the checksum: 12 plain
#    integer instructions per iteration (4.8 G instructions for 400 M iterations, ~0.75 s
#    on this machine's CPU), no memory access, no exits. Then the "done" call with
#    rax = checksum.
#  - the done call is `ud2` at the label user_done: the kernel's #UD handler accepts it only
#    from CS 0x2b with RIP == user_done (any other #UD is fatal: "unexpected vector=6 ...",
#    status 0x16). Not `int $0x80`: on this machine's KVM (kvm_pvm) every `INT n` executed at
#    CPL3 raises #UD instead of going through the DPL3 gate (measured), and this guest must
#    run unmodified under QEMU here. The handler masks the PIC, prints the line and exits 0.
# Reference for the checksum (C): x = 0x9e3779b97f4a7c15, s = 0; repeat SPIN_ITERS times
# { x ^= x << 13; x ^= x >> 7; x ^= x << 17; s += x; } -> s. For SPIN_ITERS = 1000 it is
# 1ddad57e22766fc0, for 100000000 1bc0bc52acde89e3.

.include "defs.inc"

.ifdef SPIN_LONG
.equ SPIN_ITERS, 2000000000     # spin-long.elf: ~5x longer, for attaching a backup to it
.else
.equ SPIN_ITERS, 400000000      # tune here; checksum above is for 400000000
.endif
.equ SPIN_SEED,  0x9e3779b97f4a7c15

.text
.globl main
main:
        call    paging_init_user
        mov     $6, %edi                # #UD: the done call
        lea     sys_done(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        lea     istack_top(%rip), %rdi
        call    tss_set_rsp0
        mov     $100, %edi
        call    timer_start             # IRQ0 counts timer_ticks
        lea     user_spin(%rip), %rdi
        lea     ustack_top(%rip), %rsi
        mov     $0x202, %edx            # IF=1, IOPL=0
        call    enter_user

# #UD; from user_done: rax = checksum
sys_done:
        lea     user_done(%rip), %rbx
        cmp     %rbx, 0(%rsp)           # RIP
        jne     1f
        cmpq    $USER_CS, 8(%rsp)       # CS
        je      2f
1:      pushq   $0                      # anything else: fatal (same frame as the stub)
        pushq   $6
        jmp     fatal_vector
2:      mov     %rax, %rbx
        mov     $0xff, %al              # mask every IRQ: the count is final
        out     %al, $PIC1_DATA
        mov     timer_ticks(%rip), %r12
        lea     msg1(%rip), %rdi
        call    print_str
        mov     %rbx, %rdi
        call    print_hex
        lea     msg2(%rip), %rdi
        call    print_str
        mov     %r12, %rdi
        call    print_dec
        mov     $'\n', %edi
        call    putc
        xor     %edi, %edi
        call    exit

.section .rodata
msg1:   .asciz "spin checksum="
msg2:   .asciz " ticks="

# ---------------------------------------------------------------- user mode (CPL3)
.section .user.text,"ax",@progbits
user_spin:
        mov     $SPIN_SEED, %rax
        xor     %ebx, %ebx
        mov     $SPIN_ITERS, %rcx
1:      mov     %rax, %rdx
        shl     $13, %rdx
        xor     %rdx, %rax
        mov     %rax, %rdx
        shr     $7, %rdx
        xor     %rdx, %rax
        mov     %rax, %rdx
        shl     $17, %rdx
        xor     %rdx, %rax
        add     %rax, %rbx
        dec     %rcx
        jnz     1b
        mov     %rbx, %rax
user_done:
        ud2                             # the done call (see the top of this file)

.section .user.bss,"aw",@nobits
.balign 16
ustack: .fill 4096, 1, 0
ustack_top:
