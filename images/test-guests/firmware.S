# firmware: prints the state the platform's PIT, PIC and RTC are in when the guest starts,
# before it touches them: what a PC's firmware leaves an OS. Run it on ftvmm and on QEMU with
# SeaBIOS (`QEMU_MACHINE=pc images/qemu-run-test-guest firmware`) and compare
# (docs/PLATFORM.md, "Power-on state").
#
# Serial output (every value hex; the exit status is 0):
#     pit status 0=<s0> 1=<s1> 2=<s2> counting=<c0><c1><c2>\n
#         s<n>: channel n's read-back status byte (bit 7 OUT, bit 6 NULL COUNT, bits 5-4
#         access, 3-1 mode, 0 BCD); c<n>: 1 if two latched counts ~100 port reads apart differ
#     pic imr=<master>,<slave> irr=<master>,<slave> isr=<master>,<slave> vectors=<v0>,<v8>\n
#         v0: the vector IRQ 0 (the PIT) arrives on once unmasked; v8: the vector of IRQ 8
#         (the RTC's periodic interrupt, turned on for this) with the slave unmasked; 00 if
#         none came within ~100000 port reads
#     rtc a=<a> b=<b> d=<d> time=<valid|invalid>\n
#         registers A, B, D (C is read, which clears it, by the IRQ 8 probe); time is valid
#         when seconds, minutes, hours, day, month and year are in range for the mode B says
#     firmware done\n
# The UART is not in the list: the runtime (lib/serial.S) programs COM1 before `main`.

.include "defs.inc"

.text
.globl main
main:
        # ---------------------------------------------------------------- PIT
        mov     $0xee, %al                      # read-back: status of channels 0, 1, 2
        out     %al, $PIT_CMD
        in      $0x40, %al
        mov     %al, pit_s0(%rip)
        in      $0x41, %al
        mov     %al, pit_s1(%rip)
        in      $0x42, %al
        mov     %al, pit_s2(%rip)
        xor     %ebx, %ebx                      # counting flags: bit n = channel n
        xor     %r12d, %r12d
1:      mov     %r12d, %edi
        call    latch_count
        mov     %eax, %r13d
        call    delay
        mov     %r12d, %edi
        call    latch_count
        cmp     %eax, %r13d
        je      2f
        bts     %r12d, %ebx
2:      inc     %r12d
        cmp     $3, %r12d
        jne     1b

        lea     s_pit(%rip), %rdi
        call    print_str
        movzbl  pit_s0(%rip), %edi
        call    hex2
        lea     s_pit1(%rip), %rdi
        call    print_str
        movzbl  pit_s1(%rip), %edi
        call    hex2
        lea     s_pit2(%rip), %rdi
        call    print_str
        movzbl  pit_s2(%rip), %edi
        call    hex2
        lea     s_counting(%rip), %rdi
        call    print_str
        xor     %r12d, %r12d
3:      xor     %edi, %edi
        bt      %r12d, %ebx
        adc     $'0', %edi
        call    putc
        inc     %r12d
        cmp     $3, %r12d
        jne     3b
        mov     $'\n', %edi
        call    putc

        # ---------------------------------------------------------------- PIC
        in      $PIC1_DATA, %al
        mov     %al, imr1(%rip)
        in      $PIC2_DATA, %al
        mov     %al, imr2(%rip)
        mov     $0x0a, %al                      # OCW3: read IRR
        out     %al, $PIC1_CMD
        out     %al, $PIC2_CMD
        in      $PIC1_CMD, %al
        mov     %al, irr1(%rip)
        in      $PIC2_CMD, %al
        mov     %al, irr2(%rip)
        mov     $0x0b, %al                      # OCW3: read ISR
        out     %al, $PIC1_CMD
        out     %al, $PIC2_CMD
        in      $PIC1_CMD, %al
        mov     %al, isr1(%rip)
        in      $PIC2_CMD, %al
        mov     %al, isr2(%rip)
        mov     $0x0a, %al
        out     %al, $PIC1_CMD
        out     %al, $PIC2_CMD

        # RTC registers before the IRQ 8 probe changes B and reads C.
        mov     $0x0a, %edi
        call    cmos_read
        mov     %al, rtc_a(%rip)
        mov     $0x0b, %edi
        call    cmos_read
        mov     %al, rtc_b(%rip)
        mov     $0x0d, %edi
        call    cmos_read
        mov     %al, rtc_d(%rip)
        call    rtc_time_valid
        mov     %al, rtc_valid(%rip)

        # Every vector an IRQ can arrive on records itself.
        xor     %r12d, %r12d
