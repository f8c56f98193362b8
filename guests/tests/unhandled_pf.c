/* No trap table: a page fault must make the hypervisor crash the domain. */
#include "console.h"
#include "sched.h"

void app_main(void)
{
    printk("about to fault\n");
    (void)*(volatile unsigned long *)0x1000;
    panic("survived an unhandled page fault");
}
