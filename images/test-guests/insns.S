# insns: instructions this machine's KVM cannot emulate at CPL0, executed at CPL0 with their
# architectural results checked. The VMM must complete each one (decode, apply, advance RIP).
#
# Serial output (exact bytes) on success:
#     insn popcnt ok\n
#     insn stac ok\n
#     insn clac ok\n
#     insn int3 ok\n
#     insn fnclex ok\n
#     insn fnstsw ok\n
#     insn fnstcw ok\n
#     insn fldcw ok\n
#     insn fwait ok\n
#     insns ok\n
# and exit status 0 through port 0x501. On a wrong result: "insns error: <name> <what>\n" and
# exit status 1, <what> being "case <n>" (popcnt, see the table below), "ac" (stac/clac),
# "not taken" / "rip" / "regs" (int3), "setup fsw=<hex>" / "fsw=<hex>" (fnclex).
# An instruction that faults shows as "unexpected vector=<v> ..." (e.g. #UD: status 0x16).
#
# popcnt: cases, in order (each checks the result, and ZF = (source == 0)):
#     0 popcnt rdi,rax  0                  -> 0 (ZF=1)
#     1 popcnt rdi,rax  1                  -> 1
#     2 popcnt rdi,rax  0xffffffffffffffff -> 64
#     3 popcnt rdi,rax  0x8000000000000001 -> 2
#     4 popcnt rdi,rax  0x123456789abcdef0 -> 32
#     5 popcnt edi,eax  0xffffffff00000003 -> 2 (rax upper half cleared; rax was all ones)
#     6 popcnt di,ax    0xffff             -> 16 (bits 63:16 of rax kept: 0x1111111111110010)
#     7 popcnt mem64,rax 0x00000000000000f0 -> 4
# stac / clac: AC (RFLAGS bit 18) set after stac, clear after clac (CR4.SMAP is left off;
#     the instructions need only the CPU feature).
# int3: the #BP handler (vector 3) counts hits and records the frame's RIP; after `int3`
#     (opcode 0xcc) there must be exactly one hit, the recorded RIP must be the address of the
#     next instruction, and rbx/r12 must be unchanged.
# fnclex: CR0.EM=0, CR0.TS=0, CR0.MP=1, CR4.OSFXSR|OSXMMEXCPT; fninit; fxsave; the saved FSW
#     is set to 0x007f (IE DE ZE OE UE PE SF; all masked by fninit's FCW 0x037f, ES=0) and
#     fxrstor'd; FSW read back with fxsave must be 0x007f; fnclex; FSW (fxsave again) & 0x80ff
#     (flags, SF, ES, B) must be 0. FSW is read with FXSAVE, not FNSTSW: this KVM cannot
#     emulate `fnstsw %ax` (DF E0) at CPL0 either (measured), while FNINIT, FXSAVE and FXRSTOR
#     emulate fine.
# fnstsw: after fxrstor of FSW = 0x0001 (IE, masked), `fnstsw %ax` (DF E0) and `fnstsw m16`
#     (DD /7) must both read 0x0001.
# fnstcw / fldcw: `fldcw m16` of 0x027f, then `fnstcw m16` must read 0x027f.
# fwait: with IE pending but masked (FCW 0x037f), `fwait` (9B) does nothing; with IE pending
#     and unmasked (FCW 0x037e, FSW 0x0081), `fwait` raises #MF (vector 16, a fault: the
#     handler sees RIP at the fwait); the handler counts it and clears the flags (fnclex), and
#     the retried fwait passes: exactly one #MF. Linux's fpu__drop() runs `fwait`.
#     "<what>" for these: "value=<hex>" or "mf=<n>".
# xrstor: not tested (needs CR4.OSXSAVE and XCR0, and the platform hides XSAVE).

.include "defs.inc"

