/* CPU hog for the scheduler tests: prints "hog: ready", then computes forever (or for
 * secs=<n> seconds of pvclock time, then "hog: done iters=<n>" and poweroff). It never
 * blocks, so it always wants the CPU: only the scheduler decides how much it gets. */
#include "os.h"
#include "console.h"
#include "lib.h"
#include "sched.h"
#include "time.h"

void app_main(void)
{
    u64 secs = cmdline_u64((const char *)start_info->cmd_line, "secs", 0);
    u64 end = secs ? monotonic_ns() + secs * 1000000000UL : 0;
    volatile u64 x = 1;
    u64 iters = 0;
    printk("hog: ready\n");
    for (;;) {
        for (int i = 0; i < 100000; i++)
            x = x * 6364136223846793005UL + 1442695040888963407UL;
        iters++;
        if (end && monotonic_ns() >= end)
            break;
    }
    printk("hog: done iters=%lu\n", iters);
    poweroff();
}
