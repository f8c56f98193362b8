/* Attack: IPIs in a tight loop. Every IPI-port send makes the target vCPU drop its translated
 * code before its next slice on an emulated engine (vcpu.py VCPU.ipi_code_sync), so a guest
 * that sends IPIs back to back could make its vCPUs retranslate all the time and the host do
 * the drop per send. Xen: each send only sets a pending bit. Ports bound to vCPU 0 (itself)
 * and to vCPU 1 (`vcpus=2` given: never brought up, i.e. down) are masked and sent to
 * alternately for `secs=` seconds (default 3). Expected: the host stays responsive, the drop
 * happens at most once per CODE_SYNC_S per vCPU, the guest runs on. Output:
 * `result bind_self 0+`, `result bind_down <port or errno>`, `result ipi_sends <n>`. */
#include "hostile.h"
#include "time.h"

static long bind_ipi(unsigned vcpu)
{
    struct evtchn_bind_ipi op = { .vcpu = vcpu };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_ipi, &op);
    return rc ? rc : (long)op.port;
}

void app_main(void)
{
    u64 secs = cmdline_u64(cmdline(), "secs", 3);
    long self = bind_ipi(0), down = bind_ipi(1);
    result("bind_self", self >= 0 ? 0 : self);
    result("bind_down", down >= 0 ? 0 : down);
    if (self >= 0)
        mask_evtchn((evtchn_port_t)self);
    if (down >= 0)
        mask_evtchn((evtchn_port_t)down);
    u64 end = monotonic_ns() + secs * 1000000000UL, n = 0;
    long bad = 0;
    while (monotonic_ns() < end) {
        for (unsigned i = 0; i < 64; i++) {
            long rc = evtchn_send((evtchn_port_t)self);
            if (down >= 0)
                rc |= evtchn_send((evtchn_port_t)down);
            bad |= rc;
            n++;
        }
    }
    result("ipi_send_errors", bad);
    result("ipi_sends", (long)n);
    result("alive", 1);
    poweroff();
}
