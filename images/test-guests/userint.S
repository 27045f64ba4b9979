# userint: software interrupts (`int $0x80`, a DPL3 interrupt gate) from CPL3.
#
# Serial output (exact bytes) on success:
#     userint ok calls=100\n
# and exit status 0 through port 0x501. On a wrong result: "userint error: <what>\n" and exit
# status 1, <what> one of: wrong result | registers not preserved.
#
# Kernel (CPL0): own page tables (lib/paging.S), PIC all masked, TSS.RSP0 = istack, gate
# 0x80 = 64-bit interrupt gate with DPL3 (attributes 0xee). Handler: rax = 0 -> the done
# call (rdi = 0 success, 1 wrong result, 2 registers; prints and exits), otherwise
# rax = rax * 2 + 1 and iretq. User (CPL3): 100 calls with rax = 1..100, each result checked
# and rbx/rcx/rdx/rsi/rdi/rbp/r8-r15 checked unchanged, then the done call.
#
# On this machine's KVM (kvm_pvm) every `INT n` at CPL3 raises #UD at the INT instruction
# instead of going through the gate (measured with vectors 0x30, 0x80, 0x81, 0xf0): without
# help from the VMM the guest prints
#     unexpected vector=6 err=0000000000000000 rip=<the int> cs=000000000000002b cr2=...
# and exits with status 0x16. A VMM can complete it like SYSCALL: catch the #UD (breakpoint on
# the guest's vector 6 entry), see opcode CD nn at the frame's RIP, and deliver vector nn
# through the IDT itself (gate DPL >= 3 check, RSP0 from the TSS, frame with RIP + 2).

.include "defs.inc"

.equ NCALLS, 100

.text
.globl main
main:
        call    paging_init_user
        mov     $0x80, %edi
        lea     int80(%rip), %rsi
        mov     $GATE_INT_USER, %edx
        call    idt_set_gate
        lea     istack_top(%rip), %rdi
        call    tss_set_rsp0
        xor     %edi, %edi
        call    pic_init
        lea     user_main(%rip), %rdi
        lea     ustack_top(%rip), %rsi
        mov     $0x202, %edx
        call    enter_user

int80:
        test    %rax, %rax
        jz      done
        lea     1(%rax,%rax), %rax
        iretq
done:
        cmpq    $USER_CS, 8(%rsp)
        je      1f
        pushq   $0                      # not from user mode: fatal
        pushq   $0x80
        jmp     fatal_vector
1:      test    %edi, %edi
        jnz     2f
        lea     msg_ok(%rip), %rdi
        call    print_str
        xor     %edi, %edi
        call    exit
2:      lea     msg_res(%rip), %rsi
        cmp     $1, %edi
        je      3f
        lea     msg_regs(%rip), %rsi
3:      lea     msg_err(%rip), %rdi
        call    print_str
        mov     %rsi, %rdi
        call    print_str
        mov     $EXIT_FAIL, %edi
        call    exit

.section .rodata
msg_ok:   .asciz "userint ok calls=100\n"
msg_err:  .asciz "userint error: "
msg_res:  .asciz "wrong result\n"
msg_regs: .asciz "registers not preserved\n"

# ---------------------------------------------------------------- user mode (CPL3)
.section .user.text,"ax",@progbits
user_main:
        mov     $0x0101010101010101, %rbx
        mov     $0x0202020202020202, %rcx
        mov     $0x0303030303030303, %rdx
        mov     $0x0404040404040404, %rsi
        mov     $0x0505050505050505, %rdi
        mov     $0x0606060606060606, %rbp
        mov     $0x0808080808080808, %r8
        mov     $0x0909090909090909, %r9
        mov     $0x0a0a0a0a0a0a0a0a, %r10
        mov     $0x0b0b0b0b0b0b0b0b, %r11
        mov     $0x0c0c0c0c0c0c0c0c, %r12
        mov     $0x0d0d0d0d0d0d0d0d, %r13
        mov     $1, %r14                        # call number i
1:      mov     %r14, %rax
        int     $0x80
        lea     1(%r14,%r14), %r15
        cmp     %r15, %rax
        jne     u_badres
        mov     $0x0101010101010101, %rax
        cmp     %rax, %rbx
        jne     u_badregs
        mov     $0x0202020202020202, %rax
        cmp     %rax, %rcx
        jne     u_badregs
        mov     $0x0303030303030303, %rax
        cmp     %rax, %rdx
        jne     u_badregs
        mov     $0x0404040404040404, %rax
        cmp     %rax, %rsi
        jne     u_badregs
        mov     $0x0505050505050505, %rax
        cmp     %rax, %rdi
        jne     u_badregs
        mov     $0x0606060606060606, %rax
        cmp     %rax, %rbp
        jne     u_badregs
        mov     $0x0808080808080808, %rax
        cmp     %rax, %r8
        jne     u_badregs
        mov     $0x0909090909090909, %rax
        cmp     %rax, %r9
        jne     u_badregs
        mov     $0x0a0a0a0a0a0a0a0a, %rax
        cmp     %rax, %r10
        jne     u_badregs
        mov     $0x0b0b0b0b0b0b0b0b, %rax
        cmp     %rax, %r11
        jne     u_badregs
        mov     $0x0c0c0c0c0c0c0c0c, %rax
        cmp     %rax, %r12
        jne     u_badregs
        mov     $0x0d0d0d0d0d0d0d0d, %rax
        cmp     %rax, %r13
        jne     u_badregs
        inc     %r14
        cmp     $NCALLS, %r14
        jbe     1b
        xor     %edi, %edi
        jmp     u_done
u_badres:
        mov     $1, %edi
        jmp     u_done
u_badregs:
        mov     $2, %edi
u_done:
        xor     %eax, %eax
        int     $0x80
        ud2

.section .user.bss,"aw",@nobits
.balign 16
ustack:     .fill 4096, 1, 0
ustack_top:
