# userpf: demand paging. A CPL3 program touches 64 pages that are not present; the kernel's
# #PF handler maps each one and fills it, and the program checks the content.
#
# Serial output (exact bytes) on success:
#     userpf ok faults=64\n
# and exit status 0 through port 0x501. On a wrong result: "userpf error: <what>\n" and exit
# status 1, <what> one of
#     page <i> content mismatch        (the user program found a wrong word in page i)
#     faults=<n>                       (the kernel did not see exactly 64 faults)
# A page fault the handler does not expect (not from CPL3, not "not present", outside the
# demand area, or on a page it already mapped) is fatal: "unexpected vector=14 ..." with
# status 0x1e.
#
# Memory: the demand area is 64 pages at virtual 0x100000000 (4 GiB, outside the identity
# map): PML4[0] -> PDPT[4] -> pd_demand[0] -> pt_demand, all U/S=1, pt_demand initially
# empty. Page i is backed by the physical page __pool_start + i * 4096 (right after the
# image, inside the first 2 MiB).
# Handler (vector 14): checks CS = 0x2b, error code 4 or 6 (user, not present, read or write)
# and CR2 in the area, fills the backing page with the 64-bit word (i + 1) * 0x0101010101010101
# (rep stosq, 512 words), sets PTE i = page | P|RW|US, counts the fault and returns (iretq) to
# the faulting instruction. No INVLPG is needed (a not-present entry is never cached).
# User (CPL3): for i = 0..63 reads the first word of page i (the fault), checks all 512 words
# against the pattern, writes the last word and reads it back; then the done call: `ud2` at
# user_done with rax = 0 (or i + 1 for a mismatch on page i), accepted by the #UD handler only
# from CS 0x2b at that RIP (`INT n` from CPL3 raises #UD on this machine's KVM, see spin.S).
# Before user mode the kernel sets EFER.SCE (as Linux does), so that on this machine the VMM's
# SYSCALL completion watches the #PF entry and steps over each of these faults.
# CPL0 cost: ~60 instructions + 512 rep-stosq iterations per fault (~35,000 in all).

.include "defs.inc"

.equ DEMAND_BASE,  0x100000000
.equ DEMAND_PAGES, 64

