# disk: a minimal virtio-mmio version 2 (modern) virtio-blk driver, polled.
#
# Serial output (exact bytes) on success:
#     disk first-bytes=<16 hex digits>\n
#     disk write ok\n
#     disk read ok\n
#     disk checksum=3bd1117a37a34925\n
# and exit status 0 through port 0x501.
#  - first-bytes: the first 8 bytes of sector 0 as read from the disk before anything is
#    written, in disk order, 2 lowercase hex digits each (a disk whose first bytes are
#    01 02 03 ... prints 0102030405060708; an all-zero disk prints 0000000000000000).
#  - the guest writes 4096 bytes, byte i = (i * 7 + 3) & 0xff (030a11181f262d34...), to
#    sectors 8..15 (byte offset 4096 of the disk), flushes, reads sectors 8..15 back into
#    another buffer and compares.
#  - checksum: FNV-1a over the 512 little-endian 64-bit words w of what was read back:
#    c = 0xcbf29ce484222325; for each w: c = (c ^ w) * 0x100000001b3 mod 2^64. For the pattern
#    above it is 3bd1117a37a34925 (4096 zero bytes would give 7da144b97d054b25).
# On any failure: "disk error: <what>\n" (lines above it may have been printed) and exit
# status 1. <what> is one of:
#     bad magic | not version 2 | not a block device | no virtio-blk device (microvm scan)
#     no VIRTIO_F_VERSION_1 | FEATURES_OK refused | queue 0 already live | queue too small
#     device needs reset | capacity below 16 sectors
#     timeout (<op>) | <op> status <n> | used id <n>      with <op> = read0, write, flush, read
#     read-back mismatch at byte <n>
#
# Driver: device at 0xd0000000 (ftvmm's virtio-mmio slot 0); status reset (0, read back
# until 0), ACKNOWLEDGE, DRIVER; features: only VIRTIO_F_VERSION_1 (bit 32) is offered back
# (the device must offer it); FEATURES_OK (read back); queue 0 with 8 entries: descriptors at
# vq_page + 0, avail ring at + 0x100 (flags = VIRTQ_AVAIL_F_NO_INTERRUPT), used ring at
# + 0x200 (all in this image's .bss, 4 KiB aligned); QueueReady = 1; DRIVER_OK. Every
# request uses descriptors 0 (16-byte header, device-readable), 1 (the 4096-byte buffer,
# device-writable for T_IN; omitted for T_FLUSH) and 2 (1-byte status, device-writable), is
# published with one avail entry, notified by writing 0 to QueueNotify (0x050), and completed
# by polling used.idx: each poll iteration that finds nothing reads InterruptStatus (0x060),
# an MMIO exit, so the VMM gets control (give up after 100000 polls: "timeout"). After
# completion InterruptStatus is read and written back to InterruptACK (0x064). Interrupts
# stay off (IRQ5 is never unmasked; the PIC is left as the VMM set it).
# Requests, in order: T_IN sector 0 (read0), T_OUT sector 8 (write), T_FLUSH (flush; no
# VIRTIO_BLK_F_FLUSH negotiation, as the platform's device accepts it), T_IN sector 8 (read).
#
# Build variant disk-microvm.elf (VIRTIO_MICROVM=1): instead of 0xd0000000 it uses the first
# of QEMU microvm's 24 virtio-mmio slots (0xfeb00000 + 0x200 * i) whose DeviceID is 2, so the
# same driver can be checked against QEMU (run with -global virtio-mmio.force-legacy=false).
#
# CPL0 cost: ~16,000 instructions to fill the pattern, ~4,000 to compare and checksum, ~100
# MMIO exits for the setup and each request; no port I/O besides COM1 and the exit port.

.include "defs.inc"

.ifndef VIRTIO_MICROVM
.equ VIRTIO_MICROVM, 0
.endif

.equ VIRTIO_BASE,      0xd0000000
.equ MICROVM_BASE,     0xfeb00000
.equ MICROVM_STRIDE,   0x200
.equ MICROVM_SLOTS,    24

# virtio-mmio registers
.equ VM_MAGIC,         0x000
.equ VM_VERSION,       0x004
.equ VM_DEVICE_ID,     0x008
.equ VM_DEV_FEATURES,  0x010
.equ VM_DEV_FEAT_SEL,  0x014
.equ VM_DRV_FEATURES,  0x020
.equ VM_DRV_FEAT_SEL,  0x024
.equ VM_QUEUE_SEL,     0x030
.equ VM_QUEUE_NUM_MAX, 0x034
.equ VM_QUEUE_NUM,     0x038
.equ VM_QUEUE_READY,   0x044
.equ VM_QUEUE_NOTIFY,  0x050
.equ VM_INT_STATUS,    0x060
.equ VM_INT_ACK,       0x064
.equ VM_STATUS,        0x070
.equ VM_DESC_LO,       0x080
.equ VM_DESC_HI,       0x084
.equ VM_AVAIL_LO,      0x090
.equ VM_AVAIL_HI,      0x094
.equ VM_USED_LO,       0x0a0
.equ VM_USED_HI,       0x0a4
.equ VM_CONFIG,        0x100        # virtio-blk config: capacity (u64, 512-byte sectors)

