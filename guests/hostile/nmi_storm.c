/* Attack: an NMI storm. vCPU 1 sends VCPUOP_send_nmi to vCPU 0 back to back for `secs=`
 * seconds (default 2) while vCPU 0 works (a counted loop with hypercalls) and its NMI handler
 * counts and returns with HYPERVISOR_iret. Xen: each send only sets nmi_pending (once) and
 * kicks; the NMI is taken at vCPU 0's next return to the guest, masked until its iret.
 * Expected: vCPU 0 keeps running (work grows), takes NMIs, never nested; the host and a
 * bystander are unaffected. Needs vcpus=2. Output: result sends <n>, nmis <n>, nested 0,
 * work <n>, alive 1. */
#include "hostile.h"
#include "time.h"
#include <xen/vcpu.h>

static u8 ap_stack[16384] __attribute__((aligned(16)));
static volatile u64 go, done, sends, bad, nmis, depth, nested;
static u64 secs;

static int nmi_handler(struct regs *r)
{
    (void)r;
    if (++depth > 1)
        nested = 1;
    nmis++;
    depth--;
    return 1;
}

noreturn void ap_main(void);
noreturn void ap_main(void)
{
    while (!go)
        ;
    u64 end = monotonic_ns() + secs * 1000000000UL;
    while (monotonic_ns() < end) {
        long rc = HYPERVISOR_vcpu_op(VCPUOP_send_nmi, 0, NULL);
        if (rc)
            bad++;
        sends++;
    }
    done = 1;
    HYPERVISOR_vcpu_op(VCPUOP_down, 1, NULL);
    for (;;)
        sched_yield();
}

void app_main(void)
{
    traps_init();
    set_trap_handler(2, nmi_handler);
    secs = cmdline_u64(cmdline(), "secs", 2);
    if (vcpu_start(1, ap_main, ap_stack, sizeof(ap_stack)))
        panic("vCPU 1");
    struct callback_register cb = { .type = CALLBACKTYPE_nmi, .address = (unsigned long)trap_nmi };
    if (HYPERVISOR_callback_op(CALLBACKOP_register, &cb))
        panic("nmi callback");
    go = 1;
    u64 work = 0, t0 = monotonic_ns();
    while (!done && monotonic_ns() - t0 < (secs + 30) * 1000000000UL) {
        work++;
        if (!(work & 1023))
            HYPERVISOR_xen_version(0, NULL);
    }
    result("sends", (long)sends);
    result("send_errors", (long)bad);
    result("nmis", (long)nmis);
    result("nested", (long)nested);
    result("work", (long)work);
    result("alive", 1);
    poweroff();
}
