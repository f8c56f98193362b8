/* Save/restore test guest: an uptime counter (timer ticks) and a memory
 * pattern whose checksum must carry across a suspend, into a new domain or a
 * cancelled one. Fills `pages=<n>` (default 64) pages with a pattern seeded
 * by the tick count at boot, then loops: on every `every=<n>` ticks (default
 * 10) it prints the uptime and the checksum; it serves suspend requests.
 * Stops after `ticks=<n>` ticks (default 0: never) with poweroff.
 * `bad_si=<mfn>`: answer a suspend request with that MFN as start_info (a
 * hostile guest: the hypervisor must refuse it) and carry on.
 * `dirty=<n>`: rewrite n pages of the pattern on every tick (a busy guest for
 * live migration; the checksum then changes as it goes).
 * `balloon=<n>` (n <= 16): give back n pages (XENMEM_decrease_reservation), each
 * unmapped first so that it is freed at once, before the pattern is made:
 *   balloon: gave back mfn=<hex> pfn=<hex> rc=<n>
 * `refill=1` (with balloon): populate each pfn again (XENMEM_populate_physmap, as
 * Linux's balloon does on the way up), map its new frame where the old one was and
 * enter it in the guest's P2M; these pages are the first of the pattern:
 *   balloon: refilled pfn=<hex> mfn=<hex> rc=<n>
 *
 *   suspend: ready pages=<n> sum=<hex>
 *   uptime: ticks=<n> sum=<hex>     (n = every, 2*every, ...: each milestone once)
 *   suspend: resumed rc=<0|1>
 */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "events.h"
#include "suspend.h"
#include "xenbus.h"
#include "time.h"
#include "mm.h"
#include "lib.h"
#include "traps.h"
#include <xen/memory.h>

static volatile u64 ticks;
static long timer_port = -1;
static u64 *pages[256];
static unsigned npages;

static void on_timer(evtchn_port_t port, struct regs *r) { (void)port; (void)r; ticks++; }

static void bind_timer(void)
{
    timer_port = bind_virq(VIRQ_TIMER, 0, on_timer);
    if (timer_port < 0) panic("bind_virq failed: %ld", timer_port);
    struct vcpu_set_periodic_timer p = { .period_ns = 10000000UL };
    if (HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, 0, &p)) panic("set_periodic failed");
    unmask_evtchn(timer_port);
}

static long reservation(unsigned cmd, xen_pfn_t *list)
{
    struct xen_memory_reservation r;
    memset(&r, 0, sizeof(r));
    set_xen_guest_handle(r.extent_start, list);
    r.nr_extents = 1;
    r.domid = DOMID_SELF;
    return HYPERVISOR_memory_op(cmd, &r);
}

/* All n pages are given back first, then refilled in order: the hypervisor hands the
 * last freed frame out first, so a refilled pfn gets another frame than it had. */
static unsigned balloon(unsigned n, int refill)
{
    void *va[16];
    unsigned long pfns[16];
    unsigned kept = 0;
    if (n > 16) n = 16;
    for (unsigned i = 0; i < n; i++) {
        void *p = va[i] = alloc_page();
        unsigned long mfn = virt_to_mfn(p), pfn = pfns[i] = mfn_to_pfn(mfn);
        long rc = unmap_page((unsigned long)p);
        if (rc) panic("balloon: unmap failed: %ld", rc);
        xen_pfn_t list[1] = { mfn };
        rc = reservation(XENMEM_decrease_reservation, list);
        printk("balloon: gave back mfn=0x%lx pfn=0x%lx rc=%ld\n", mfn, pfn, rc);
    }
    for (unsigned i = 0; refill && i < n && kept < npages; i++) {
        xen_pfn_t list[1] = { pfns[i] };
        long rc = reservation(XENMEM_populate_physmap, list);
        printk("balloon: refilled pfn=0x%lx mfn=0x%lx rc=%ld\n", pfns[i], list[0], rc);
        if (rc != 1) panic("balloon: populate failed");
        ((unsigned long *)start_info->mfn_list)[pfns[i]] = list[0];
        if (map_frame((unsigned long)va[i], list[0], PTE_KERNEL_RW)) panic("balloon: map failed");
        pages[kept++] = va[i];
    }
    return kept;
}

static u64 checksum(void)
{
    u64 s = 0;
    for (unsigned i = 0; i < npages; i++)
        for (unsigned j = 0; j < PAGE_SIZE / 8; j++)
            s = (s * 31) ^ pages[i][j];
    return s;
}

void app_main(void)
{
    const char *cl = (const char *)start_info->cmd_line;
    traps_init();
    npages = cmdline_u64(cl, "pages", 64);
    if (npages > 256) npages = 256;
    if (npages > 64) mm_map_all();        /* the boot mapping's spare frames are fewer */
    u64 every = cmdline_u64(cl, "every", 10) ?: 10;
    u64 stop = cmdline_u64(cl, "ticks", 0);
    u64 dirty = cmdline_u64(cl, "dirty", 0);
    bad_start_info = cmdline_u64(cl, "bad_si", 0);
    unsigned refilled = balloon(cmdline_u64(cl, "balloon", 0), cmdline_u64(cl, "refill", 0) != 0);
    u64 seen = 0, k = 0;
    u64 seed = monotonic_ns();
    for (unsigned i = 0; i < npages; i++) {
        if (i >= refilled)
            pages[i] = alloc_page();
        for (unsigned j = 0; j < PAGE_SIZE / 8; j++)
            pages[i][j] = seed ^ ((u64)i << 32) ^ j;
    }
    if (xenbus_init()) panic("xenbus_init failed");
    if (suspend_init(bind_timer)) panic("suspend_init failed");
    printk("suspend: ready pages=%u sum=0x%lx\n", npages, checksum());
    bind_timer();
    irq_enable();
    u64 next = every;
    for (;;) {
        suspend_check(monotonic_ns() + 5000000UL);
        irq_disable();
        u64 t = ticks;
        irq_enable();
        for (; dirty && seen < t; seen++)
            for (u64 i = 0; i < dirty && npages; i++, k++)
                for (unsigned j = 0; j < PAGE_SIZE / 8; j++)
                    pages[k % npages][j]++;
        while (t >= next) {              /* every milestone, even if ticks came fast */
            printk("uptime: ticks=%lu sum=0x%lx\n", next, checksum());
            next += every;
        }
        if (stop && t >= stop)
            poweroff();
    }
}
