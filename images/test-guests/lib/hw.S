# hw.S: 8259A PIC pair, 8254 PIT channel 0, the exit port, the drop to user mode.
#
#   pic_init(rdi = mask of IRQs to enable, bit n = IRQ n)
#        remaps master to vectors 0x20-0x27 and slave to 0x28-0x2f (edge, 8086 mode), then
#        masks every IRQ not in rdi (IRQ2, the cascade, is unmasked when any slave IRQ is).
#   pic_eoi(rdi = irq)   non-specific EOI to the slave (irq >= 8) and the master
#   pit_init(rdi = hz)   channel 0, lobyte/hibyte, mode 2 (rate generator),
#                        divisor round(1193182 / hz) (100 Hz -> 11932)
#   timer_start(rdi = hz)
#                        IRQ0 (vector 0x20) counts into the 64-bit global `timer_ticks` and
#                        EOIs; every other IRQ masked (pic_init(1)); pit_init(hz). Interrupts
#                        stay off until the caller's `sti`.
#   exit(dil = status)   writes the status byte to port 0x501, then `cli; hlt` forever
#   enter_user(rdi = rip, rsi = rsp, rdx = rflags)
#                        iretq to CPL3 (CS 0x2b, SS/DS/ES 0x23); does not return. Interrupts
#                        from CPL3 run on TSS.RSP0 (istack, see tss_set_rsp0).

.include "defs.inc"

.text
.globl pic_init
pic_init:
        push    %rdi
        push    %rax
        test    $0xff00, %edi
        jz      1f
        or      $0x0004, %edi           # cascade
1:      not     %edi                    # 1 = masked
        mov     $0x11, %al              # ICW1: edge, cascade, ICW4 needed
        out     %al, $PIC1_CMD
        out     %al, $PIC2_CMD
        mov     $IRQ_BASE, %al          # ICW2: vector base
        out     %al, $PIC1_DATA
        mov     $(IRQ_BASE + 8), %al
        out     %al, $PIC2_DATA
        mov     $0x04, %al              # ICW3: slave on IRQ2
        out     %al, $PIC1_DATA
        mov     $0x02, %al              # ICW3: slave identity 2
        out     %al, $PIC2_DATA
        mov     $0x01, %al              # ICW4: 8086 mode, normal EOI
        out     %al, $PIC1_DATA
        out     %al, $PIC2_DATA
        mov     %edi, %eax
        out     %al, $PIC1_DATA         # OCW1: masks
        mov     %ah, %al
        out     %al, $PIC2_DATA
        pop     %rax
        pop     %rdi
        ret

.globl pic_eoi
pic_eoi:
        push    %rax
        mov     $PIC_EOI, %al
        cmp     $8, %edi
        jb      1f
        out     %al, $PIC2_CMD
1:      out     %al, $PIC1_CMD
        pop     %rax
        ret

.globl pit_init
pit_init:
        push    %rdx
        push    %rcx
        mov     %rdi, %rcx
        shr     $1, %rcx
        lea     PIT_HZ(%rcx), %rax      # PIT_HZ + hz / 2
        xor     %edx, %edx
        div     %rdi
        mov     %eax, %ecx              # divisor (65536 -> 0)
        mov     $0x34, %al              # channel 0, lobyte/hibyte, mode 2, binary
        out     %al, $PIT_CMD
        mov     %cl, %al
        out     %al, $PIT_CH0
        mov     %ch, %al
        out     %al, $PIT_CH0
        pop     %rcx
        pop     %rdx
        ret

.globl timer_start
timer_start:
        push    %rsi
        push    %rdx
        push    %rdi
        mov     $(IRQ_BASE + 0), %edi
        lea     timer_irq0(%rip), %rsi
        mov     $GATE_INT, %edx
        call    idt_set_gate
        mov     $0x0001, %edi           # IRQ0 only
        call    pic_init
        pop     %rdi
        call    pit_init
        pop     %rdx
        pop     %rsi
        ret

# IRQ0: count and EOI (6 instructions, one port write).
timer_irq0:
        push    %rax
        incq    timer_ticks(%rip)
        mov     $PIC_EOI, %al
        out     %al, $PIC1_CMD
        pop     %rax
        iretq

.globl exit
exit:
        mov     %edi, %eax
        mov     $EXIT_PORT, %dx
        out     %al, %dx
1:      cli
        hlt
        jmp     1b

.globl enter_user
enter_user:
        mov     $USER_DS, %eax
        mov     %eax, %ds
        mov     %eax, %es
        pushq   $USER_DS                # SS
        pushq   %rsi                    # RSP
        pushq   %rdx                    # RFLAGS
        pushq   $USER_CS                # CS
        pushq   %rdi                    # RIP
        iretq

.bss
.balign 8
.globl timer_ticks
timer_ticks:
        .quad 0
