/* Hypercall round-trip benchmark: n x xen_version(XENVER_version) per round. */
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

    for (u64 r = 0; r < rounds; r++) {
        u64 t0 = monotonic_ns();
        for (u64 i = 0; i < n; i++)
            HYPERVISOR_xen_version(XENVER_version, NULL);
        u64 t1 = monotonic_ns();
        printk("hypercall: round=%lu n=%lu ns=%lu\n", r, n, t1 - t0);
    }
    poweroff();
}
