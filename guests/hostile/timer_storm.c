/* A guest that re-arms its singleshot timer from its own VIRQ_TIMER handler, forever, with
 * deadlines chosen to make the hypervisor do the most timer work per unit of guest CPU
 * (tests/test_redteam_timer_storm.py): every event costs a slice cut, a loop timer, an
 * event delivery. Between events it spins, never blocking.
 * cmdline:
 *   via=0  VCPUOP_set_singleshot_timer, flags 0      (default)
 *   via=1  VCPUOP_set_singleshot_timer, VCPU_SSHOTTMR_future
 *   via=2  set_timer_op
 *   kind=0 deadline = now + delta (default; delta default 1000 ns)
 *   kind=1 deadline = now - delta (in the past)
 *   kind=2 deadline = abs (any u64: 1, 2^63, ~0)
 *   secs=S stop after S seconds of pvclock time (0: never)
 * Prints "timer_storm: ready" before the first timer is armed (a deadline already passed
 * keeps the guest in its handler: that is its own business, as on Xen), then (secs) "timer_storm: done
 * iters=<n> events=<n> errors=<n>" and powers off. */
#include "hostile.h"
#include "time.h"
#include <xen/vcpu.h>

static u64 via, kind, delta, absval;
static volatile u64 events, errors;

static void arm(void)
{
    u64 now = monotonic_ns();
    u64 t = kind == 0 ? now + delta : kind == 1 ? now - delta : absval;
    long rc;
    if (via == 2) {
        rc = HYPERVISOR_set_timer_op(t);
    } else {
        struct vcpu_set_singleshot_timer st = {
            .timeout_abs_ns = t, .flags = via == 1 ? VCPU_SSHOTTMR_future : 0 };
        rc = HYPERVISOR_vcpu_op(VCPUOP_set_singleshot_timer, 0, &st);
    }
    if (rc)
        errors++;
}

static void handler(evtchn_port_t port, struct regs *r)
{
    (void)port; (void)r;
    events++;
    arm();
}

void app_main(void)
{
    const char *cl = (const char *)start_info->cmd_line;
    via = cmdline_u64(cl, "via", 0);
    kind = cmdline_u64(cl, "kind", 0);
    delta = cmdline_u64(cl, "delta", 1000);
    absval = cmdline_u64(cl, "abs", 1);
    u64 secs = cmdline_u64(cl, "secs", 0);
    traps_init();
    if (HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL))
        panic("stop_periodic_timer failed");
    long port = bind_virq(VIRQ_TIMER, 0, handler);
    if (port < 0 || unmask_evtchn(port))
        panic("bind_virq(VIRQ_TIMER) failed: %ld", port);
    printk("timer_storm: ready\n");
    irq_enable();
    arm();
    u64 end = secs ? monotonic_ns() + secs * 1000000000UL : 0;
    volatile u64 iters = 0;
    while (!end || (iters & 0xFFFF) || monotonic_ns() < end)
        iters++;                      /* computes between events, never blocks */
    printk("timer_storm: done iters=%lu events=%lu errors=%lu\n", iters, events, errors);
    poweroff();
}
