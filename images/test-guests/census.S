# census: the instruction census. Executes at CPL0, one after another, the instructions a
# distribution kernel may run (integer, bit manipulation, x87, SSE and MXCSR, atomics,
# fences and cache control, descriptor-table, segment and MSR instructions, time and random
# sources), each with its architectural result checked, and reports what happened to each.
# It runs on whatever the CPU offers, whatever CPUID says: which of these a guest kernel may
# use is the VMM's business (its CPUID table and command-line profile), which of them this
# host's KVM and the VMM can execute is what the census measures (docs/CENSUS.md).
#
# Serial output, one line per instruction, then `census done\n` and exit status 0:
#     census: <index> <name> ok\n             the result is the one the SDM gives
#     census: <index> <name> wrong <hex>\n    it executed, with this (wrong) result
#     census: <index> <name> fault <vector>\n it raised exception <vector> (decimal), e.g. 6
#                                             (#UD) for an instruction whose enabling control
#                                             bit is off; an entry that expects a fault says
#                                             `ok` when exactly that one comes
# An instruction that neither KVM nor the VMM can complete stops the VM in the middle of its
# line (`census: <index> <name> ` and no result): the VMM names it on stderr. To go on past
# it, boot again with `census.from=<index + 1>` on the command line (the test does that).
#
# Setup before the first entry: CR0.EM=0, TS=0, MP=1, NE=1; CR4 |= OSFXSR|OSXMMEXCPT;
# fninit; MXCSR 0x1f80. Every entry may clobber every register but %rsp; the loop keeps its
# state in memory. Faults (vectors 0, 6, 7, 13, 14, 16, 17, 19) go to a handler that records
# the vector and resumes the loop with the stack as it was before the entry.

.include "defs.inc"

.equ BOOT_PARAMS,  0x7000
.equ CMDLINE_PTR,  BOOT_PARAMS + 0x228
.equ NO_FAULT,     0xff
.equ MSR_GS_BASE,  0xc0000101
.equ MSR_KGS_BASE, 0xc0000102

# One table entry: name, code, expected %rax, expected fault vector (NO_FAULT: none).
.macro ENTRY name, code, expect, fault=NO_FAULT
        .pushsection .rodata.census,"a",@progbits
        .quad   9f, \code, \expect, \fault
        .popsection
        .pushsection .rodata.names,"a",@progbits
9:      .asciz  "\name"
        .popsection
.endm

.section .rodata.census,"a",@progbits
.balign 8
census_table:
# Filled by the ENTRY lines below, in order; ended by census_end.

