# usertimer: timer interrupts taken from CPL3 and returned to it.
#
# Serial output (exact bytes) on success, after 50 ticks (~0.5 s):
#     usertimer ok ticks=50\n
# and exit status 0 through port 0x501. On a wrong result: "usertimer error: <what>\n" and
# exit status 1, <what> one of
#     <n> ticks did not interrupt user mode     (a tick's frame had CS != 0x2b)
#     user registers corrupted                  (the user loop found its invariant broken)
#
# Kernel (CPL0): own page tables (lib/paging.S), TSS.RSP0 = istack, PIC with only IRQ0
# unmasked, PIT channel 0 mode 2 at 100 Hz, then iretq to the user loop (RFLAGS 0x202).
# IRQ0 handler (vector 0x20): counts ticks whose frame CS is not 0x2b, counts ticks, EOI, and
# on the 50th tick masks the PIC, prints the result and exits; otherwise iretq (~12
# instructions + 1 port write per tick).
# User (CPL3): an endless loop keeping invariants in registers (r8 = n, r9 = 3n, r12..r15
# and rbx, rbp fixed values) and checking them every iteration; a broken invariant is reported
# with the done call `ud2` at user_bad (accepted by the #UD handler only from CS 0x2b at that
# RIP; `INT n` from CPL3 raises #UD on this machine's KVM, see spin.S).

.include "defs.inc"

.equ NTICKS, 50

.text
.globl main
main:
        call    paging_init_user
        mov     $(IRQ_BASE + 0), %edi
        lea     irq0(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        mov     $6, %edi
        lea     ud_handler(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        lea     istack_top(%rip), %rdi
        call    tss_set_rsp0
        mov     $0x0001, %edi           # IRQ0 only
        call    pic_init
        mov     $100, %edi
        call    pit_init
        lea     user_loop(%rip), %rdi
        lea     ustack_top(%rip), %rsi
        mov     $0x202, %edx
        call    enter_user

# stack: RIP, CS, RFLAGS, RSP, SS
irq0:
        push    %rax
        cmpq    $USER_CS, 16(%rsp)
        je      1f
        incq    not_user(%rip)
1:      mov     $PIC_EOI, %al
        out     %al, $PIC1_CMD
        incq    ticks(%rip)
        cmpq    $NTICKS, ticks(%rip)
        jae     report
        pop     %rax
        iretq

report:
        mov     $0xff, %al
        out     %al, $PIC1_DATA         # no more ticks
        cmpq    $0, not_user(%rip)
        je      2f
        lea     msg_err(%rip), %rdi
        call    print_str
        mov     not_user(%rip), %rdi
        call    print_dec
        lea     msg_notuser(%rip), %rdi
        call    print_str
        mov     $EXIT_FAIL, %edi
        call    exit
2:      lea     msg_ok(%rip), %rdi
        call    print_str
        mov     ticks(%rip), %rdi
        call    print_dec
        mov     $'\n', %edi
        call    putc
        xor     %edi, %edi
        call    exit

ud_handler:
        lea     user_bad(%rip), %rax
        cmp     %rax, 0(%rsp)
        jne     1f
        cmpq    $USER_CS, 8(%rsp)
        je      2f
1:      pushq   $0
        pushq   $6
        jmp     fatal_vector
2:      lea     msg_err(%rip), %rdi
        call    print_str
        lea     msg_regs(%rip), %rdi
        call    print_str
        mov     $EXIT_FAIL, %edi
        call    exit

.section .rodata
msg_ok:      .asciz "usertimer ok ticks="
msg_err:     .asciz "usertimer error: "
msg_notuser: .asciz " ticks did not interrupt user mode\n"
msg_regs:    .asciz "user registers corrupted\n"

.bss
.balign 8
ticks:     .quad 0
not_user:  .quad 0

# ---------------------------------------------------------------- user mode (CPL3)
.section .user.text,"ax",@progbits
user_loop:
        xor     %r8d, %r8d
        xor     %r9d, %r9d
        mov     $0x1234567890abcdef, %rbx
        mov     $0x0fedcba987654321, %rbp
        mov     $0x1111111111111111, %r12
        mov     $0x2222222222222222, %r13
        mov     $0x3333333333333333, %r14
        mov     $0x4444444444444444, %r15
1:      inc     %r8
        add     $3, %r9
        lea     (%r8,%r8,2), %r10
        cmp     %r10, %r9
        jne     user_bad
        mov     $0x1234567890abcdef, %rax
        cmp     %rax, %rbx
        jne     user_bad
        mov     $0x0fedcba987654321, %rax
        cmp     %rax, %rbp
        jne     user_bad
        mov     $0x1111111111111111, %rax
        cmp     %rax, %r12
        jne     user_bad
        mov     $0x2222222222222222, %rax
        cmp     %rax, %r13
        jne     user_bad
        mov     $0x3333333333333333, %rax
        cmp     %rax, %r14
        jne     user_bad
        mov     $0x4444444444444444, %rax
        cmp     %rax, %r15
        jne     user_bad
        jmp     1b
user_bad:
        ud2                                     # the done call: invariant broken

.section .user.bss,"aw",@nobits
.balign 16
ustack:     .fill 4096, 1, 0
ustack_top:
