#include <stdarg.h>
#include "console.h"
#include <xen/io/console.h>
#include "hypercall.h"
#include "events.h"
#include "time.h"
#include "mm.h"
#include "lib.h"

/* Placeholder VA the console page is mapped over. */
static char cons_page[PAGE_SIZE] __attribute__((aligned(PAGE_SIZE), section(".bss.page_aligned")));
static struct xencons_interface *ring;
static evtchn_port_t cons_port;

int console_is_ring(void) { return ring != NULL; }

void console_init(void)
{
    char mode[16];
    if (cmdline_str((const char *)start_info->cmd_line, "console", mode, sizeof(mode)) &&
        !strcmp(mode, "hypercall"))
        return;
    if (!start_info->console.domU.mfn)
        return;
    unsigned long va = (unsigned long)cons_page;
    if (map_frame(va, start_info->console.domU.mfn, PTE_KERNEL_RW))
        return;                                 /* stay on console_io */
    cons_port = start_info->console.domU.evtchn;
    mask_evtchn(cons_port);                     /* we poll it, no upcalls */
    ring = (struct xencons_interface *)va;
}

/* Ring full: wait for the backend to consume (it notifies the port). */
static void wait_for_space(void)
{
    clear_evtchn(cons_port);
    mb();
    if (ACCESS_ONCE(ring->out_prod) - ACCESS_ONCE(ring->out_cons) < sizeof(ring->out))
        return;
    evtchn_poll(cons_port, monotonic_ns() + 10000000UL);
}

static void ring_write(const char *s, unsigned len)
{
    int mask = irq_save();          /* printk from an event handler must not interleave */
    while (len) {
        XENCONS_RING_IDX cons = ACCESS_ONCE(ring->out_cons);
        XENCONS_RING_IDX prod = ring->out_prod;
        mb();
        unsigned space = sizeof(ring->out) - (prod - cons);
        if (space > sizeof(ring->out)) space = 0;   /* bogus indices: wait */
        if (!space) {
            evtchn_send(cons_port);
            wait_for_space();
            continue;
        }
        unsigned n = len < space ? len : space;
        for (unsigned i = 0; i < n; i++)
            ring->out[MASK_XENCONS_IDX(prod + i, ring->out)] = s[i];
        wmb();
        ACCESS_ONCE(ring->out_prod) = prod + n;
        s += n;
        len -= n;
    }
    evtchn_send(cons_port);
    irq_restore(mask);
}

void console_flush(void)
{
    if (!ring) return;
    evtchn_send(cons_port);
    u64 deadline = monotonic_ns() + 1000000000UL;
    while (ACCESS_ONCE(ring->out_cons) != ACCESS_ONCE(ring->out_prod) && monotonic_ns() < deadline) {
        clear_evtchn(cons_port);
        mb();
        if (ACCESS_ONCE(ring->out_cons) == ACCESS_ONCE(ring->out_prod)) break;
        evtchn_poll(cons_port, monotonic_ns() + 10000000UL);
    }
}

void console_use_hypercall(void)
{
    console_flush();
    ring = NULL;
}

void console_write(const char *s, unsigned len)
{
    if (!len) return;
    if (ring)
        ring_write(s, len);
    else
        HYPERVISOR_console_io(CONSOLEIO_write, len, s);
}

/* Formats into a stack buffer and writes it in one go (one console_io call
 * or one ring publish), so a complete line reaches the console at once. */
int printk(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 1) n = sizeof(buf) - 1;
    console_write(buf, (unsigned)n);
    return n;
}
