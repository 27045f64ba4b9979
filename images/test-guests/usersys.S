# usersys: SYSCALL/SYSRETQ between a CPL3 program and this kernel.
#
# Serial output (exact bytes) on success:
#     usersys ok calls=1000\n
# printed by the user program one byte per system call, then exit status 0 (system call 3).
# On a wrong result: "usersys error: <what>\n" and exit status 1, <what> one of
#     wrong sum | registers not preserved     (checked by the user program)
#     kernel counted <n> add calls            (checked by the kernel at exit)
#     bad system call 1                       (the kernel answered -1 to an add call)
#
# Kernel (CPL0): own page tables (lib/paging.S; LSTAR's page, in .text, is supervisor-only:
# U/S=0; the user program's pages are U/S=1), PIC with every IRQ masked, EFER.SCE, STAR =
# (0x1b << 48) | (0x08 << 32) (SYSCALL: CS 0x08, SS 0x10; SYSRETQ: CS 0x2b, SS 0x23),
# LSTAR = syscall_entry, FMASK = 0x47700 (TF, IF, DF, IOPL, NT, AC cleared on entry); then
# iretq to the user program (RFLAGS 0x202).
# syscall_entry saves the user RSP, switches to the stack whose top is stored at
# `syscall_stack_ptr` (a fixed location in .data), saves RCX/R11, dispatches on RAX, restores
# and returns with SYSRETQ. System calls (number in RAX, arguments in RDI, RSI, result in RAX;
# every register except RAX, RCX, R11 preserved):
#     1  add:  rax = rdi + rsi (the kernel counts these calls)
#     2  putc: writes the byte in dil to COM1, rax = 0
#     3  exit: dil = status; with status 0 the kernel first checks it counted 1000 add calls
#     other: rax = -1 (and the user program reports "bad system call")
# User (CPL3): 1000 add calls with varying arguments, each result checked and RDI/RSI/RDX/
# RBX/RBP/R8-R10/R12-R15 checked unchanged; then the line above through putc calls (22
# calls), then exit(0): 1023 system calls in all.
#
# On this machine's KVM (kvm_pvm) SYSCALL from CPL3 jumps to LSTAR without leaving CPL3, so
# the first instruction fetch at LSTAR faults (supervisor page): without the VMM's SYSCALL
# completion the guest prints
#     unexpected vector=14 err=0000000000000005 rip=<LSTAR> cs=000000000000002b cr2=<LSTAR>
# and exits with status 0x1e. (QEMU with KVM on this machine shows exactly that.)
# The `outb %al, $0x80` (an unclaimed port: ignored) after the MSR writes gives the VMM one
# synchronous exit between the IDT/EFER.SCE setup and the first SYSCALL: ftvmm arms its
# SYSCALL completion (a breakpoint on the guest's #PF entry) at synchronous exits only, and
# WRMSR EFER does not exit to the VMM.
# CPL0 cost per system call: ~25 instructions (+ 2 port accesses per putc).

.include "defs.inc"

.equ NCALLS, 1000

.text
.globl main
main:
        call    paging_init_user
        xor     %edi, %edi
        call    pic_init                # everything masked
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_SCE, %eax
        wrmsr
        mov     $MSR_STAR, %ecx
        xor     %eax, %eax
        mov     $((USER32_CS << 16) | KERNEL_CS), %edx
        wrmsr
        mov     $MSR_LSTAR, %ecx
        lea     syscall_entry(%rip), %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr
        mov     $MSR_FMASK, %ecx
        mov     $0x47700, %eax
        xor     %edx, %edx
        wrmsr
        lea     istack_top(%rip), %rdi
        call    tss_set_rsp0
        outb    %al, $0x80              # a synchronous exit after the setup (see the top)
        lea     user_main(%rip), %rdi
        lea     ustack_top(%rip), %rsi
        mov     $0x202, %edx
        call    enter_user

.balign 64
.globl syscall_entry
syscall_entry:
        mov     %rsp, syscall_user_rsp(%rip)
        mov     syscall_stack_ptr(%rip), %rsp
        pushq   syscall_user_rsp(%rip)
        push    %rcx
        push    %r11
        push    %rdi
        push    %rsi
        push    %rdx
        cmp     $1, %rax
        je      sys_add
        cmp     $2, %rax
        je      sys_putc
        cmp     $3, %rax
        je      sys_exit
        mov     $-1, %rax
sys_ret:
        pop     %rdx
        pop     %rsi
        pop     %rdi
        pop     %r11
        pop     %rcx
        pop     %rsp
        sysretq

sys_add:
        lea     (%rdi,%rsi), %rax
        incq    add_calls(%rip)
        jmp     sys_ret

