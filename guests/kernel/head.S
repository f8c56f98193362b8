/* Entry point, Xen ELF notes, hypercall page and bounce-frame entry stubs. */
#include <xen/xen.h>
#include <xen/elfnote.h>

#define VIRT_BASE 0xFFFFFFFF80000000
#define HYPERCALL(name) (hypercall_page + __HYPERVISOR_##name * 32)

/* ---- ELF notes (name "Xen") ---- */
.macro XEN_NOTE_BEGIN type
    .pushsection .note.Xen, "a", @note
    .p2align 2
    .long 2f - 1f
    .long 4f - 3f
    .long \type
1:  .asciz "Xen"
2:  .p2align 2
3:
.endm
.macro XEN_NOTE_END
4:  .p2align 2
    .popsection
.endm
.macro XEN_NOTE_STR type, str
    XEN_NOTE_BEGIN \type
    .asciz "\str"
    XEN_NOTE_END
.endm
.macro XEN_NOTE_QUAD type, val
    XEN_NOTE_BEGIN \type
    .quad \val
    XEN_NOTE_END
.endm

    XEN_NOTE_STR  XEN_ELFNOTE_GUEST_OS,       "aiovmm-guest"
    XEN_NOTE_STR  XEN_ELFNOTE_XEN_VERSION,    "xen-3.0"
    XEN_NOTE_STR  XEN_ELFNOTE_LOADER,         "generic"
    XEN_NOTE_QUAD XEN_ELFNOTE_VIRT_BASE,      VIRT_BASE
    XEN_NOTE_QUAD XEN_ELFNOTE_PADDR_OFFSET,   VIRT_BASE
    XEN_NOTE_QUAD XEN_ELFNOTE_ENTRY,          _start
    XEN_NOTE_QUAD XEN_ELFNOTE_HYPERCALL_PAGE, hypercall_page
    XEN_NOTE_QUAD XEN_ELFNOTE_SUSPEND_CANCEL, 1

/* ---- entry ---- */
    .section .text.head, "ax"
    .globl _start
_start:
    /* RSI = start_info, RSP = end of the boot stack page. */
    cld
    mov     %rsi, %rdi
    mov     %rsp, %rsi
    lea     kernel_stack_top(%rip), %rsp
    xor     %ebp, %ebp
    call    start_kernel
    ud2

/* Filled by the domain builder with 128 stubs of 32 bytes. */
    .p2align 12
    .globl hypercall_page
hypercall_page:
    .fill 4096, 1, 0xcc

/* ---- bounce-frame entry ----
 * Xen's frame: [rcx, r11, (err), rip, cs, rflags, rsp, ss]. The stubs pop
 * rcx/r11 back into their registers, push a dummy error code if the vector
 * has none, push the vector, and join the common path. */
    .text

.macro SAVE_ALL
    push    %rdi
    push    %rsi
    push    %rdx
    push    %rcx
    push    %rax
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    push    %rbx
    push    %rbp
    push    %r12
    push    %r13
    push    %r14
    push    %r15
.endm

.macro RESTORE_ALL
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %rbp
    pop     %rbx
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rax
    pop     %rcx
    pop     %rdx
    pop     %rsi
    pop     %rdi
.endm

.macro TRAP_NOERR name, vec
    .globl \name
\name:
    pop     %rcx
    pop     %r11
    pushq   $0
    pushq   $\vec
    jmp     trap_common
.endm

.macro TRAP_ERR name, vec
    .globl \name
\name:
    pop     %rcx
    pop     %r11
    pushq   $\vec
    jmp     trap_common
.endm

    TRAP_NOERR trap_divide_error, 0
    TRAP_NOERR trap_debug, 1
    TRAP_NOERR trap_nmi, 2                  /* trap_ctxt[2] / CALLBACKTYPE_nmi */
    TRAP_NOERR trap_int3, 3
    TRAP_NOERR trap_overflow, 4
    TRAP_NOERR trap_bounds, 5
    TRAP_NOERR trap_invalid_op, 6
    TRAP_NOERR trap_device_not_available, 7
    TRAP_ERR   trap_invalid_tss, 10
    TRAP_ERR   trap_segment_not_present, 11
    TRAP_ERR   trap_stack_segment, 12
    TRAP_ERR   trap_general_protection, 13
    TRAP_ERR   trap_page_fault, 14
    TRAP_NOERR trap_coprocessor_error, 16
    TRAP_ERR   trap_alignment_check, 17
    TRAP_NOERR trap_simd_error, 19
    TRAP_NOERR hypervisor_callback, 0x100   /* event upcall: events masked */

