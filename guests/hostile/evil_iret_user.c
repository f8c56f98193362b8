/* Attack: HYPERVISOR_iret to user mode (cs 0xe033) although no user page
 * table was ever set (no MMUEXT_NEW_USER_BASEPTR). Xen: the domain is
 * crashed (ABI §5.7 step 2). If it survives, the "user" code it lands in
 * prints `result evil_iret_survived 1`. */
#include "hostile.h"

void evil_iret(u64 rip, u64 cs, u64 rflags, u64 rsp, u64 ss);
__asm__(
    "    .text\n"
    "    .globl evil_iret\n"
    "evil_iret:\n"
    "    push %r8\n"           /* ss */
    "    push %rcx\n"          /* rsp */
    "    push %rdx\n"          /* rflags */
    "    push %rsi\n"          /* cs */
    "    push %rdi\n"          /* rip */
    "    pushq $0\n"           /* flags */
    "    jmp hypercall_page + 23 * 32\n");

static char stack[4 * PAGE_SIZE] __attribute__((aligned(16)));

static void landed(void)
{
    printk("result evil_iret_survived 1\n");
    poweroff();
}

void app_main(void)
{
    hostile_traps_init();
    printk("about to iret to user mode without a user page table\n");
    evil_iret((u64)landed, FLAT_USER_CS, 0x200, (u64)(stack + sizeof(stack) - 8), FLAT_USER_SS);
    panic("iret returned");
}