.equ ST_ACK,           1
.equ ST_DRIVER,        2
.equ ST_DRIVER_OK,     4
.equ ST_FEATURES_OK,   8
.equ ST_NEEDS_RESET,   0x40

.equ T_IN,             0
.equ T_OUT,            1
.equ T_FLUSH,          4

.equ QSIZE,            8
.equ DESC_NEXT,        1
.equ DESC_WRITE,       2
.equ POLL_LIMIT,       100000

.text
.globl main
main:
        # ---- find the device (rbx = register base for the whole run)
.if VIRTIO_MICROVM
        mov     $MICROVM_BASE, %ebx
        mov     $MICROVM_SLOTS, %ecx
1:      cmpl    $2, VM_DEVICE_ID(%rbx)
        je      2f
        add     $MICROVM_STRIDE, %ebx
        dec     %ecx
        jnz     1b
        lea     e_nodev(%rip), %rdi
        jmp     fail
2:
.else
        mov     $VIRTIO_BASE, %ebx
.endif
        cmpl    $0x74726976, VM_MAGIC(%rbx)             # "virt"
        lea     e_magic(%rip), %rdi
        jne     fail
        cmpl    $2, VM_VERSION(%rbx)
        lea     e_version(%rip), %rdi
        jne     fail
        cmpl    $2, VM_DEVICE_ID(%rbx)
        lea     e_devid(%rip), %rdi
        jne     fail

        # ---- reset, ACKNOWLEDGE, DRIVER
        movl    $0, VM_STATUS(%rbx)
1:      cmpl    $0, VM_STATUS(%rbx)
        jne     1b
        movl    $ST_ACK, VM_STATUS(%rbx)
        movl    $(ST_ACK | ST_DRIVER), VM_STATUS(%rbx)

        # ---- features: VIRTIO_F_VERSION_1 only
        movl    $1, VM_DEV_FEAT_SEL(%rbx)
        mov     VM_DEV_FEATURES(%rbx), %eax
        test    $1, %eax
        lea     e_v1(%rip), %rdi
        jz      fail
        movl    $0, VM_DRV_FEAT_SEL(%rbx)
        movl    $0, VM_DRV_FEATURES(%rbx)
        movl    $1, VM_DRV_FEAT_SEL(%rbx)
        movl    $1, VM_DRV_FEATURES(%rbx)
        movl    $(ST_ACK | ST_DRIVER | ST_FEATURES_OK), VM_STATUS(%rbx)
        mov     VM_STATUS(%rbx), %eax
        test    $ST_FEATURES_OK, %eax
        lea     e_featok(%rip), %rdi
        jz      fail

        # ---- queue 0
        movl    $0, VM_QUEUE_SEL(%rbx)
        cmpl    $0, VM_QUEUE_READY(%rbx)
        lea     e_qlive(%rip), %rdi
        jne     fail
        cmpl    $QSIZE, VM_QUEUE_NUM_MAX(%rbx)
        lea     e_qsmall(%rip), %rdi
        jb      fail
        movl    $QSIZE, VM_QUEUE_NUM(%rbx)
        lea     vq_desc(%rip), %rax
        mov     %eax, VM_DESC_LO(%rbx)
        shr     $32, %rax
        mov     %eax, VM_DESC_HI(%rbx)
        lea     vq_avail(%rip), %rax
        movw    $1, (%rax)                              # VIRTQ_AVAIL_F_NO_INTERRUPT
        mov     %eax, VM_AVAIL_LO(%rbx)
        shr     $32, %rax
        mov     %eax, VM_AVAIL_HI(%rbx)
        lea     vq_used(%rip), %rax
        mov     %eax, VM_USED_LO(%rbx)
        shr     $32, %rax
        mov     %eax, VM_USED_HI(%rbx)
        movl    $1, VM_QUEUE_READY(%rbx)
        movl    $(ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK), VM_STATUS(%rbx)
        mov     VM_STATUS(%rbx), %eax
        test    $ST_NEEDS_RESET, %eax
        lea     e_reset(%rip), %rdi
        jnz     fail

        # ---- capacity >= 16 sectors
        cmpl    $0, VM_CONFIG + 4(%rbx)
        jne     1f
        cmpl    $16, VM_CONFIG(%rbx)
        lea     e_cap(%rip), %rdi
        jb      fail
