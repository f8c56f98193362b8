/* Last output right before the end: the hypervisor must have all of it by the time a
 * waiter learns that the domain ended (Domain.wait, console_lines, the log file).
 *
 * It waits until the backend has read everything so far, then writes `lines=<n>` (default
 * 60) lines `last_words <i>` of at most 16 bytes with nothing in between, then with
 * `tail=1` an unfinished line `tail-without-newline`, and ends at once with `end=poweroff`
 * (default) or `end=crash` (SCHEDOP_shutdown directly: no "poweroff" line), or `end=fault`
 * (a page fault with no trap table: the hypervisor crashes the domain). What it writes
 * after the flush fits the 2 KiB ring, so none of it waits for room: the backend, which
 * reads the ring between slices, has read none of it when the guest stops. `console=hypercall`
 * sends the same through console_io. */
#include "console.h"
#include "hypercall.h"
#include "lib.h"
#include "sched.h"

void app_main(void)
{
    const char *cl = (const char *)start_info->cmd_line;
    unsigned long lines = cmdline_u64(cl, "lines", 60);
    int tail = (int)cmdline_u64(cl, "tail", 0);
    char end[16] = "poweroff";
    cmdline_str(cl, "end", end, sizeof end);
    if (lines > 100)
        lines = 100;                       /* 100 x 16 bytes + the tail fit the ring */
    printk("last_words: start\n");
    console_flush();
    for (unsigned long i = 0; i < lines; i++)
        printk("last_words %lu\n", i);
    if (tail)
        printk("tail-without-newline");
    if (!strcmp(end, "fault"))
        (void)*(volatile unsigned long *)0x1000;   /* no trap table: the hypervisor crashes it */
    struct sched_shutdown sd = { .reason = strcmp(end, "crash") ? SHUTDOWN_poweroff : SHUTDOWN_crash };
    HYPERVISOR_sched_op(SCHEDOP_shutdown, &sd);
    for (;;)
        HYPERVISOR_sched_op(SCHEDOP_yield, NULL);
}
