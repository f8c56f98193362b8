/* Attack: point the kernel's own RSP into Xen's area (0xFFFF800000001000)
 * and fault (ud2): Xen must push the bounce frame on the current guest RSP,
 * which lies in its reserved range. Xen: the domain is crashed (ABI §5.3). */
#include "hostile.h"

void evil_fault(void);
__asm__(
    "    .text\n"
    "    .globl evil_fault\n"
    "evil_fault:\n"
    "    movabs $0xFFFF800000001000, %rsp\n"
    "    ud2\n"
    "1:  pause\n"
    "    jmp 1b\n");

void app_main(void)
{
    hostile_traps_init();
    printk("about to fault with rsp=0xffff800000001000\n");
    evil_fault();
    panic("survived a fault with the stack in Xen's area");
}
