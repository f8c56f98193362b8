/* Timer events to a vCPU that is running, not blocked (tests/test_timer_late.py): Xen's
 * timer interrupt preempts the guest at the deadline, so a guest spinning on the clock sees
 * VIRQ_TIMER right after the deadline passes. The periodic timer is stopped; `timers`
 * (default 40) singleshot timers (set_timer_op) are set 0.3-2 ms ahead, a different phase
 * each, and the guest spins reading its pvclock until the event. Per timer:
 *   late:  how long the guest ran with the deadline passed and no event: the sum of the
 *          steps between its clock reads after the deadline, each step capped at
 *          GAP_CAP_NS (a longer one is time the vCPU did not run: the host preempted the
 *          hypervisor, which on Xen is a vCPU descheduled, whose event waits for it)
 *   early: the event came before the deadline (Xen never sends it before)
 *   back:  a clock read smaller than the one before it (the pvclock went backwards)
 * Prints "timer_late: n=<n> late_median_ns=<> late_max_ns=<> early=<> back=<> read_ns=<>"
 * (read_ns: wall time per clock read, for scale) and powers off. */
#include "os.h"
#include "hypercall.h"
#include "console.h"
#include "events.h"
#include "lib.h"
#include "sched.h"
#include "time.h"
#include "traps.h"

#define MAX_TIMERS 200
#define GAP_CAP_NS 20000      /* a longer gap between two reads: the vCPU was not running */

static volatile int fired;
static volatile u64 fired_at;

static void handler(evtchn_port_t port, struct regs *r)
{
    (void)port; (void)r;
    if (!fired) {
        fired_at = monotonic_ns();
        fired = 1;
    }
}

static u64 lates[MAX_TIMERS];

void app_main(void)
{
    u64 n = cmdline_u64((const char *)start_info->cmd_line, "timers", 40);
    if (n == 0 || n > MAX_TIMERS)
        n = 40;
    traps_init();
    long rc = HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);
    if (rc)
        panic("stop_periodic_timer failed: %ld", rc);
    long port = bind_virq(VIRQ_TIMER, 0, handler);
    if (port < 0)
        panic("bind_virq(VIRQ_TIMER) failed: %ld", port);
    rc = unmask_evtchn(port);
    if (rc)
        panic("evtchn unmask failed: %ld", rc);
    irq_enable();
    u64 early = 0, back = 0, reads = 0, t_start = monotonic_ns();
    for (u64 i = 0; i < n; i++) {
        fired = 0;
        barrier();
        u64 now = monotonic_ns();
        u64 deadline = now + 300000 + (i * 437000) % 1700000;
        rc = HYPERVISOR_set_timer_op(deadline);
        if (rc)
            panic("set_timer_op failed: %ld", rc);
        u64 last = now, past = 0;
        while (!ACCESS_ONCE(fired)) {
            u64 t = monotonic_ns();
            reads++;
            if (t < last)
                back++;
            else if (t >= deadline) {
                u64 d = t - (last > deadline ? last : deadline);
                past += d < GAP_CAP_NS ? d : GAP_CAP_NS;
            }
            last = t;
        }
        if (fired_at < deadline)
            early++;
        lates[i] = past;
    }
    /* insertion sort: n is small */
    for (u64 i = 1; i < n; i++) {
        u64 x = lates[i], j = i;
        for (; j > 0 && lates[j - 1] > x; j--)
            lates[j] = lates[j - 1];
        lates[j] = x;
    }
    u64 spent = monotonic_ns() - t_start;
    printk("timer_late: n=%lu late_median_ns=%lu late_max_ns=%lu early=%lu back=%lu "
           "read_ns=%lu\n", n, lates[n / 2], lates[n - 1], early, back, spent / (reads ?: 1));
    poweroff();
}