.text
.globl main
main:
        # fault handlers
        .irp v, 0, 6, 7, 16, 19
        mov     $\v, %edi
        lea     fault_noerr_\v(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        .endr
        .irp v, 13, 14, 17
        mov     $\v, %edi
        lea     fault_err_\v(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        .endr
        mov     $3, %edi
        lea     bp_handler(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        call    fpu_on
        call    parse_from
        mov     %rax, cur(%rip)

next:   mov     cur(%rip), %rax
        shl     $5, %rax
        lea     census_table(%rip), %rbx
        add     %rax, %rbx
        lea     census_end(%rip), %rax
        cmp     %rax, %rbx
        jae     done
        mov     %rbx, cur_entry(%rip)
        lea     msg_census(%rip), %rdi
        call    print_str
        mov     cur(%rip), %rdi
        call    print_dec
        mov     $' ', %edi
        call    putc
        mov     0(%rbx), %rdi
        call    print_str
        mov     $' ', %edi
        call    putc
        movq    $NO_FAULT, fault_vec(%rip)
        mov     %rsp, recover_rsp(%rip)
        call    *8(%rbx)
        mov     cur_entry(%rip), %rbx
        mov     16(%rbx), %rcx
        cmpq    $NO_FAULT, 24(%rbx)
        jne     unfaulted                       # a fault was expected and did not come
        cmp     %rcx, %rax
        jne     wrong
ok:     lea     msg_ok(%rip), %rdi
        call    print_str
        jmp     advance
wrong:  mov     %rax, %r12
        lea     msg_wrong(%rip), %rdi
        call    print_str
        mov     %r12, %rdi
        call    print_hex
        mov     $'\n', %edi
        call    putc
        jmp     advance
unfaulted:
        lea     msg_nofault(%rip), %rdi
        call    print_str
        jmp     advance
recover:                                        # from fault_common, %rsp = recover_rsp
        call    fpu_on                          # an x87/SSE fault may leave state behind
        mov     cur_entry(%rip), %rbx
        mov     fault_vec(%rip), %rax
        cmp     24(%rbx), %rax
        je      ok
        lea     msg_fault(%rip), %rdi
        call    print_str
        mov     fault_vec(%rip), %rdi
        call    print_dec
        mov     $'\n', %edi
        call    putc
advance:
        incq    cur(%rip)
        jmp     next
done:   lea     msg_done(%rip), %rdi
        call    print_str
        xor     %eax, %eax
        ret

# Enables x87 and SSE: CR0.EM=0, TS=0, MP=1, NE=1; CR4.OSFXSR|OSXMMEXCPT; fninit; MXCSR
# default (through FXRSTOR of a clean area, not LDMXCSR, which is one of the entries).
fpu_on:
        mov     %cr0, %rax
        and     $~0xc, %rax
        or      $0x22, %rax
        mov     %rax, %cr0
        mov     %cr4, %rax
        or      $0x600, %rax
        mov     %rax, %cr4
        fninit
        lea     fx_clean(%rip), %rax
        fxrstor (%rax)
        ret

# %rax = N from `census.from=N` on the command line (boot_params.cmd_line_ptr), else 0.
parse_from:
        mov     CMDLINE_PTR, %esi
        xor     %eax, %eax
        test    %esi, %esi
        jz      9f
        cmp     $0x10000000, %esi               # not a pointer into RAM (QEMU: no boot_params)
        jae     9f
        mov     $2048, %ecx
1:      lea     key_from(%rip), %rdi
        mov     %rsi, %rdx
2:      movzbl  (%rdi), %r8d
        test    %r8d, %r8d
        jz      3f                              # the whole key matched at %rsi
        cmpb    (%rdx), %r8b
        jne     4f
        inc     %rdi
        inc     %rdx
        jmp     2b
3:      movzbl  (%rdx), %r8d                    # digits
        sub     $'0', %r8d
        cmp     $9, %r8d
        ja      9f
        imul    $10, %rax, %rax
        add     %r8, %rax
        inc     %rdx
        jmp     3b
4:      cmpb    $0, (%rsi)
        je      9f
        inc     %rsi
        dec     %ecx
        jnz     1b
9:      ret

# ---------------------------------------------------------------- fault handlers
.irp v, 0, 6, 7, 16, 19
fault_noerr_\v:
        movq    $\v, fault_vec(%rip)
        jmp     fault_common
.endr
.irp v, 13, 14, 17
fault_err_\v:
        add     $8, %rsp                        # the error code
        movq    $\v, fault_vec(%rip)
        jmp     fault_common
.endr
fault_common:                                   # frame: RIP, CS, RFLAGS, RSP, SS
        lea     recover(%rip), %rax
        mov     %rax, 0(%rsp)
        mov     recover_rsp(%rip), %rax
        mov     %rax, 24(%rsp)
        andq    $~0x40000, 16(%rsp)             # AC off again
        iretq

bp_handler:
        incq    bp_hits(%rip)
        iretq

# ================================================================ the entries
# Integer and atomics ------------------------------------------------------------------------
ENTRY xadd, t_xadd, 0x0000000500000008
t_xadd: movl    $5, scratch(%rip)
        mov     $3, %eax
        lock xadd %eax, scratch(%rip)
        shl     $32, %rax
        mov     scratch(%rip), %ecx
        or      %rcx, %rax                      # old value : new value
        ret

ENTRY cmpxchg, t_cmpxchg, 9
t_cmpxchg:
        movq    $7, scratch(%rip)
        mov     $7, %eax
        mov     $9, %ecx
        lock cmpxchg %rcx, scratch(%rip)
        jnz     1f
        mov     scratch(%rip), %rax
        ret
1:      mov     $-1, %rax
        ret

ENTRY cmpxchg8b, t_cmpxchg8b, 0x0000000400000003
t_cmpxchg8b:
        mov     $0x0000000200000001, %rax
        mov     %rax, scratch(%rip)
        mov     $1, %eax
        mov     $2, %edx
        mov     $3, %ebx
        mov     $4, %ecx
        lock cmpxchg8b scratch(%rip)
        jnz     1f
        mov     $9, %eax                        # failing compare: loads the value
        mov     $9, %edx
        lock cmpxchg8b scratch(%rip)
        jz      1f
        shl     $32, %rdx
        or      %rdx, %rax
        ret
1:      mov     $-1, %rax
        ret

ENTRY cmpxchg16b, t_cmpxchg16b, 0x0000000400000003
t_cmpxchg16b:
        lea     scratch16(%rip), %rsi
        movq    $1, 0(%rsi)
        movq    $2, 8(%rsi)
        mov     $1, %eax
        mov     $2, %edx
        mov     $3, %ebx
        mov     $4, %ecx
        lock cmpxchg16b (%rsi)
        jnz     1f
        cmpq    $3, 0(%rsi)
        jne     1f
        xor     %eax, %eax                      # failing compare: loads the value
        xor     %edx, %edx
        lock cmpxchg16b (%rsi)
        jz      1f
        shl     $32, %rdx
        or      %rdx, %rax
        ret
1:      mov     $-1, %rax
        ret

ENTRY cmpxchg16b-unaligned, t_cmpxchg16b_gp, 0, 13
t_cmpxchg16b_gp:
        lea     scratch16+8(%rip), %rsi
        lock cmpxchg16b (%rsi)
        ret

ENTRY xchg, t_xchg, 0x1111
t_xchg: movq    $0x1111, scratch(%rip)
        mov     $0x2222, %eax
        xchg    %rax, scratch(%rip)
        ret

ENTRY lock-bts, t_lockbts, 0x80000001
t_lockbts:
        movq    $1, scratch(%rip)
        lock btsq $31, scratch(%rip)
        mov     scratch(%rip), %rax
        ret

ENTRY bswap, t_bswap, 0x0807060504030201
t_bswap:
        mov     $0x0102030405060708, %rax
        bswap   %rax
        ret

ENTRY movbe, t_movbe, 0x0807060504030201
t_movbe:
        mov     $0x0102030405060708, %rax
        mov     %rax, scratch(%rip)
        movbe   scratch(%rip), %rax
        ret

ENTRY bsr, t_bsr, 40
t_bsr:  mov     $0x10000000000, %rcx
        bsr     %rcx, %rax
        ret

ENTRY shld, t_shld, 0x2345678f
t_shld: mov     $0x12345678, %eax
        mov     $0xf0000000, %ecx
        shld    $4, %ecx, %eax
        ret

ENTRY div, t_div, 0x0000000300000007
t_div:  xor     %edx, %edx
        mov     $45, %eax
        mov     $6, %ecx
        div     %rcx                            # 7 remainder 3
        shl     $32, %rdx
        or      %rdx, %rax
        ret

ENTRY div-by-zero, t_div0, 0, 0
t_div0: xor     %ecx, %ecx
        div     %rcx
        ret

ENTRY rep-movsb, t_repmovsb, 0x0102030405060708
t_repmovsb:
        mov     $0x0102030405060708, %rax
        mov     %rax, scratch(%rip)
        lea     scratch(%rip), %rsi
        lea     scratch2(%rip), %rdi
        mov     $8, %ecx
        cld
        rep movsb
        mov     scratch2(%rip), %rax
        ret

ENTRY rep-stosq, t_repstosq, 0x5a5a5a5a5a5a5a5a
t_repstosq:
        mov     $0x5a5a5a5a5a5a5a5a, %rax
        lea     scratch2(%rip), %rdi
        mov     $2, %ecx
        rep stosq
        mov     scratch2+8(%rip), %rax
        ret

# Bit manipulation (ABM, BMI1, BMI2) and CRC32 -----------------------------------------------
ENTRY popcnt, t_popcnt, 16
t_popcnt:
        mov     $0xff00ff, %ecx
        popcnt  %rcx, %rax
        ret

ENTRY lzcnt, t_lzcnt, 63
t_lzcnt:
        mov     $1, %ecx
        lzcnt   %rcx, %rax
        ret

ENTRY tzcnt, t_tzcnt, 64
t_tzcnt:
        xor     %ecx, %ecx
        tzcnt   %rcx, %rax                      # BSF would leave %rax alone (and set ZF)
        ret

ENTRY andn, t_andn, 0x0f00
t_andn: mov     $0xf0ff, %ecx
        mov     $0xff00, %edx
        andn    %rdx, %rcx, %rax                # ~rcx & rdx
        ret

ENTRY bextr, t_bextr, 0x34
t_bextr:
        mov     $0x12345, %ecx
        mov     $0x0804, %edx                   # start 4, length 8
        bextr   %rdx, %rcx, %rax
        ret

ENTRY blsr, t_blsr, 8
t_blsr: mov     $12, %ecx
        blsr    %rcx, %rax
        ret

ENTRY shlx, t_shlx, 0x500
t_shlx: mov     $5, %ecx
        mov     $8, %edx
        shlx    %rdx, %rcx, %rax
        ret

ENTRY rorx, t_rorx, 0x8811223344556677
t_rorx: mov     $0x1122334455667788, %rcx
        rorx    $8, %rcx, %rax
        ret

ENTRY pext, t_pext, 0x12
t_pext: mov     $0x1234, %ecx
        mov     $0xff00, %edx
        pext    %rdx, %rcx, %rax
        ret

ENTRY mulx, t_mulx, 0x0000000000000001
t_mulx: mov     $0x8000000000000000, %rdx
        mov     $2, %ecx
        mulx    %rcx, %rbx, %rax                # high half
        ret

ENTRY crc32, t_crc32, 0xc1d04330
t_crc32:
        mov     $0xffffffff, %eax
        mov     $0x61, %cl                      # CRC-32C of "a"
        crc32b  %cl, %eax
        not     %eax
        ret

# x87 ------------------------------------------------------------------------------------------
ENTRY fninit, t_fninit, 0
t_fninit:
        fninit
        xor     %eax, %eax
        ret

ENTRY fld1-faddp-fistp, t_fadd, 2
t_fadd: fninit
        fld1
        fld1
        faddp
        fistpl  scratch(%rip)
        mov     scratch(%rip), %eax
        ret

ENTRY fnstsw, t_fnstsw, 0
t_fnstsw:
        fninit
        mov     $-1, %eax
        fnstsw  %ax
        movzwl  %ax, %eax
        ret

ENTRY fnstcw-fldcw, t_fldcw, 0x027f
t_fldcw:
        movw    $0x027f, scratch(%rip)
        fldcw   scratch(%rip)
        movw    $0, scratch(%rip)
        fnstcw  scratch(%rip)
        movzwl  scratch(%rip), %eax
        ret

ENTRY fnclex, t_fnclex, 0
t_fnclex:
        fninit
        fnclex
        xor     %eax, %eax
        ret

ENTRY fwait, t_fwait, 0
t_fwait:
        fninit
        fwait
        xor     %eax, %eax
        ret

ENTRY fxsave-fxrstor, t_fxsave, 0x1f80
t_fxsave:
        lea     fx_area(%rip), %rax
        fxsave  (%rax)
        fxrstor (%rax)
        mov     24(%rax), %eax                  # MXCSR
        ret

ENTRY fxsave64, t_fxsave64, 0x1f80
t_fxsave64:
        lea     fx_area(%rip), %rax
        fxsave64 (%rax)
        fxrstor64 (%rax)
        mov     24(%rax), %eax
        ret

ENTRY fnsave-frstor, t_fnsave, 0x037f
t_fnsave:
        fninit
        lea     fx_area(%rip), %rax
        fnsave  (%rax)
        frstor  (%rax)
        movzwl  (%rax), %eax                    # FCW
        ret

# SSE and MXCSR ----------------------------------------------------------------------------
ENTRY ldmxcsr-stmxcsr, t_mxcsr, 0x9fc0
t_mxcsr:
        movl    $0x9fc0, scratch(%rip)          # FZ, all masked, DAZ
        ldmxcsr scratch(%rip)
        movl    $0, scratch(%rip)
        stmxcsr scratch(%rip)
        movl    $0x1f80, scratch2(%rip)
        ldmxcsr scratch2(%rip)
        mov     scratch(%rip), %eax
        ret

ENTRY ldmxcsr-reserved, t_mxcsr_gp, 0, 13
t_mxcsr_gp:
        movl    $0x10000, scratch(%rip)
        ldmxcsr scratch(%rip)
        ret

ENTRY movd-xmm, t_movd, 0x12345678
t_movd: mov     $0x12345678, %ecx
        movd    %ecx, %xmm15
        movd    %xmm15, %eax
        ret

ENTRY movq-xmm, t_movq, 0x123456789abcdef0
t_movq: mov     $0x123456789abcdef0, %rcx
        movq    %rcx, %xmm1
        movq    %xmm1, %rax
        ret

ENTRY movdqu, t_movdqu, 0x0102030405060708
t_movdqu:
        mov     $0x0102030405060708, %rax
        mov     %rax, scratch16(%rip)
        movdqu  scratch16(%rip), %xmm2
        movdqu  %xmm2, scratch2(%rip)
        mov     scratch2(%rip), %rax
        ret

ENTRY movaps, t_movaps, 0x0102030405060708
t_movaps:
        mov     $0x0102030405060708, %rax
        mov     %rax, scratch16(%rip)
        movaps  scratch16(%rip), %xmm3
        movq    %xmm3, %rax
        ret

ENTRY pxor, t_pxor, 0
t_pxor: pxor    %xmm4, %xmm4
        movq    %xmm4, %rax
        ret

ENTRY paddd, t_paddd, 0x0000000300000003
t_paddd:
        mov     $0x0000000100000002, %rax
        movq    %rax, %xmm5
        mov     $0x0000000200000001, %rax
        movq    %rax, %xmm6
        paddd   %xmm6, %xmm5
        movq    %xmm5, %rax
        ret

ENTRY pshufd, t_pshufd, 0x0000000100000002
t_pshufd:
        mov     $0x0000000200000001, %rax
        movq    %rax, %xmm7
        pshufd  $0xe1, %xmm7, %xmm8             # swap dwords 0 and 1
        movq    %xmm8, %rax
        ret

ENTRY pcmpeqb-pmovmskb, t_pmovmskb, 0xffff
t_pmovmskb:
        pcmpeqb %xmm9, %xmm9
        pmovmskb %xmm9, %eax
        ret

ENTRY addsd-cvtsd2si, t_addsd, 3
t_addsd:
        mov     $1, %eax
        cvtsi2sd %eax, %xmm10
        mov     $2, %eax
        cvtsi2sd %eax, %xmm11
        addsd   %xmm11, %xmm10
        cvtsd2si %xmm10, %eax
        ret

ENTRY pshufb-ssse3, t_pshufb, 0x0807060504030201
t_pshufb:
        mov     $0x0102030405060708, %rax
        movq    %rax, %xmm12
        mov     $0x0001020304050607, %rax
        movq    %rax, %xmm13
        pshufb  %xmm13, %xmm12
        movq    %xmm12, %rax
        ret

ENTRY pinsrd-sse41, t_pinsrd, 0x0000000700000000
t_pinsrd:
        pxor    %xmm14, %xmm14
        mov     $7, %ecx
        pinsrd  $1, %ecx, %xmm14
        movq    %xmm14, %rax
        ret

ENTRY pcmpestri-sse42, t_pcmpestri, 2
t_pcmpestri:
        mov     $0x0000000000636261, %rax       # "abc"
        movq    %rax, %xmm0
        mov     $0x0000000000000063, %rax       # "c"
        movq    %rax, %xmm1
        mov     $1, %eax
        mov     $3, %edx
        pcmpestri $0x0c, %xmm0, %xmm1           # equal ordered: "c" in "abc" at 2
        mov     %ecx, %eax
        ret

ENTRY aesenc, t_aesenc, 0x6363636363636363
t_aesenc:
        pxor    %xmm0, %xmm0
        pxor    %xmm1, %xmm1
        aesenclast %xmm1, %xmm0                 # SubBytes(0) = 0x63, no MixColumns
        movq    %xmm0, %rax
        ret

ENTRY pclmulqdq, t_pclmul, 0x5
t_pclmul:
        mov     $3, %eax
        movq    %rax, %xmm0
        movq    %rax, %xmm1
        pclmulqdq $0, %xmm1, %xmm0              # 3 x 3 carry-less = 5
        movq    %xmm0, %rax
        ret

ENTRY xgetbv, t_xgetbv, 0, 6
t_xgetbv:                                       # CR4.OSXSAVE is clear: #UD
        xor     %ecx, %ecx
        xgetbv
        xor     %eax, %eax
        ret

# Fences, cache and TLB control --------------------------------------------------------------
ENTRY mfence-lfence-sfence, t_fences, 0
t_fences:
        mfence
        lfence
        sfence
        xor     %eax, %eax
        ret

ENTRY pause-nopl, t_pause, 0
t_pause:
        pause
        nopl    0(%rax,%rax,1)
        xor     %eax, %eax
        ret

ENTRY clflush, t_clflush, 0
t_clflush:
        clflush scratch(%rip)
        xor     %eax, %eax
        ret

ENTRY clflushopt, t_clflushopt, 0
t_clflushopt:
        clflushopt scratch(%rip)
        xor     %eax, %eax
        ret

ENTRY clwb, t_clwb, 0
t_clwb: clwb    scratch(%rip)
        xor     %eax, %eax
        ret

ENTRY prefetcht0-prefetchw, t_prefetch, 0
t_prefetch:
        prefetcht0 scratch(%rip)
        prefetchw scratch(%rip)
        xor     %eax, %eax
        ret

ENTRY invlpg, t_invlpg, 0
t_invlpg:
        invlpg  scratch(%rip)
        xor     %eax, %eax
        ret

ENTRY wbinvd, t_wbinvd, 0
t_wbinvd:
        wbinvd
        xor     %eax, %eax
        ret

# Control, descriptor-table, segment and MSR instructions ------------------------------------
ENTRY mov-cr0-cr4, t_movcr, 0
t_movcr:
        mov     %cr0, %rax
        mov     %rax, %cr0
        mov     %cr4, %rax
        mov     %rax, %cr4
        xor     %eax, %eax
        ret

ENTRY mov-cr3, t_movcr3, 0
t_movcr3:
        mov     %cr3, %rax
        mov     %rax, %cr3
        xor     %eax, %eax
        ret

ENTRY mov-dr7, t_movdr, 0
t_movdr:
        mov     %dr7, %rax
        xor     %eax, %eax
        ret

ENTRY smsw-lmsw-clts, t_smsw, 0x33
t_smsw: smsw    %eax
        lmsw    %ax
        clts
        smsw    %eax
        and     $0x3f, %eax                     # PE MP ET NE (TS clear)
        ret

ENTRY sgdt-lgdt, t_sgdt, 0
t_sgdt: sgdt    scratch(%rip)
        lgdt    scratch(%rip)
        xor     %eax, %eax
        ret

ENTRY sidt-lidt, t_sidt, 0
t_sidt: sidt    scratch(%rip)
        lidt    scratch(%rip)
        xor     %eax, %eax
        ret

ENTRY sldt-str, t_str, TSS_SEL
t_str:  sldt    %ax
        str     %ax
        movzwl  %ax, %eax
        ret

ENTRY lsl, t_lsl, 0xffffffff
t_lsl:  mov     $KERNEL_DS, %ecx
        mov     $-1, %rax
        lsl     %ecx, %eax                      # flat data segment: 4 GiB - 1
        jnz     1f
        ret
1:      mov     $-1, %rax
        ret

ENTRY lar, t_lar, 0x00c09200
t_lar:  mov     $KERNEL_DS, %ecx
        lar     %ecx, %eax                      # G, D/B, P, DPL0, data read/write
        jnz     1f
        and     $~0x100, %eax                   # the accessed bit, whatever the CPU set
        ret
1:      mov     $-1, %rax
        ret

ENTRY verr-verw, t_verw, 0x010100
t_verw: xor     %eax, %eax
        mov     $KERNEL_DS, %ecx
        verw    %cx                             # writable data: ZF=1
        setnz   %al
        mov     $KERNEL_CS, %ecx
        verw    %cx                             # code is never writable: ZF=0
        setnz   %ah
        verr    %cx                             # readable code: ZF=1
        setnz   %dl
        xor     %ecx, %ecx
        verr    %cx                             # the null selector: ZF=0
        setnz   %cl
        movzbl  %dl, %edx
        shl     $8, %edx
        or      %edx, %eax
        shl     $16, %ecx
        or      %ecx, %eax
        ret

ENTRY mov-sreg, t_movseg, KERNEL_DS
t_movseg:
        mov     %ds, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %ss, %eax
        mov     %eax, %ss
        mov     %es, %eax
        ret

ENTRY swapgs, t_swapgs, 0x1234
t_swapgs:
        mov     $MSR_KGS_BASE, %ecx
        mov     $0x1234, %eax
        xor     %edx, %edx
        wrmsr
        swapgs
        mov     $MSR_GS_BASE, %ecx
        rdmsr
        swapgs
        ret

ENTRY wrmsr-rdmsr, t_msr, 0x00000001deadbeef
t_msr:  mov     $MSR_KGS_BASE, %ecx
        mov     $0xdeadbeef, %eax
        mov     $1, %edx
        wrmsr
        xor     %eax, %eax
        xor     %edx, %edx
        rdmsr
        shl     $32, %rdx
        or      %rdx, %rax
        ret

ENTRY rdfsbase, t_rdfsbase, 0
t_rdfsbase:
        rdfsbase %rax
        xor     %eax, %eax
        ret

ENTRY lret, t_lret, 0
t_lret: lea     1f(%rip), %rax
        pushq   $KERNEL_CS
        push    %rax
        lretq
1:      xor     %eax, %eax
        ret

ENTRY iretq, t_iretq, 0
t_iretq:
        mov     %ss, %eax
        mov     %rsp, %rcx
        push    %rax
        push    %rcx
        pushfq
        pushq   $KERNEL_CS
        lea     1f(%rip), %rax
        push    %rax
        iretq
1:      xor     %eax, %eax
        ret

ENTRY pushf-popf, t_popf, 0x40000
t_popf: pushfq
        orq     $0x40000, (%rsp)                # AC
        popfq
        pushfq
        pop     %rax
        and     $0x40000, %eax
        pushfq
        andq    $~0x40000, (%rsp)
        popfq
        ret

ENTRY stac-clac, t_stac, 0x40000
t_stac: stac
        pushfq
        pop     %rax
        clac
        pushfq
        pop     %rcx
        and     $0x40000, %eax
        and     $0x40000, %ecx
        or      %rcx, %rax                      # AC after stac, not after clac
        ret

ENTRY int3, t_int3, 1
t_int3: movq    $0, bp_hits(%rip)
        int3
        mov     bp_hits(%rip), %rax
        ret

ENTRY ud2, t_ud2, 0, 6
t_ud2:  ud2

ENTRY cpuid, t_cpuid, 0
t_cpuid:
        xor     %eax, %eax
        xor     %ecx, %ecx
        cpuid
        xor     %eax, %eax
        ret

# Time and random sources (the platform hides them; executed to see what this KVM does) -------
ENTRY rdtsc, t_rdtsc, 0
t_rdtsc:
        rdtsc
        xor     %eax, %eax
        ret

ENTRY rdtscp, t_rdtscp, 0
t_rdtscp:
        rdtscp
        xor     %eax, %eax
        ret

ENTRY rdpid, t_rdpid, 0
t_rdpid:
        rdpid   %rax
        xor     %eax, %eax
        ret

ENTRY rdrand, t_rdrand, 0
t_rdrand:
        rdrand  %rax
        xor     %eax, %eax
        ret

ENTRY rdseed, t_rdseed, 0
t_rdseed:
        rdseed  %rax
        xor     %eax, %eax
        ret

ENTRY rdpkru, t_rdpkru, 0
t_rdpkru:
        xor     %ecx, %ecx
        rdpkru
        xor     %eax, %eax
        ret

.section .rodata.census,"a",@progbits
census_end:

.section .rodata
msg_census:  .asciz "census: "
msg_ok:      .asciz "ok\n"
msg_wrong:   .asciz "wrong "
msg_fault:   .asciz "fault "
msg_nofault: .asciz "wrong no-fault\n"
msg_done:    .asciz "census done\n"
key_from:    .asciz "census.from="

.data
.balign 64
scratch16:   .quad 0, 0
scratch:     .quad 0, 0
scratch2:    .quad 0, 0
cur:         .quad 0
cur_entry:   .quad 0
fault_vec:   .quad 0
recover_rsp: .quad 0
bp_hits:     .quad 0
.balign 16
fx_clean:    .word 0x037f, 0, 0, 0
             .quad 0, 0
             .long 0x1f80, 0xffff
             .fill 512 - 32, 1, 0
.balign 16
fx_area:     .fill 512, 1, 0
