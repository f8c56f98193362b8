/* Minimal guest: prints "hello" and powers off (boot benchmarks). */
#include "console.h"
#include "sched.h"

void app_main(void)
{
    printk("hello\n");
    poweroff();
}
