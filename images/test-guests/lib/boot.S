# boot.S: entry points, GDT, TSS, stacks of every test guest.
#
# Two ways in, one 64-bit path:
#  - ftvmm (and any 64-bit Linux-boot-protocol loader) jumps to `_start` (the ELF entry point)
#    in long mode, CPL0, paging on with the VMM's identity map, interrupts off
#    (docs/PLATFORM.md).
#  - QEMU (`-kernel guest.elf`) finds the Xen PVH note below and enters `pvh_start` in 32-bit
#    protected mode with paging off (EBX = hvm_start_info, unused). pvh_start builds its own
#    identity map of 0..4 GiB (2 MiB pages, supervisor, the same shape as ftvmm's) and a GDT
#    like ftvmm's (0x10 code, 0x18 data), enters long mode and jumps to `_start`.
#
# _start: zeroes .bss, takes its own stack, loads the runtime GDT (selectors in defs.inc) and
# TSS, initialises COM1, loads the IDT (every vector to the fatal handler, lib/idt.S) and calls
# the guest's `main` with interrupts off. If main returns, its return value (low byte) is the
# exit status.
#
# Cost at CPL0 before main: about 6,000 instructions (mostly the 256-entry IDT fill).

.include "defs.inc"

# ---------------------------------------------------------------- Xen PVH ELF note
.section .note.Xen,"a",@note
.balign 4
        .long 4                 # namesz ("Xen\0")
        .long 4                 # descsz
        .long 18                # XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .long pvh_start         # 32-bit physical entry point
.balign 4

# ---------------------------------------------------------------- PVH 32-bit entry
.section .text.boot32,"ax",@progbits
.code32
.globl pvh_start
pvh_start:
        cli
        cld
        # zero the 6 table pages (PML4, PDPT, 4 PDs)
        mov     $pvh_pml4, %edi
        mov     $(6 * 4096 / 4), %ecx
        xor     %eax, %eax
        rep stosl
        movl    $(pvh_pdpt + 3), pvh_pml4               # PML4[0] -> PDPT, P|RW
        movl    $(pvh_pd + 0x0000 + 3), pvh_pdpt + 0     # PDPT[i] -> PD i
        movl    $(pvh_pd + 0x1000 + 3), pvh_pdpt + 8
        movl    $(pvh_pd + 0x2000 + 3), pvh_pdpt + 16
        movl    $(pvh_pd + 0x3000 + 3), pvh_pdpt + 24
        mov     $pvh_pd, %edi                           # 2048 x 2 MiB pages: 0..4 GiB
        mov     $0x83, %eax                             # P|RW|PS
        mov     $2048, %ecx
1:      mov     %eax, (%edi)
        add     $8, %edi
        add     $0x200000, %eax
        dec     %ecx
        jnz     1b
        mov     %cr4, %eax
        or      $0x20, %eax                             # PAE
        mov     %eax, %cr4
        mov     $pvh_pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        lgdt    pvh_gdt_ptr
        mov     %cr0, %eax
        or      $0x80010033, %eax                       # PG|WP|NE|ET|MP|PE (as ftvmm)
        mov     %eax, %cr0
        ljmp    $0x10, $pvh_long

.code64
pvh_long:
        mov     $0x18, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        xor     %esi, %esi                              # no boot_params
        jmp     _start

.section .rodata
.balign 8
pvh_gdt:
        .quad 0
        .quad 0
        .quad 0x00af9a000000ffff                        # 0x10: 64-bit code, DPL0
        .quad 0x00cf92000000ffff                        # 0x18: data, DPL0
pvh_gdt_end:
pvh_gdt_ptr:
        .word pvh_gdt_end - pvh_gdt - 1
        .long pvh_gdt

# ---------------------------------------------------------------- 64-bit entry
.section .text.entry,"ax",@progbits
.globl _start
_start:
        cli
        cld
        # zero .ubss and .bss (contiguous, 8-byte multiple)
        lea     __zero_start(%rip), %rdi
        lea     __zero_end(%rip), %rcx
        sub     %rdi, %rcx
        shr     $3, %rcx
        xor     %eax, %eax
        rep stosq
        lea     kstack_top(%rip), %rsp
        xor     %ebp, %ebp

        # TSS descriptor (base split over the 16-byte system descriptor)
        lea     tss(%rip), %rax
        lea     gdt_tss(%rip), %rdi
        movw    $(tss_end - tss - 1), (%rdi)            # limit 15:0
        mov     %ax, 2(%rdi)                            # base 15:0
        shr     $16, %rax
        mov     %al, 4(%rdi)                            # base 23:16
        movb    $0x89, 5(%rdi)                          # present, 64-bit TSS (available)
        movb    $0, 6(%rdi)
        mov     %ah, 7(%rdi)                            # base 31:24
        shr     $16, %rax
        mov     %eax, 8(%rdi)                           # base 63:32
        movl    $0, 12(%rdi)
        lea     istack_top(%rip), %rax                  # RSP0: interrupts from CPL3
        mov     %rax, tss + 4(%rip)
        movw    $(tss_end - tss), tss + 102(%rip)       # I/O map base: no bitmap

        lgdt    gdt_ptr(%rip)
        mov     $KERNEL_DS, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        pushq   $KERNEL_CS
        lea     1f(%rip), %rax
        pushq   %rax
        lretq
1:      mov     $TSS_SEL, %eax
        ltr     %ax

        call    serial_init
        call    idt_init
        call    main
        movzbl  %al, %edi
        call    exit

# tss_set_rsp0(rdi = stack top): the stack the CPU switches to on an interrupt from CPL3
.text
.globl tss_set_rsp0
tss_set_rsp0:
        mov     %rdi, tss + 4(%rip)
        ret

# ---------------------------------------------------------------- GDT, TSS
.data
.balign 16
gdt:
        .quad 0                                         # 0x00 null
        .quad 0x00af9a000000ffff                        # 0x08 kernel code, 64-bit, DPL0
        .quad 0x00cf92000000ffff                        # 0x10 kernel data, DPL0
        .quad 0x00cffa000000ffff                        # 0x18 user code, 32-bit, DPL3 (unused)
        .quad 0x00cff2000000ffff                        # 0x20 user data, DPL3
        .quad 0x00affa000000ffff                        # 0x28 user code, 64-bit, DPL3
gdt_tss:
        .quad 0, 0                                      # 0x30 TSS (filled by _start)
gdt_end:
.balign 8
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt

.balign 16
.globl tss
tss:
        .fill 104, 1, 0
tss_end:

# ---------------------------------------------------------------- stacks
.bss
.balign 16
kstack:
        .fill 16384, 1, 0
.globl kstack_top
kstack_top:
istack:
        .fill 8192, 1, 0
.globl istack_top
istack_top:

# PVH page tables: outside the zeroed range (they are live while _start zeroes .bss)
.section .pvhbss,"aw",@nobits
.balign 4096
pvh_pml4: .fill 4096, 1, 0
pvh_pdpt: .fill 4096, 1, 0
pvh_pd:   .fill 4 * 4096, 1, 0