.text
.globl main
main:
        call    paging_init_user
        lea     pd_demand(%rip), %rax
        or      $(PTE_P | PTE_RW | PTE_US), %rax
        mov     %rax, pdpt + 4 * 8(%rip)                # PDPT[4]: 4 GiB .. 5 GiB
        lea     pt_demand(%rip), %rax
        or      $(PTE_P | PTE_RW | PTE_US), %rax
        mov     %rax, pd_demand(%rip)
        mov     %cr3, %rax                              # flush (PDPT changed)
        mov     %rax, %cr3
        mov     $14, %edi
        lea     pf_handler(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        mov     $6, %edi
        lea     ud_handler(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        lea     istack_top(%rip), %rdi
        call    tss_set_rsp0
        xor     %edi, %edi
        call    pic_init                                # everything masked
        # Enable SYSCALL (EFER.SCE) as a real kernel does before user space runs: on this
        # machine's KVM that is what makes the VMM watch the #PF entry (vmm/src/compat.rs), so
        # every fault below goes through its step-over path. The OUT is a synchronous exit,
        # where the VMM notices (WRMSR itself does not exit).
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_SCE, %eax
        wrmsr
        outb    %al, $0x80
        lea     user_main(%rip), %rdi
        lea     ustack_top(%rip), %rsi
        mov     $0x202, %edx
        call    enter_user

# stack: error code, RIP, CS, RFLAGS, RSP, SS
pf_handler:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rdi
        # frame is now at 32(%rsp): err 32, rip 40, cs 48
        cmpq    $USER_CS, 48(%rsp)
        jne     pf_bad
        mov     32(%rsp), %rax
        and     $~2, %rax                               # read or write
        cmp     $4, %rax                                # user, not present
        jne     pf_bad
        mov     %cr2, %rax
        mov     $DEMAND_BASE, %rcx
        sub     %rcx, %rax
        jb      pf_bad
        shr     $12, %rax                               # page index
        cmp     $DEMAND_PAGES, %rax
        jae     pf_bad
        lea     pt_demand(%rip), %rcx
        cmpq    $0, (%rcx,%rax,8)
        jne     pf_bad                                  # already mapped
        mov     %rax, %rdx                              # rdx = i
        shl     $12, %rax
        lea     __pool_start(%rip), %rdi
        add     %rax, %rdi                              # backing page
        push    %rdi
        lea     1(%rdx), %rax
        mov     $0x0101010101010101, %rcx
        imul    %rcx, %rax                              # (i + 1) * 0x0101010101010101
        mov     $512, %ecx
        rep stosq
        pop     %rax
        or      $(PTE_P | PTE_RW | PTE_US), %rax
        lea     pt_demand(%rip), %rcx
        mov     %rax, (%rcx,%rdx,8)
        incq    faults(%rip)
        pop     %rdi
        pop     %rdx
        pop     %rcx
        pop     %rax
        add     $8, %rsp                                # error code
        iretq
pf_bad:
        pop     %rdi
        pop     %rdx
        pop     %rcx
        pop     %rax
        pushq   $14
        jmp     fatal_vector

# #UD: the done call from user_done, rax = 0 or 1 + bad page
ud_handler:
        lea     user_done(%rip), %rbx
        cmp     %rbx, 0(%rsp)
        jne     1f
        cmpq    $USER_CS, 8(%rsp)
        je      2f
1:      pushq   $0
        pushq   $6
        jmp     fatal_vector
2:      test    %rax, %rax
        jz      3f
        lea     msg_page1(%rip), %rdi
        call    print_str
        lea     -1(%rax), %rdi
        call    print_dec
        lea     msg_page2(%rip), %rdi
        call    print_str
        mov     $EXIT_FAIL, %edi
        call    exit
3:      cmpq    $DEMAND_PAGES, faults(%rip)
        je      4f
        lea     msg_faults(%rip), %rdi
        call    print_str
        mov     faults(%rip), %rdi
        call    print_dec
        mov     $'\n', %edi
        call    putc
        mov     $EXIT_FAIL, %edi
        call    exit
4:      lea     msg_ok(%rip), %rdi
        call    print_str
        mov     faults(%rip), %rdi
        call    print_dec
        mov     $'\n', %edi
        call    putc
        xor     %edi, %edi
        call    exit

.section .rodata
msg_ok:     .asciz "userpf ok faults="
msg_faults: .asciz "userpf error: faults="
msg_page1:  .asciz "userpf error: page "
msg_page2:  .asciz " content mismatch\n"

.bss
.balign 4096
pd_demand:  .fill 4096, 1, 0
pt_demand:  .fill 4096, 1, 0
faults:     .quad 0

# ---------------------------------------------------------------- user mode (CPL3)
.section .user.text,"ax",@progbits
user_main:
        xor     %r12d, %r12d                    # page index
        mov     $DEMAND_BASE, %r13              # page address
1:      mov     (%r13), %rax                    # the fault
        lea     1(%r12), %rdx
        mov     $0x0101010101010101, %rcx
        imul    %rcx, %rdx                      # expected word
        xor     %ecx, %ecx
2:      cmp     %rdx, (%r13,%rcx,8)
        jne     3f
        inc     %ecx
        cmp     $512, %ecx
        jne     2b
        not     %rdx                            # write access
        mov     %rdx, 4088(%r13)
        cmp     %rdx, 4088(%r13)
        jne     3f
        inc     %r12
        add     $4096, %r13
        cmp     $DEMAND_PAGES, %r12
        jne     1b
        xor     %eax, %eax
        jmp     user_done
3:      lea     1(%r12), %rax
user_done:
        ud2                                     # the done call

.section .user.bss,"aw",@nobits
.balign 16
ustack:     .fill 4096, 1, 0
ustack_top:
