/* Triggers #DE, int3, #UD, #GP and #PF in turn; each handler reports the
 * frame and skips the instruction. */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "traps.h"

static unsigned handled;

static int report(struct regs *r)
{
    u64 rip = r->rip;
    if (!fixup_skip(r))
        return 0;
    if (r->vector == 14)
        printk("result trap_%lu rip=0x%lx err=0x%lx cr2=0x%lx\n",
               r->vector, rip, r->error, vcpu0()->arch.cr2);
    else
        printk("result trap_%lu rip=0x%lx err=0x%lx\n", r->vector, rip, r->error);
    handled++;
    return 1;
}

void app_main(void)
{
    traps_init();
    set_trap_handler(0, report);
    set_trap_handler(3, report);
    set_trap_handler(6, report);
    set_trap_handler(13, report);
    set_trap_handler(14, report);

    probe_div0();
    probe_int3();
    probe_ud2();
    probe_hlt();
    probe_read(0x1000);

    printk("result traps_handled %u\n", handled);
    poweroff();
}