4:      mov     %r12d, %edi
        add     $0x08, %edi
        cmp     $0x10, %edi
        jb      5f
        add     $(0x70 - 0x10), %edi            # 0x08..0x0f, then 0x70..0x77
5:      lea     irq_stubs(%rip), %rsi
        mov     %r12d, %eax
        shl     $4, %eax
        add     %rax, %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        inc     %r12d
        cmp     $16, %r12d
        jne     4b
        # IRQ 0: unmask it alone on the master and wait.
        mov     imr1(%rip), %al
        and     $~1, %al
        out     %al, $PIC1_DATA
        call    wait_irq
        mov     %al, vec0(%rip)
        mov     imr1(%rip), %al                 # masked again
        out     %al, $PIC1_DATA
        # IRQ 8: RTC periodic interrupt on, slave IRQ 0 and the cascade unmasked.
        mov     $0x0b, %edi
        call    cmos_read
        or      $0x40, %al
        mov     %eax, %esi
        mov     $0x0b, %edi
        call    cmos_write
        mov     imr2(%rip), %al
        and     $~1, %al
        out     %al, $PIC2_DATA
        mov     imr1(%rip), %al
        and     $~4, %al
        out     %al, $PIC1_DATA
        call    wait_irq
        mov     %al, vec8(%rip)
        mov     imr1(%rip), %al
        out     %al, $PIC1_DATA
        mov     imr2(%rip), %al
        out     %al, $PIC2_DATA
        movzbl  rtc_b(%rip), %esi
        mov     $0x0b, %edi
        call    cmos_write
        mov     $0x0c, %edi
        call    cmos_read

        lea     s_pic(%rip), %rdi
        call    print_str
        movzbl  imr1(%rip), %edi
        call    hex2
        mov     $',', %edi
        call    putc
        movzbl  imr2(%rip), %edi
        call    hex2
        lea     s_irr(%rip), %rdi
        call    print_str
        movzbl  irr1(%rip), %edi
        call    hex2
        mov     $',', %edi
        call    putc
        movzbl  irr2(%rip), %edi
        call    hex2
        lea     s_isr(%rip), %rdi
        call    print_str
        movzbl  isr1(%rip), %edi
        call    hex2
        mov     $',', %edi
        call    putc
        movzbl  isr2(%rip), %edi
        call    hex2
        lea     s_vectors(%rip), %rdi
        call    print_str
        movzbl  vec0(%rip), %edi
        call    hex2
        mov     $',', %edi
        call    putc
        movzbl  vec8(%rip), %edi
        call    hex2
        mov     $'\n', %edi
        call    putc

        # ---------------------------------------------------------------- RTC
        lea     s_rtc(%rip), %rdi
        call    print_str
        movzbl  rtc_a(%rip), %edi
        call    hex2
        lea     s_b(%rip), %rdi
        call    print_str
        movzbl  rtc_b(%rip), %edi
        call    hex2
        lea     s_d(%rip), %rdi
        call    print_str
        movzbl  rtc_d(%rip), %edi
        call    hex2
        lea     s_valid(%rip), %rdi
        cmpb    $0, rtc_valid(%rip)
        jne     6f
        lea     s_invalid(%rip), %rdi
6:      call    print_str

        lea     s_done(%rip), %rdi
        call    print_str
        xor     %eax, %eax
        ret

# %eax = channel %edi's count, latched (lobyte/hibyte access assumed, as at power-on).
latch_count:
        mov     %edi, %ecx
        shl     $6, %ecx                        # counter latch command for channel ecx
        mov     %cl, %al
        out     %al, $PIT_CMD
        lea     0x40(%rdi), %edx
        in      %dx, %al
        movzbl  %al, %ecx
        in      %dx, %al
        movzbl  %al, %eax
        shl     $8, %eax
        or      %ecx, %eax
        ret

# About 100 exits' worth of time (reads of the unclaimed POST port).
delay:  mov     $100, %ecx
1:      in      $0x80, %al
        dec     %ecx
        jnz     1b
        ret