/* Stack here: [vector, err, rip, cs, rflags, rsp, ss], 16-byte aligned
 * after SAVE_ALL (Xen aligns the frame base to 16). */
trap_common:
    SAVE_ALL
    cld
    mov     %rsp, %rdi
    call    trap_dispatch
    RESTORE_ALL
    add     $16, %rsp               /* vector, error code */
    /* Return with HYPERVISOR_iret: stack = [flags, rip, cs, rflags, rsp, ss].
     * Xen restores rcx/r11/rax and sets evtchn_upcall_mask = !rflags.IF
     * atomically with the return, so re-enabling events cannot lose an
     * upcall. cs (0xe030 for kernel, 0xe033 for user) decides the mode;
     * drop the saved-mask bits Xen stored above bit 32. */
    andq    $0xffff, 8(%rsp)
    pushq   $0
    jmp     HYPERCALL(iret)

/* SYSCALL from guest user mode: rcx = user rip, r11 = user rflags. */
    .globl syscall_callback
syscall_callback:
    pop     %rcx
    pop     %r11
    pushq   $0
    pushq   $0x101
    SAVE_ALL
    cld
    mov     %rsp, %rdi
    call    trap_dispatch
    RESTORE_ALL
    add     $16, %rsp
    andq    $0xffff, 8(%rsp)
    pushq   $VGCF_in_syscall        /* sysret-style return, rax = result */
    jmp     HYPERCALL(iret)

/* Failsafe: [rcx, r11, ds, es, fs, gs, rip, cs, rflags, rsp, ss]. */
    .globl failsafe_callback
failsafe_callback:
    pop     %rcx
    pop     %r11
    mov     %rsp, %rdi
    and     $-16, %rsp
    call    do_failsafe
    ud2

/* ---- user mode entry / resume ----
 * long user_enter(struct user_ctx *ctx, u64 rip, u64 rsp): saves the
 * callee-saved state in ctx, enters user mode with HYPERVISOR_iret and
 * "returns" when user_resume(ctx, value) is called. */
    .globl user_enter
user_enter:
    mov     %rbx, 0(%rdi)
    mov     %rbp, 8(%rdi)
    mov     %r12, 16(%rdi)
    mov     %r13, 24(%rdi)
    mov     %r14, 32(%rdi)
    mov     %r15, 40(%rdi)
    lea     8(%rsp), %rax
    mov     %rax, 48(%rdi)          /* rsp after return */
    mov     (%rsp), %rax
    mov     %rax, 56(%rdi)          /* return address */
    pushq   $FLAT_USER_SS
    pushq   %rdx                    /* user rsp */
    pushq   $0x200                  /* rflags: IF -> events enabled */
    pushq   $FLAT_USER_CS           /* RPL 3: switch to user mode */
    pushq   %rsi                    /* user rip */
    pushq   $0                      /* flags */
    xor     %eax, %eax
    xor     %ecx, %ecx
    xor     %edx, %edx
    xor     %esi, %esi
    xor     %edi, %edi
    xor     %r8d, %r8d
    xor     %r9d, %r9d
    xor     %r10d, %r10d
    xor     %r11d, %r11d
    xor     %ebx, %ebx
    xor     %ebp, %ebp
    xor     %r12d, %r12d
    xor     %r13d, %r13d
    xor     %r14d, %r14d
    xor     %r15d, %r15d
    jmp     HYPERCALL(iret)

    .globl user_resume
user_resume:
    mov     0(%rdi), %rbx
    mov     8(%rdi), %rbp
    mov     16(%rdi), %r12
    mov     24(%rdi), %r13
    mov     32(%rdi), %r14
    mov     40(%rdi), %r15
    mov     48(%rdi), %rsp
    mov     %rsi, %rax
    jmp     *56(%rdi)

/* void call_on_stack(void (*fn)(void), void *stack_top) */
    .globl call_on_stack
call_on_stack:
    push    %rbp
    mov     %rsp, %rbp
    mov     %rsi, %rsp
    and     $-16, %rsp
    call    *%rdi
    mov     %rbp, %rsp
    pop     %rbp
    ret

/* ---- stacks ---- */
    .section .bss.stack, "aw", @nobits
    .p2align 12
    .globl kernel_stack, kernel_stack_top
kernel_stack:
    .skip 65536
kernel_stack_top:
    .globl user_entry_stack, user_entry_stack_top
user_entry_stack:
    .skip 16384
user_entry_stack_top:

    .section .note.GNU-stack, "", @progbits
