/* Hypercall round-trip benchmark: n x one hypercall per round, xen_version(XENVER_version)
 * by default; `op=stack_switch` or `op=segbase` (set_segment_base(SEGBASE_FS)) measure the
 * hypercalls whose whole effect is vCPU state; `op=pagesize` (xen_version(XENVER_pagesize,
 * NULL)) a trivial one that the KVM engine's C loop leaves to the Python dispatcher. */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "time.h"
#include "lib.h"

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    u64 n = cmdline_u64(cmd, "n", 100000);
    u64 rounds = cmdline_u64(cmd, "rounds", 5);
    char op[16] = "xen_version";
    cmdline_str(cmd, "op", op, sizeof op);
    int which = op[0] == 's' && op[1] == 't' ? 1 : op[0] == 's' ? 2 : op[0] == 'p' ? 3 : 0;

    for (u64 r = 0; r < rounds; r++) {
        u64 t0 = monotonic_ns();
        long bad = 0;
        for (u64 i = 0; i < n; i++) {
            if (which == 1)
                bad |= HYPERVISOR_stack_switch(FLAT_KERNEL_SS, 0xffff800000000000UL - 16 * (i & 15));
            else if (which == 2)
                bad |= _hypercall2(__HYPERVISOR_set_segment_base, 0 /* SEGBASE_FS */, 16 * (i & 15));
            else if (which == 3)
                bad |= HYPERVISOR_xen_version(XENVER_pagesize, NULL) != 4096;
            else
                HYPERVISOR_xen_version(XENVER_version, NULL);
        }
        u64 t1 = monotonic_ns();
        if (bad)
            printk("hypercall: %s failed\n", op);
        printk("hypercall: round=%lu n=%lu ns=%lu\n", r, n, t1 - t0);
    }
    poweroff();
}
