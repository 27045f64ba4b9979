# idt.S: the IDT, one stub per vector, the fatal handler and idt_set_gate.
#
# idt_init (called by _start) points all 256 vectors at a stub that pushes a dummy error code
# where the CPU pushes none, pushes the vector number and jumps to `fatal_vector`, which prints
#     unexpected vector=<dec> err=<hex16> rip=<hex16> cs=<hex16> cr2=<hex16>\n
# and exits with status 0x10 + vector for a CPU exception (vector < 32) or 0x30 for any other
# vector. A guest replaces the gates it handles with idt_set_gate.

.include "defs.inc"

# ---------------------------------------------------------------- stubs
# Each stub emits its address into .rodata.isrtab, so isrtab[v] is the stub of vector v.
.altmacro
.macro ISR_STUB v
        .balign 16
1:
        .if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
        .else
        pushq   $0
        .endif
        pushq   $\v
        jmp     fatal_vector
        .pushsection .rodata.isrtab,"a",@progbits
        .quad   1b
        .popsection
.endm

.section .rodata.isrtab,"a",@progbits
.balign 8
isrtab:                 # filled by the stubs below, in vector order

.text
.balign 16
isr_stubs:
        .set vec, 0
        .rept 256
        ISR_STUB %vec
        .set vec, vec + 1
        .endr
.noaltmacro

# ---------------------------------------------------------------- idt_init
.text
.globl idt_init
idt_init:
        push    %rdi
        push    %rsi
        push    %rdx
        push    %rcx
        xor     %ecx, %ecx
        mov     $GATE_INT, %edx
1:      mov     %rcx, %rdi
        lea     isrtab(%rip), %rsi
        mov     (%rsi,%rcx,8), %rsi
        call    idt_set_gate
        inc     %ecx
        cmp     $256, %ecx
        jne     1b
        lidt    idt_ptr(%rip)
        pop     %rcx
        pop     %rdx
        pop     %rsi
        pop     %rdi
        ret

# idt_set_gate(rdi = vector, rsi = handler, rdx = attributes, e.g. GATE_INT or GATE_INT_USER)
.globl idt_set_gate
idt_set_gate:
        push    %rdi
        shl     $4, %rdi
        lea     idt(%rip), %rax
        add     %rax, %rdi
        mov     %rsi, %rax
        mov     %ax, (%rdi)                     # offset 15:0
        movw    $KERNEL_CS, 2(%rdi)
        movb    $0, 4(%rdi)                     # IST 0
        mov     %dl, 5(%rdi)                    # type/DPL/present
        shr     $16, %rax
        mov     %ax, 6(%rdi)                    # offset 31:16
        shr     $16, %rax
        mov     %eax, 8(%rdi)                   # offset 63:32
        movl    $0, 12(%rdi)
        pop     %rdi
        ret

# ---------------------------------------------------------------- fatal handler
# stack: vector, error code, RIP, CS, RFLAGS, RSP, SS
.globl fatal_vector
fatal_vector:
        lea     msg_unexp(%rip), %rdi
        call    print_str
        mov     0(%rsp), %rdi
        call    print_dec
        lea     msg_err(%rip), %rdi
        call    print_str
        mov     8(%rsp), %rdi
        call    print_hex
        lea     msg_rip(%rip), %rdi
        call    print_str
        mov     16(%rsp), %rdi
        call    print_hex
        lea     msg_cs(%rip), %rdi
        call    print_str
        mov     24(%rsp), %rdi
        call    print_hex
        lea     msg_cr2(%rip), %rdi
        call    print_str
        mov     %cr2, %rdi
        call    print_hex
        mov     $'\n', %edi
        call    putc
        mov     0(%rsp), %rdi
        cmp     $32, %rdi
        jb      1f
        mov     $(EXIT_UNEXP_IRQ - EXIT_EXC_BASE), %edi
1:      add     $EXIT_EXC_BASE, %edi
        call    exit

.section .rodata
msg_unexp: .asciz "unexpected vector="
msg_err:   .asciz " err="
msg_rip:   .asciz " rip="
msg_cs:    .asciz " cs="
msg_cr2:   .asciz " cr2="

.data
.balign 8
idt_ptr:
        .word 256 * 16 - 1
        .quad idt

.bss
.balign 4096
.globl idt
idt:
        .fill 256 * 16, 1, 0