# Enables interrupts until one of the stubs records a vector, or ~100000 port reads pass.
# %al = the vector, 0 if none.
wait_irq:
        movb    $0, got_vec(%rip)
        mov     $100000, %ecx
        sti
1:      cmpb    $0, got_vec(%rip)
        jne     2f
        in      $0x80, %al
        dec     %ecx
        jnz     1b
2:      cli
        movzbl  got_vec(%rip), %eax
        ret

# One stub per IRQ vector (0x08-0x0f, 0x70-0x77), 16 bytes each: records the vector, sends
# a non-specific EOI to both chips and returns.
.balign 16
irq_stubs:
.irp v, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x70, 0x71, 0x72, 0x73, 0x74, 0x75, 0x76, 0x77
        .balign 16
        movb    $\v, got_vec(%rip)
        jmp     irq_eoi
.endr
irq_eoi:
        push    %rax
        mov     $PIC_EOI, %al
        out     %al, $PIC2_CMD
        out     %al, $PIC1_CMD
        pop     %rax
        iretq

# %al = CMOS register %edi (NMI stays enabled).
cmos_read:
        mov     %edi, %eax
        out     %al, $0x70
        in      $0x71, %al
        ret

# CMOS register %edi = %sil.
cmos_write:
        mov     %edi, %eax
        out     %al, $0x70
        mov     %esi, %eax
        out     %al, $0x71
        ret

# %al = 1 if the RTC's time and date are in range (BCD or binary as register B says).
rtc_time_valid:
        push    %rbx
        push    %r12
        lea     rtc_fields(%rip), %rbx
1:      movzbl  (%rbx), %edi
        cmp     $0xff, %edi
        je      3f
        call    cmos_read
        movzbl  %al, %eax
        testb   $0x04, rtc_b(%rip)              # DM: binary
        jnz     2f
        mov     %eax, %ecx                      # BCD: both digits <= 9, then to binary
        and     $0x0f, %ecx
        cmp     $9, %ecx
        ja      4f
        mov     %eax, %edx
        shr     $4, %edx
        cmp     $9, %edx
        ja      4f
        imul    $10, %edx, %edx
        lea     (%rdx,%rcx), %eax
        cmpb    $0x04, (%rbx)                   # hours: bit 7 is PM in 12-hour mode
        jne     2f
        testb   $0x02, rtc_b(%rip)
        jnz     2f
        and     $0x7f, %eax
2:      movzbl  1(%rbx), %ecx                   # min
        cmp     %ecx, %eax
        jb      4f
        movzbl  2(%rbx), %ecx                   # max
        cmp     %ecx, %eax
        ja      4f
        add     $3, %rbx
        jmp     1b
3:      mov     $1, %eax
        jmp     5f
4:      xor     %eax, %eax
5:      pop     %r12
        pop     %rbx
        ret

# Output of `print_hex_n` with 2 digits.
hex2:   push    %rsi
        mov     $2, %esi
        call    print_hex_n
        pop     %rsi
        ret

.section .rodata
# register, min, max (binary values)
rtc_fields:  .byte 0x00, 0, 59,  0x02, 0, 59,  0x04, 0, 23,  0x07, 1, 31,  0x08, 1, 12
             .byte 0x09, 0, 99,  0xff
s_pit:       .asciz "pit status 0="
s_pit1:      .asciz " 1="
s_pit2:      .asciz " 2="
s_counting:  .asciz " counting="
s_pic:       .asciz "pic imr="
s_irr:       .asciz " irr="
s_isr:       .asciz " isr="
s_vectors:   .asciz " vectors="
s_rtc:       .asciz "rtc a="
s_b:         .asciz " b="
s_d:         .asciz " d="
s_valid:     .asciz " time=valid\n"
s_invalid:   .asciz " time=invalid\n"
s_done:      .asciz "firmware done\n"

.data
pit_s0:      .byte 0
pit_s1:      .byte 0
pit_s2:      .byte 0
imr1:        .byte 0
imr2:        .byte 0
irr1:        .byte 0
irr2:        .byte 0
isr1:        .byte 0
isr2:        .byte 0
vec0:        .byte 0
vec8:        .byte 0
got_vec:     .byte 0
rtc_a:       .byte 0
rtc_b:       .byte 0
rtc_d:       .byte 0
rtc_valid:   .byte 0
