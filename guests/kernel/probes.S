/* One faulting instruction per routine; the (insn, next) pairs go into
 * section .probes so trap handlers can skip exactly that instruction. */

.macro PROBE_ENTRY
    .pushsection .probes, "a"
    .quad 8f, 9f
    .popsection
.endm

    .text
    .globl probe_div0
probe_div0:
    PROBE_ENTRY
    mov     $1, %eax
    xor     %edx, %edx
    xor     %ecx, %ecx
8:  divl    %ecx
9:  ret

    .globl probe_int3
probe_int3:
    PROBE_ENTRY
8:  int3
9:  ret

    .globl probe_ud2
probe_ud2:
    PROBE_ENTRY
8:  ud2
9:  ret

    .globl probe_hlt
probe_hlt:
    PROBE_ENTRY
8:  hlt
9:  ret

    .globl probe_cli
probe_cli:
    PROBE_ENTRY
8:  cli
9:  ret

/* u64 probe_read(addr): returns the value, or ~0 if the read was skipped. */
    .globl probe_read
probe_read:
    PROBE_ENTRY
    mov     $-1, %rax
8:  mov     (%rdi), %rax
9:  ret

    .section .note.GNU-stack, "", @progbits
