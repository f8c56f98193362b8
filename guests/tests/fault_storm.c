/* Exceptions raised while slices keep ending and events keep arriving (issue 11): every
 * exception must reach its handler with the frame of the instruction that raised it.
 *
 * The guest faults in a loop (#PF on an unmapped read, #UD) for `ms` milliseconds while a
 * timer event is due at nearly every slice start. On the KVM engine a slice could end while KVM still held the exception it
 * was about to deliver; the hypervisor then bounced the event upcall and KVM delivered the
 * held exception on top of it, at the event callback's first instruction (Linux saw a
 * #PF at a user address in kernel mode: "Oops: 0010"; its network went silent). kvm-pvm
 * delivers the held exception with the context it was raised in, so the registers the
 * bounce had set are replaced and the upcall is lost with events left masked: the fault's
 * frame then carries a saved upcall mask of 1 although the loop runs with events enabled
 * (counted as `masked`). A frame that names no probe instruction (the held exception
 * delivered at the event callback instead, as VMX would) is counted as `stale` and resumed
 * where it says. Both must be 0. */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "traps.h"
#include "events.h"
#include "time.h"
#include "lib.h"

static volatile unsigned long upcalls;
static unsigned long handled, stale, masked;

/* A one-shot timer re-armed 50 us ahead at every tick: it expires while the vCPU runs, so
 * nearly every slice starts with an upcall to deliver. */
static void timer(evtchn_port_t port, struct regs *r)
{
    upcalls++;
    HYPERVISOR_set_timer_op(monotonic_ns() + 50000);
}

static int check(struct regs *r)
{
    u64 rip = r->rip;
    if ((r->cs >> 32) & 0xff)           /* the loop runs with events enabled */
        masked++;
    if (fixup_skip(r)) {
        handled++;
        return 1;
    }
    if (++stale <= 3)
        printk("stale trap_%lu rip=0x%lx err=0x%lx\n", r->vector, rip, r->error);
    return 1;
}

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    u64 ms = cmdline_u64(cmd, "ms", 1500);
    traps_init();
    set_trap_handler(6, check);
    set_trap_handler(14, check);
    if (bind_virq(VIRQ_TIMER, 0, timer) < 0)
        panic("bind_virq failed");
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);
    irq_enable();
    HYPERVISOR_set_timer_op(monotonic_ns() + 50000);
    u64 end = monotonic_ns() + ms * 1000000UL;
    unsigned long n = 0;
    while (monotonic_ns() < end) {
        probe_read(0x1000);
        probe_ud2();
        n += 2;
    }
    irq_disable();
    printk("result faults %lu\n", n);
    printk("result handled %lu\n", handled);
    printk("result upcalls %lu\n", upcalls);
    printk("result stale %lu\n", stale);
    printk("result masked %lu\n", masked);
    poweroff();
}
