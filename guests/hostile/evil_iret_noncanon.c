/* Attack: HYPERVISOR_iret back to kernel mode with a non-canonical RIP
 * (0x0000800000000000). Xen: the domain is crashed, or the failing return is
 * reported to the guest (#GP or failsafe callback, which this guest prints:
 * `result evil_iret_trap <vector>`); it must never run at that RIP or hang
 * (ABI §5.7). */
#include "hostile.h"

void evil_iret(u64 rip, u64 cs, u64 rflags, u64 rsp, u64 ss);
__asm__(
    "    .text\n"
    "    .globl evil_iret\n"
    "evil_iret:\n"
    "    push %r8\n"
    "    push %rcx\n"
    "    push %rdx\n"
    "    push %rsi\n"
    "    push %rdi\n"
    "    pushq $0\n"
    "    jmp hypercall_page + 23 * 32\n");

static char stack[4 * PAGE_SIZE] __attribute__((aligned(16)));

static int report(struct regs *r)
{
    printk("result evil_iret_trap %lu\n", r->vector);
    printk("result evil_iret_trap_rip 0x%lx\n", r->rip);
    poweroff();
}

void app_main(void)
{
    hostile_traps_init();
    for (unsigned v = 0; v < 32; v++)
        set_trap_handler(v, report);
    printk("about to iret to a non-canonical rip\n");
    /* CS RPL 0 (0xe030) = stay in kernel mode; FLAT_KERNEL_CS is 0xe033. */
    evil_iret(0x0000800000000000UL, 0xe030, 0x200,
              (u64)(stack + sizeof(stack) - 8), 0xe02b);
    panic("iret returned");
}
