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
static struct xencons_interface *ring;        /* output goes here when set */
/* The mapped console page, for input: set with `ring`, or on first use of
 * console_read/console_wait_input under console=hypercall. Unlike `ring` it
 * survives console_use_hypercall(). */
static struct xencons_interface *in_ring;
static int in_ring_tried;
static evtchn_port_t cons_port;

int console_is_ring(void) { return ring != NULL; }

static struct xencons_interface *map_cons_page(void)
{
    if (in_ring || in_ring_tried)
        return in_ring;
    in_ring_tried = 1;
    if (!start_info->console.domU.mfn)
        return NULL;
    unsigned long va = (unsigned long)cons_page;
    if (map_frame(va, start_info->console.domU.mfn, PTE_KERNEL_RW))
        return NULL;
    cons_port = start_info->console.domU.evtchn;
    mask_evtchn(cons_port);                     /* we poll it, no upcalls */
    in_ring = (struct xencons_interface *)va;
    return in_ring;
}

void console_init(void)
{
    char mode[16];
    if (cmdline_str((const char *)start_info->cmd_line, "console", mode, sizeof(mode)) &&
        !strcmp(mode, "hypercall"))
        return;
    ring = map_cons_page();                     /* NULL: stay on console_io */
}

/* After a suspend into a new domain: the console page keeps its VA (its PFN
 * is the same), but the event channel is a new one. */
void console_resume(void)
{
    if (!in_ring) return;
    cons_port = start_info->console.domU.evtchn;
    mask_evtchn(cons_port);
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

/* ---- input: the ring's in[] (backend produces, we consume) ---- */

/* Bytes the backend has published and we have not consumed; 0 for bogus
 * indices (more than the ring holds). */
static unsigned input_avail(struct xencons_interface *r)
{
    XENCONS_RING_IDX cons = r->in_cons;
    XENCONS_RING_IDX prod = ACCESS_ONCE(r->in_prod);
    rmb();                                      /* in_prod before in[] */
    unsigned n = prod - cons;
    return n > sizeof(r->in) ? 0 : n;
}

int console_read(char *buf, int len)
{
    struct xencons_interface *r = map_cons_page();
    if (!r) return -1;
    if (len <= 0) return 0;
    XENCONS_RING_IDX cons = r->in_cons;
    XENCONS_RING_IDX prod = ACCESS_ONCE(r->in_prod);
    rmb();                                      /* in_prod before in[] */
    if (prod - cons > sizeof(r->in)) {
        /* Bogus indices from the backend: drop what is there. */
        mb();
        ACCESS_ONCE(r->in_cons) = prod;
        evtchn_send(cons_port);
        return 0;
    }
    int n = 0;
    while (cons != prod && n < len)
        buf[n++] = r->in[MASK_XENCONS_IDX(cons++, r->in)];
    if (n) {
        mb();                                   /* in[] reads before in_cons */
        ACCESS_ONCE(r->in_cons) = cons;
        evtchn_send(cons_port);
    }
    return n;
}

int console_input_open(void)
{
    return map_cons_page() ? 0 : -1;
}

int console_wait_input(u64 deadline_ns)
{
    struct xencons_interface *r = map_cons_page();
    if (!r) return -1;
    for (;;) {
        if (input_avail(r)) return 1;
        if (deadline_ns && monotonic_ns() >= deadline_ns) return 0;
        /* The port also signals output progress: clear, recheck, then poll,
         * so a notification between the check and the poll is not lost. */
        clear_evtchn(cons_port);
        mb();
        if (input_avail(r)) return 1;
        evtchn_poll(cons_port, deadline_ns);
    }
}
