/* Position-independent user program, copied to USER_CODE_VA. */
    .section .rodata.user_prog, "a"
    .globl user_prog_start, user_prog_end
user_prog_start:
    mov     $1, %eax                /* write(msg, len) */
    lea     msg(%rip), %rdi
    mov     $(msg_end - msg), %esi
    syscall
    mov     $60, %eax               /* exit(42) */
    mov     $42, %edi
    syscall
1:  pause
    jmp     1b
msg:
    .ascii  "hello from user mode"
msg_end:
user_prog_end:

    .section .note.GNU-stack, "", @progbits