1:
        # ---- read sector 0..7, print the first 8 bytes
        lea     op_read0(%rip), %r12
        mov     $T_IN, %edi
        lea     buf_first(%rip), %rsi
        xor     %edx, %edx
        call    request
        lea     msg_first(%rip), %rdi
        call    print_str
        lea     buf_first(%rip), %r13
        xor     %ecx, %ecx
        mov     $2, %esi
1:      movzbl  (%r13,%rcx), %edi
        call    print_hex_n
        inc     %ecx
        cmp     $8, %ecx
        jne     1b
        mov     $'\n', %edi
        call    putc

        # ---- pattern -> sectors 8..15, flush
        lea     buf_pattern(%rip), %rdi
        xor     %ecx, %ecx
        mov     $3, %eax                                # i * 7 + 3
1:      mov     %al, (%rdi,%rcx)
        add     $7, %eax
        inc     %ecx
        cmp     $4096, %ecx
        jne     1b
        lea     op_write(%rip), %r12
        mov     $T_OUT, %edi
        lea     buf_pattern(%rip), %rsi
        mov     $8, %edx
        call    request
        lea     op_flush(%rip), %r12
        mov     $T_FLUSH, %edi
        xor     %esi, %esi
        xor     %edx, %edx
        call    request
        lea     msg_wok(%rip), %rdi
        call    print_str

        # ---- read back, compare
        lea     op_read(%rip), %r12
        mov     $T_IN, %edi
        lea     buf_read(%rip), %rsi
        mov     $8, %edx
        call    request
        lea     buf_pattern(%rip), %rsi
        lea     buf_read(%rip), %rdi
        xor     %ecx, %ecx
1:      mov     (%rsi,%rcx), %rax
        cmp     (%rdi,%rcx), %rax
        jne     3f
        add     $8, %ecx
        cmp     $4096, %ecx
        jne     1b
        lea     msg_rok(%rip), %rdi
        call    print_str

        # ---- checksum (FNV-1a over 64-bit words)
        mov     $0xcbf29ce484222325, %rax
        mov     $0x100000001b3, %rdx
        lea     buf_read(%rip), %rsi
        xor     %ecx, %ecx
2:      xor     (%rsi,%rcx,8), %rax
        imul    %rdx, %rax
        inc     %ecx
        cmp     $512, %ecx
        jne     2b
        mov     %rax, %r13
        lea     msg_ck(%rip), %rdi
        call    print_str
        mov     %r13, %rdi
        call    print_hex
        mov     $'\n', %edi
        call    putc
        xor     %edi, %edi
        call    exit

3:      # mismatch in the qword at rcx: find the byte
        mov     (%rsi,%rcx), %rax
        xor     (%rdi,%rcx), %rax
4:      test    $0xff, %al
        jnz     5f
        shr     $8, %rax
        inc     %ecx
        jmp     4b
5:      lea     e_mismatch(%rip), %rdi
        call    print_str
        mov     %rcx, %rdi
        call    print_dec
        jmp     fail_nl

# fail(rdi = message): "disk error: <message>\n", exit 1
fail:
        push    %rdi
        lea     e_prefix(%rip), %rdi
        call    print_str
        pop     %rdi
        call    print_str
fail_nl:
        mov     $'\n', %edi
        call    putc
        mov     $EXIT_FAIL, %edi
        call    exit

# request(edi = type, rsi = 4096-byte buffer or 0, rdx = sector), r12 = op name, rbx = device.
# Returns only on success (status 0); otherwise prints the error and exits 1.
request:
        push    %rcx
        push    %rdi
        lea     vq_req(%rip), %rax
        mov     %edi, 0(%rax)                           # type
        movl    $0, 4(%rax)                             # reserved
        mov     %rdx, 8(%rax)                           # sector
        movb    $0xff, 16(%rax)                         # status (device overwrites)
        lea     vq_desc(%rip), %rcx
        mov     %rax, 0(%rcx)                           # desc 0: header
        movl    $16, 8(%rcx)
        movw    $DESC_NEXT, 12(%rcx)
        movw    $2, 14(%rcx)
        test    %rsi, %rsi
        jz      1f
        movw    $1, 14(%rcx)                            # desc 0 -> desc 1
        mov     %rsi, 16(%rcx)                          # desc 1: data
        movl    $4096, 24(%rcx)
        movw    $DESC_NEXT, 28(%rcx)
        cmp     $T_IN, %edi
        jne     2f
        movw    $(DESC_NEXT | DESC_WRITE), 28(%rcx)