sys_putc:
        call    putc
        xor     %eax, %eax
        jmp     sys_ret

sys_exit:
        movzbl  %dil, %edi
        test    %edi, %edi
        jnz     1f
        cmpq    $NCALLS, add_calls(%rip)
        je      1f
        lea     msg_count1(%rip), %rdi
        call    print_str
        mov     add_calls(%rip), %rdi
        call    print_dec
        lea     msg_count2(%rip), %rdi
        call    print_str
        mov     $EXIT_FAIL, %edi
1:      call    exit

.section .rodata
msg_count1: .asciz "usersys error: kernel counted "
msg_count2: .asciz " add calls\n"

.data
.balign 8
syscall_stack_ptr:  .quad syscall_stack_top     # the fixed location syscall_entry reads
syscall_user_rsp:   .quad 0
add_calls:          .quad 0

.bss
.balign 16
syscall_stack:      .fill 4096, 1, 0
syscall_stack_top:

# ---------------------------------------------------------------- user mode (CPL3)
.section .user.text,"ax",@progbits
user_main:
        mov     $0x0123456789abcdef, %r14       # varying first argument
        xor     %r13d, %r13d                    # calls done
        mov     $0x1111111111111111, %rbx       # canaries, must survive every call
        mov     $0x2222222222222222, %rbp
        mov     $0x3333333333333333, %rdx
        mov     $0x4444444444444444, %r10
        mov     $0x5555555555555555, %r12
        mov     $0x6666666666666666, %r15
1:      mov     %r14, %rdi
        lea     7(%r13,%r13,2), %rsi            # second argument: 3 * i + 7
        mov     %rdi, %r8
        mov     %rsi, %r9
        mov     $1, %eax
        syscall
        cmp     $-1, %rax
        je      u_badcall
        lea     (%r8,%r9), %rcx
        cmp     %rcx, %rax
        jne     u_badsum
        cmp     %r8, %rdi
        jne     u_badregs
        cmp     %r9, %rsi
        jne     u_badregs
        mov     $0x1111111111111111, %rcx
        cmp     %rcx, %rbx
        jne     u_badregs
        mov     $0x2222222222222222, %rcx
        cmp     %rcx, %rbp
        jne     u_badregs
        mov     $0x3333333333333333, %rcx
        cmp     %rcx, %rdx
        jne     u_badregs
        mov     $0x4444444444444444, %rcx
        cmp     %rcx, %r10
        jne     u_badregs
        mov     $0x5555555555555555, %rcx
        cmp     %rcx, %r12
        jne     u_badregs
        mov     $0x6666666666666666, %rcx
        cmp     %rcx, %r15
        jne     u_badregs
        inc     %r13
        rol     $5, %r14
        xor     %r13, %r14
        cmp     $NCALLS, %r13
        jne     1b

        lea     u_msg_ok(%rip), %rbx
        call    u_puts
        mov     %r13, %rax
        call    u_putdec
        mov     $'\n', %edi
        call    u_putc
        xor     %edi, %edi
        jmp     u_exit

u_badsum:
        lea     u_msg_sum(%rip), %rbx
        jmp     u_fail
u_badregs:
        lea     u_msg_regs(%rip), %rbx
        jmp     u_fail
u_badcall:
        lea     u_msg_call(%rip), %rbx
u_fail:
        call    u_puts
        mov     $1, %edi
u_exit:
        mov     $3, %eax
        syscall
        ud2                                     # exit does not return

# u_putc(dil)
u_putc:
        mov     $2, %eax
        syscall
        ret
# u_puts(rbx = NUL-terminated string)
u_puts:
1:      movzbl  (%rbx), %edi
        test    %edi, %edi
        jz      2f
        call    u_putc
        inc     %rbx
        jmp     1b
2:      ret
# u_putdec(rax): unsigned decimal
u_putdec:
        lea     u_decbuf + 31(%rip), %rbx
        movb    $0, (%rbx)
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %rcx
        add     $'0', %dl
        dec     %rbx
        mov     %dl, (%rbx)
        test    %rax, %rax
        jnz     1b
        jmp     u_puts

.section .user.rodata,"a",@progbits
u_msg_ok:   .asciz "usersys ok calls="
u_msg_sum:  .asciz "usersys error: wrong sum\n"
u_msg_regs: .asciz "usersys error: registers not preserved\n"
u_msg_call: .asciz "usersys error: bad system call 1\n"

.section .user.bss,"aw",@nobits
.balign 16
u_decbuf:   .fill 32, 1, 0
ustack:     .fill 4096, 1, 0
ustack_top:
