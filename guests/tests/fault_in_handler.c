/* The #PF handler itself faults. Each nested fault pushes another bounce
 * frame; the stack runs into an unmapped guard page and the hypervisor
 * cannot deliver the fault any more: it must crash the domain. */
#include "console.h"
#include "sched.h"
#include "traps.h"
#include "mm.h"

/* Page 0: guard (unmapped), pages 1-3: stack for the test. */
static char area[4 * PAGE_SIZE] __attribute__((aligned(PAGE_SIZE), section(".bss.page_aligned")));

void call_on_stack(void (*fn)(void), void *stack_top);

static int pf_handler(struct regs *r)
{
    (void)*(volatile unsigned long *)0x2000;
    return 0;
}

static void fault(void)
{
    (void)*(volatile unsigned long *)0x1000;
}

void app_main(void)
{
    traps_init();
    set_trap_handler(14, pf_handler);
    long rc = unmap_page((unsigned long)area);
    if (rc) panic("unmapping the guard page failed: %ld", rc);
    printk("about to fault\n");
    call_on_stack(fault, area + sizeof(area));
    panic("survived a fault in the page-fault handler");
}