.text
.globl main
main:
        mov     $3, %edi
        lea     bp_handler(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate

        # ------------------------------------------------------------ popcnt
        lea     name_popcnt(%rip), %r15
        xor     %r14d, %r14d                    # case number
        lea     pc_cases(%rip), %rbx
1:      mov     0(%rbx), %rdi
        mov     8(%rbx), %rsi                   # expected
        mov     $-1, %rax
        popcnt  %rdi, %rax
        call    check_popcnt
        add     $16, %rbx
        inc     %r14
        cmp     $5, %r14
        jne     1b
        mov     $0xffffffff00000003, %rdi       # case 5
        mov     $-1, %rax
        popcnt  %edi, %eax
        mov     $2, %esi
        call    check_popcnt
        inc     %r14
        mov     $0xffff, %edi                   # case 6
        mov     $0x1111111111111111, %rax
        popcnt  %di, %ax
        mov     $0x1111111111110010, %rsi
        call    check_popcnt
        inc     %r14
        mov     $0xf0, %edi                     # case 7 (for the ZF check)
        mov     $-1, %rax
        popcnt  pc_mem(%rip), %rax
        mov     $4, %esi
        call    check_popcnt
        call    print_ok

        # ------------------------------------------------------------ stac, clac
        lea     name_stac(%rip), %r15
        stac
        pushfq
        pop     %rax
        bt      $18, %rax
        jnc     fail_ac
        call    print_ok
        lea     name_clac(%rip), %r15
        clac
        pushfq
        pop     %rax
        bt      $18, %rax
        jc      fail_ac
        call    print_ok

        # ------------------------------------------------------------ int3
        lea     name_int3(%rip), %r15
        mov     $0x5a5a5a5a5a5a5a5a, %rbx
        mov     $0xa5a5a5a5a5a5a5a5, %r12
        int3
after_int3:
        cmpq    $1, bp_hits(%rip)
        lea     what_nottaken(%rip), %rdi
        jne     fail
        lea     after_int3(%rip), %rax
        cmp     %rax, bp_rip(%rip)
        lea     what_rip(%rip), %rdi
        jne     fail
        mov     $0x5a5a5a5a5a5a5a5a, %rax
        cmp     %rax, %rbx
        lea     what_regs(%rip), %rdi
        jne     fail
        mov     $0xa5a5a5a5a5a5a5a5, %rax
        cmp     %rax, %r12
        jne     fail
        call    print_ok

        # ------------------------------------------------------------ fnclex
        lea     name_fnclex(%rip), %r15
        mov     %cr0, %rax
        and     $~0xc, %rax                     # EM=0, TS=0
        or      $0x2, %rax                      # MP=1
        mov     %rax, %cr0
        mov     %cr4, %rax
        or      $0x600, %rax                    # OSFXSR, OSXMMEXCPT
        mov     %rax, %cr4
        fninit
        lea     fxarea(%rip), %rbx
        fxsave  (%rbx)
        movw    $0x007f, 2(%rbx)                # FSW
        fxrstor (%rbx)
        movw    $0, 2(%rbx)
        fxsave  (%rbx)                          # read FSW back (not fnstsw: see the top)
        movzwl  2(%rbx), %eax
        cmp     $0x007f, %ax
        jne     fail_fsw_setup
        fnclex
        fxsave  (%rbx)
        movzwl  2(%rbx), %eax
        test    $0x80ff, %ax
        jnz     fail_fsw
        call    print_ok

        # ------------------------------------------------------------ fnstsw
        lea     name_fnstsw(%rip), %r15
        movw    $0x037f, 0(%rbx)                # FCW: all masked
        movw    $0x0001, 2(%rbx)                # FSW: IE
        fxrstor (%rbx)
        mov     $0xffff, %eax
        fnstsw  %ax
        cmp     $0x0001, %ax
        jne     fail_value
        movw    $0xffff, x87word(%rip)
        fnstsw  x87word(%rip)
        movzwl  x87word(%rip), %eax
        cmp     $0x0001, %ax
        jne     fail_value
        call    print_ok

        # ------------------------------------------------------------ fnstcw / fldcw
        lea     name_fnstcw(%rip), %r15
        movw    $0xffff, x87word(%rip)
        fnstcw  x87word(%rip)
        movzwl  x87word(%rip), %eax
        cmp     $0x037f, %ax
        jne     fail_value
        call    print_ok
        lea     name_fldcw(%rip), %r15
        movw    $0x027f, x87word(%rip)
        fldcw   x87word(%rip)
        movw    $0, x87word(%rip)
        fnstcw  x87word(%rip)
        movzwl  x87word(%rip), %eax
        cmp     $0x027f, %ax
        jne     fail_value
        call    print_ok

        # ------------------------------------------------------------ fwait
        lea     name_fwait(%rip), %r15
        mov     $16, %edi
        lea     mf_handler(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        movw    $0x037f, 0(%rbx)                # masked: fwait is a no-op
        movw    $0x0001, 2(%rbx)
        fxrstor (%rbx)
        fwait
        cmpq    $0, mf_hits(%rip)
        jne     fail_mf
        movw    $0x037e, 0(%rbx)                # IE unmasked and pending: #MF
        movw    $0x0081, 2(%rbx)
        fxrstor (%rbx)
        fwait
        cmpq    $1, mf_hits(%rip)
        jne     fail_mf
        call    print_ok

        lea     msg_all(%rip), %rdi
        call    print_str
        xor     %edi, %edi
        call    exit

# check_popcnt: rax = result, rsi = expected, rdi = source (ZF must be source == 0; the
# flags are still those of popcnt here)
check_popcnt:
        pushfq
        cmp     %rsi, %rax
        jne     1f
        pop     %rax
        shr     $6, %eax                        # ZF
        and     $1, %eax
        xor     %ecx, %ecx
        test    %rdi, %rdi
        sete    %cl
        cmp     %ecx, %eax
        jne     2f
        ret
1:      pop     %rax
2:      lea     name_popcnt(%rip), %r15
        lea     what_case(%rip), %rdi
        call    fail_start
        mov     %r14, %rdi
        call    print_dec
        jmp     fail_end

fail_ac:
        lea     what_ac(%rip), %rdi
        jmp     fail
fail_fsw_setup:
        movzwl  %ax, %ebx
        lea     what_setup(%rip), %rdi
        jmp     1f
fail_fsw:
        movzwl  %ax, %ebx
        lea     what_fsw(%rip), %rdi
1:      call    fail_start
        mov     %rbx, %rdi
        mov     $4, %esi
        call    print_hex_n
        jmp     fail_end

fail_value:
        movzwl  %ax, %ebx
        lea     what_value(%rip), %rdi
        jmp     1b
fail_mf:
        mov     mf_hits(%rip), %rbx
        lea     what_mf(%rip), %rdi
        jmp     1b

# fail(rdi = what): "insns error: <name r15> <what>\n", exit 1
fail:
        call    fail_start
fail_end:
        mov     $'\n', %edi
        call    putc
        mov     $EXIT_FAIL, %edi
        call    exit
fail_start:
        push    %rdi
        lea     msg_err(%rip), %rdi
        call    print_str
        mov     %r15, %rdi
        call    print_str
        mov     $' ', %edi
        call    putc
        pop     %rdi
        call    print_str
        ret

# print_ok: "insn <name r15> ok\n"
print_ok:
        lea     msg_insn(%rip), %rdi
        call    print_str
        mov     %r15, %rdi
        call    print_str
        lea     msg_ok(%rip), %rdi
        call    print_str
        ret

# #MF: a fault at the fwait; clear the exception flags so the retried fwait passes
mf_handler:
        incq    mf_hits(%rip)
        fnclex
        iretq

# #BP: a trap, the frame's RIP is the next instruction
bp_handler:
        push    %rax
        incq    bp_hits(%rip)
        mov     8(%rsp), %rax
        mov     %rax, bp_rip(%rip)
        pop     %rax
        iretq

.section .rodata
.balign 8
pc_cases:
        .quad 0, 0
        .quad 1, 1
        .quad 0xffffffffffffffff, 64
        .quad 0x8000000000000001, 2
        .quad 0x123456789abcdef0, 32
pc_mem:
        .quad 0xf0
name_popcnt:   .asciz "popcnt"
name_stac:     .asciz "stac"
name_clac:     .asciz "clac"
name_int3:     .asciz "int3"
name_fnclex:   .asciz "fnclex"
name_fnstsw:   .asciz "fnstsw"
name_fnstcw:   .asciz "fnstcw"
name_fldcw:    .asciz "fldcw"
name_fwait:    .asciz "fwait"
what_value:    .asciz "value="
what_mf:       .asciz "mf="
msg_insn:      .asciz "insn "
msg_ok:        .asciz " ok\n"
msg_all:       .asciz "insns ok\n"
msg_err:       .asciz "insns error: "
what_case:     .asciz "case "
what_ac:       .asciz "ac"
what_nottaken: .asciz "not taken"
what_rip:      .asciz "rip"
what_regs:     .asciz "regs"
what_setup:    .asciz "setup fsw="
what_fsw:      .asciz "fsw="

.bss
.balign 16
fxarea:   .fill 512, 1, 0
bp_hits:  .quad 0
mf_hits:  .quad 0
x87word:  .quad 0
bp_rip:   .quad 0
