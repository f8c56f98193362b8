#include <stdarg.h>
#include "sched.h"
#include "console.h"
#include "hypercall.h"
#include "lib.h"
#include "events.h"

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
