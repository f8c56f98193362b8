/* Domain lifetime: block, poweroff, crash, panic. */
#ifndef AIOVMM_SCHED_H
#define AIOVMM_SCHED_H

#include "os.h"

long sched_block(void);
long sched_yield(void);
/* Prints "poweroff" then SCHEDOP_shutdown(SHUTDOWN_poweroff). */
noreturn void poweroff(void);
/* SCHEDOP_shutdown(SHUTDOWN_crash) without printing anything. */
noreturn void crash(void);
/* Prints "panic: <msg>" then crashes. */
noreturn void panic(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* VCPUOP_initialise + VCPUOP_up of vCPU `id`: kernel mode, flat segments, this vCPU's page
 * tables, events masked, running main() on [stack, stack + size). Returns the first error. */
long vcpu_start(unsigned id, noreturn void (*main)(void), void *stack, unsigned long size);

#endif
