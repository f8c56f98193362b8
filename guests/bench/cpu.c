/* CPU benchmark: runs the workload, timed with pvclock. */
#include "console.h"
#include "sched.h"
#include "time.h"

u64 work(void);

void app_main(void)
{
    u64 t0 = monotonic_ns();
    u64 r = work();
    u64 t1 = monotonic_ns();
    printk("cpu: result=0x%lx ns=%lu\n", r, t1 - t0);
    poweroff();
}
