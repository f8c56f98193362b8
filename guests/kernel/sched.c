#include <stdarg.h>
#include "sched.h"
#include "console.h"
#include "hypercall.h"
#include "lib.h"
#include "events.h"
#include "mm.h"
#include <xen/vcpu.h>

long sched_block(void) { return HYPERVISOR_sched_op(SCHEDOP_block, NULL); }
long sched_yield(void) { return HYPERVISOR_sched_op(SCHEDOP_yield, NULL); }

static noreturn void shutdown(unsigned reason)
{
    struct sched_shutdown sd = { .reason = reason };
    for (;;) {
        HYPERVISOR_sched_op(SCHEDOP_shutdown, &sd);
        /* Not reached on a working hypervisor. */
        HYPERVISOR_sched_op(SCHEDOP_yield, NULL);
    }
}

void poweroff(void)
{
    printk("poweroff\n");
    shutdown(SHUTDOWN_poweroff);
}

void crash(void)
{
    shutdown(SHUTDOWN_crash);
}

void panic(const char *fmt, ...)
{
    char buf[400];
    va_list ap;
    irq_disable();
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    console_use_hypercall();
    printk("panic: %s\n", buf);
    crash();
}

/* The new vCPU enters here with rdi = its main(), rsp = the top of its stack. */
extern char vcpu_entry[];
__asm__(".text\n"
        "vcpu_entry:\n"
        "    and $-16, %rsp\n"
        "    call *%rdi\n"
        "    ud2\n");

long vcpu_start(unsigned id, noreturn void (*main)(void), void *stack, unsigned long size)
{
    static vcpu_guest_context_t ctx;
    memset(&ctx, 0, sizeof(ctx));
    ctx.flags = VGCF_in_kernel;
    ctx.user_regs.rip = (unsigned long)vcpu_entry;
    ctx.user_regs.rdi = (unsigned long)main;
    ctx.user_regs.rsp = (unsigned long)stack + size;
    ctx.user_regs.cs = FLAT_KERNEL_CS;
    ctx.user_regs.ss = FLAT_KERNEL_SS;
    ctx.user_regs.rflags = 0x1000;
    ctx.kernel_ss = FLAT_KERNEL_SS;
    ctx.kernel_sp = (unsigned long)stack + size;
    ctx.ctrlreg[3] = virt_to_mfn((void *)start_info->pt_base) << PAGE_SHIFT;
    HYPERVISOR_shared_info->vcpu_info[id].evtchn_upcall_mask = 1;
    long rc = HYPERVISOR_vcpu_op(VCPUOP_initialise, id, &ctx);
    return rc ? rc : HYPERVISOR_vcpu_op(VCPUOP_up, id, NULL);
}
