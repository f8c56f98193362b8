/* Attack: console output without a newline, as fast as the guest can.
 *
 * cmdline `calls=<n>` (default 600) writes of 64 KiB of 'A' each, with no
 * newline anywhere; `ring=1` writes through the xencons ring (the kernel's
 * console_write) instead of HYPERVISOR_console_io. Each write is timed with
 * system time. Then a newline ends the line and it prints
 *   result flood_calls <n>          writes done
 *   result flood_failed <k>         console_io calls that did not return 0
 *   result flood_first_ns <t>       median time of the first 10 writes
 *   result flood_last_ns <t>        median time of the last 10 writes
 * and `console_flood: done`, poweroff. On Xen (a 256-byte unfinished line
 * per domain, rate-limited output) the per-write time stays flat. */
#include "hostile.h"
#include "time.h"

#define CHUNK 65536
#define MAX_CALLS 4096
#define MED 10

static char buf[CHUNK] __attribute__((aligned(PAGE_SIZE)));
static u64 took[MAX_CALLS];

static u64 median(const u64 *v)
{
    u64 s[MED];
    for (int i = 0; i < MED; i++) {
        int j = i;
        while (j > 0 && s[j - 1] > v[i]) { s[j] = s[j - 1]; j--; }
        s[j] = v[i];
    }
    return s[MED / 2];
}

void app_main(void)
{
    unsigned long calls = cmdline_u64(cmdline(), "calls", 600);
    int use_ring = (int)cmdline_u64(cmdline(), "ring", 0);
    if (calls < MED || calls > MAX_CALLS)
        panic("calls must be %d..%d", MED, MAX_CALLS);
    memset(buf, 'A', sizeof(buf));
    printk("about to flood the console: %lu x %d bytes%s\n", calls, CHUNK,
           use_ring ? " (ring)" : "");
    long failed = 0;
    for (unsigned long i = 0; i < calls; i++) {
        u64 t0 = monotonic_ns();
        if (use_ring)
            console_write(buf, CHUNK);
        else if (HYPERVISOR_console_io(CONSOLEIO_write, CHUNK, buf) != 0)
            failed++;
        took[i] = monotonic_ns() - t0;
    }
    printk("\n");
    result("flood_calls", (long)calls);
    result("flood_failed", failed);
    result("flood_first_ns", (long)median(took));
    result("flood_last_ns", (long)median(took + calls - MED));
    printk("console_flood: done\n");
    poweroff();
}
