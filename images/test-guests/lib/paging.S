# paging.S: the guest's own page tables, for the guests that run code at CPL3
# (the VMM's identity map is supervisor-only).
#
#   paging_init_user    builds and loads (CR3) an identity map of 0..4 GiB:
#                        - 0..2 MiB with 4 KiB pages (pt0); the pages of the image's user
#                          range [__user_start, __user_end) (sections .user.* and .user.bss)
#                          are user-accessible (U/S=1), every other page is supervisor-only;
#                        - 2 MiB..4 GiB with 2 MiB pages, supervisor-only;
#                        - PML4[0], PDPT[0..3] and PD0[0] have U/S=1 (the leaf decides).
#                       Cost: ~2,600 loop iterations at CPL0 (~12,000 instructions).
#   pml4, pdpt           exported so a guest can hang more tables (e.g. PDPT[4]) off them.

.include "defs.inc"

.text
.globl paging_init_user
paging_init_user:
        push    %rdi
        push    %rcx
        push    %rdx
        push    %rsi
        lea     pdpt(%rip), %rax
        or      $(PTE_P | PTE_RW | PTE_US), %rax
        mov     %rax, pml4(%rip)
        lea     pd(%rip), %rax
        or      $(PTE_P | PTE_RW | PTE_US), %rax
        lea     pdpt(%rip), %rdi
        mov     %rax, 0(%rdi)
        add     $4096, %rax
        mov     %rax, 8(%rdi)
        add     $4096, %rax
        mov     %rax, 16(%rdi)
        add     $4096, %rax
        mov     %rax, 24(%rdi)
        # PD entries 1..2047: 2 MiB pages, supervisor
        lea     pd + 8(%rip), %rdi
        mov     $(0x200000 | PTE_P | PTE_RW | PTE_PS), %eax
        mov     $2047, %ecx
1:      mov     %rax, (%rdi)
        add     $8, %rdi
        add     $0x200000, %rax
        dec     %ecx
        jnz     1b
        # PD0[0] -> pt0
        lea     pt0(%rip), %rax
        or      $(PTE_P | PTE_RW | PTE_US), %rax
        mov     %rax, pd(%rip)
        # pt0: 512 x 4 KiB
        lea     pt0(%rip), %rdi
        lea     __user_start(%rip), %rsi
        lea     __user_end(%rip), %rdx
        mov     $(PTE_P | PTE_RW), %eax
        xor     %ecx, %ecx
2:      mov     %rax, %rcx
        and     $~0xfff, %rcx           # physical address of this page
        cmp     %rsi, %rcx
        jb      3f
        cmp     %rdx, %rcx
        jae     3f
        or      $PTE_US, %rax
3:      mov     %rax, (%rdi)
        and     $~PTE_US, %rax
        add     $8, %rdi
        add     $0x1000, %rax
        cmp     $0x200000, %rax
        jb      2b
        lea     pml4(%rip), %rax
        mov     %rax, %cr3
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rdi
        ret

.bss
.balign 4096
.globl pml4, pdpt, pd, pt0
pml4:   .fill 4096, 1, 0
pdpt:   .fill 4096, 1, 0
pd:     .fill 4 * 4096, 1, 0
pt0:    .fill 4096, 1, 0