2:      movw    $2, 30(%rcx)
1:      add     $16, %rax
        mov     %rax, 32(%rcx)                          # desc 2: status
        movl    $1, 40(%rcx)
        movw    $DESC_WRITE, 44(%rcx)
        movw    $0, 46(%rcx)
        lea     vq_avail(%rip), %rcx
        movzwl  2(%rcx), %eax                           # avail.idx
        mov     %eax, %edi
        and     $(QSIZE - 1), %edi
        movw    $0, 4(%rcx,%rdi,2)                      # ring[idx % QSIZE] = desc 0
        inc     %eax
        mov     %ax, 2(%rcx)                            # publish (x86 keeps store order)
        movl    $0, VM_QUEUE_NOTIFY(%rbx)
        lea     vq_used(%rip), %rcx
        mov     $POLL_LIMIT, %edi
3:      movzwl  2(%rcx), %eax                           # used.idx
        cmp     last_used(%rip), %ax
        jne     4f
        mov     VM_INT_STATUS(%rbx), %eax               # an exit per empty poll
        dec     %edi
        jnz     3b
        lea     e_timeout(%rip), %rdi
        call    req_error
        mov     $')', %edi
        call    putc
        jmp     fail_nl
4:      movzwl  last_used(%rip), %edi
        and     $(QSIZE - 1), %edi
        incw    last_used(%rip)
        mov     4(%rcx,%rdi,8), %eax                    # used.ring[i].id
        test    %eax, %eax
        jz      5f
        push    %rax
        lea     e_usedid(%rip), %rdi
        call    req_error_plain
        pop     %rdi
        call    print_dec
        jmp     fail_nl
5:      mov     VM_INT_STATUS(%rbx), %eax
        mov     %eax, VM_INT_ACK(%rbx)
        lea     vq_req(%rip), %rax
        movzbl  16(%rax), %eax
        test    %eax, %eax
        jnz     6f
        pop     %rdi
        pop     %rcx
        ret
6:      push    %rax
        lea     e_prefix(%rip), %rdi
        call    print_str
        mov     %r12, %rdi
        call    print_str
        lea     e_status(%rip), %rdi
        call    print_str
        pop     %rdi
        call    print_dec
        jmp     fail_nl

# req_error(rdi): "disk error: <rdi>(<op>"   (for "timeout (<op>)")
req_error:
        push    %rdi
        lea     e_prefix(%rip), %rdi
        call    print_str
        pop     %rdi
        call    print_str
        mov     %r12, %rdi
        call    print_str
        ret
# req_error_plain(rdi): "disk error: <rdi>"
req_error_plain:
        push    %rdi
        lea     e_prefix(%rip), %rdi
        call    print_str
        pop     %rdi
        call    print_str
        ret

.section .rodata
msg_first:  .asciz "disk first-bytes="
msg_wok:    .asciz "disk write ok\n"
msg_rok:    .asciz "disk read ok\n"
msg_ck:     .asciz "disk checksum="
op_read0:   .asciz "read0"
op_write:   .asciz "write"
op_flush:   .asciz "flush"
op_read:    .asciz "read"
e_prefix:   .asciz "disk error: "
e_nodev:    .asciz "no virtio-blk device"
e_magic:    .asciz "bad magic"
e_version:  .asciz "not version 2"
e_devid:    .asciz "not a block device"
e_v1:       .asciz "no VIRTIO_F_VERSION_1"
e_featok:   .asciz "FEATURES_OK refused"
e_qlive:    .asciz "queue 0 already live"
e_qsmall:   .asciz "queue too small"
e_reset:    .asciz "device needs reset"
e_cap:      .asciz "capacity below 16 sectors"
e_timeout:  .asciz "timeout ("
e_status:   .asciz " status "
e_usedid:   .asciz "used id "
e_mismatch: .asciz "disk error: read-back mismatch at byte "

.bss
.balign 4096
vq_page:
vq_desc:    .fill 0x100, 1, 0                   # 8 descriptors (128 bytes used)
vq_avail:   .fill 0x100, 1, 0                   # flags, idx, ring[8], used_event
vq_used:    .fill 0x200, 1, 0                   # flags, idx, ring[8] {id, len}, avail_event
vq_req:     .fill 0x20, 1, 0                    # header (16 bytes) + status byte at +16
last_used:  .word 0
.balign 4096
buf_first:   .fill 4096, 1, 0
buf_pattern: .fill 4096, 1, 0
buf_read:    .fill 4096, 1, 0
