/* Attack: register a kernel stack inside Xen's area (stack_switch to
 * 0xFFFF800000001000, the read-only M2P) and then cause a user->kernel
 * transition (the user program's first syscall): the bounce frame would be
 * written into Xen's range. Xen: stack_switch itself returns 0 (it only
 * records the value); the transition crashes the domain (ABI §5.3, §5.9). */
#include "hostile.h"
#include "user.h"

void app_main(void)
{
    hostile_traps_init();
    user_setup();                       /* user page tables, sane kernel stack */
    long rc = HYPERVISOR_stack_switch(FLAT_KERNEL_SS, 0xFFFF800000001000UL);
    result("stack_switch", rc);
    printk("about to enter user mode with the kernel stack at 0xffff800000001000\n");
    long status = user_run();
    result("stack_into_xen_survived", 1);
    result("user_status", status);
    poweroff();
}
