/* Exceptions after the vCPU has blocked, yielded and taken an event upcall:
 * each must still be delivered as itself (not as #DF, not dropped). */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "traps.h"
#include "events.h"

static volatile unsigned upcalls;

static void timer(evtchn_port_t port, struct regs *r) { upcalls++; }

static int report(struct regs *r)
{
    u64 rip = r->rip;
    if (!fixup_skip(r))
        return 0;
    printk("result trap_%lu rip=0x%lx\n", r->vector, rip);
    return 1;
}

void app_main(void)
{
    traps_init();
    for (unsigned v = 0; v < 32; v++)
        set_trap_handler(v, report);
    long port = bind_virq(VIRQ_TIMER, 0, timer);
    if (port < 0) panic("bind_virq failed: %ld", port);

    irq_disable();
    while (!upcalls)
        sched_block();                  /* block + upcall on wake */
    sched_yield();
    irq_enable();
    unsigned seen = upcalls;
    while (upcalls == seen)             /* upcall while running */
        ;
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);
    printk("result upcalls_ok 1\n");

    probe_ud2();
    probe_cli();
    probe_read(0x1000);
    probe_int3();
    printk("result traps_after_events 4\n");
    poweroff();
}
