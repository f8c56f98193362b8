/* Fork-like MMU workload: build, pin, run and tear down a user address space
 * of 1,000 data pages, `iterations` times. */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "traps.h"
#include "time.h"
#include "lib.h"
#include "mm.h"
#include "fork.h"

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    u64 iters = cmdline_u64(cmd, "iterations", 3);
    u64 pages = cmdline_u64(cmd, "pages", 1000);
    traps_init();
    mm_map_all();
    unsigned long free0 = free_pages_left();
    u64 ok = 0;
    for (u64 i = 0; i < iters; i++) {
        u64 t0 = monotonic_ns();
        unsigned long errors = fork_once((unsigned)pages);
        u64 t1 = monotonic_ns();
        printk("result fork_iter %lu ns=%lu\n", i, t1 - t0);
        if (errors)
            printk("fork: iteration %lu: %lu errors\n", i, errors);
        else
            ok++;
    }
    if (free_pages_left() != free0)
        printk("fork: %lu free pages before, %lu after\n", free0, free_pages_left());
    printk("result fork_ok %lu\n", ok);
    poweroff();
}
