/* C entry from head.S: record boot state, map shared_info, run the app. */
#include "os.h"
#include "mm.h"
#include "sched.h"
#include "console.h"

start_info_t *start_info;
shared_info_t *HYPERVISOR_shared_info;
unsigned long entry_rsp;

void start_kernel(start_info_t *si, unsigned long rsp)
{
    start_info = si;
    entry_rsp = rsp;
    map_shared_info();
    mm_init();
    console_init();
    app_main();
    poweroff();
}
