/* Two domains talk through a granted page and an interdomain event channel.
 *   role=offer peer=<domid> [rounds=<n>] [readonly=1 (grant read-only)]
 *   role=map peer=<domid> ref=<r> port=<p> [rounds=<n>]
 * The mapper writes (seq = 2i, pattern A(seq)) and notifies; the offerer
 * checks, writes (seq = 2i+1, pattern B(seq)) and notifies; the mapper checks. */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "events.h"
#include "gnttab.h"
#include "time.h"
#include "lib.h"
#include "mm.h"

#define WORDS 64
struct shared {
    volatile u64 seq;
    volatile u64 data[WORDS];
};

static u64 pat_a(u64 seq, unsigned k) { return (seq * 0x9E3779B97F4A7C15UL) ^ k; }
static u64 pat_b(u64 seq, unsigned k) { return ~(seq * 0xC2B2AE3D27D4EB4FUL) + k; }

#define TIMEOUT_NS 10000000000UL   /* no progress for 10 s: give up */

/* Wait until s->seq == want (events coalesce: the value decides). */
static int wait_seq(struct shared *s, evtchn_port_t port, u64 want)
{
    /* The first request may come late (the harness starts the mapper). */
    u64 deadline = monotonic_ns() + (want == 0 ? 6 * TIMEOUT_NS : TIMEOUT_NS);
    for (;;) {
        clear_evtchn(port);
        mb();
        if (s->seq == want) { rmb(); return 0; }
        if (monotonic_ns() > deadline) return -1;
        evtchn_poll(port, monotonic_ns() + 100000000UL);
    }
}

static void offer(const char *cmd, domid_t peer, u64 rounds)
{
    long rc = gnttab_init();
    if (rc) panic("gnttab_init failed: %ld", rc);
    struct shared *s = alloc_page();
    int ro = cmdline_u64(cmd, "readonly", 0) != 0;   /* for grant_hostile */
    long ref = gnttab_grant_access(peer, virt_to_mfn(s), ro);
    if (ref < 0) panic("grant_access failed");
    long port = evtchn_alloc_unbound(peer);
    if (port < 0) panic("alloc_unbound failed: %ld", port);
    mask_evtchn(port);
    s->seq = ~0UL;
    printk("result offer ref=%ld port=%ld\n", ref, port);

    u64 errors = 0, done = 0;
    for (u64 i = 0; i < rounds; i++) {
        if (wait_seq(s, port, 2 * i)) {
            printk("offer: timeout waiting for round %lu (seq 0x%lx)\n", i, s->seq);
            errors++;
            break;
        }
        unsigned bad = 0;
        for (unsigned k = 0; k < WORDS; k++)
            if (s->data[k] != pat_a(2 * i, k)) bad++;
        if (bad) errors++;
        for (unsigned k = 0; k < WORDS; k++)
            s->data[k] = pat_b(2 * i + 1, k);
        wmb();
        s->seq = 2 * i + 1;
        evtchn_send(port);
        done++;
    }
    printk("result rounds %lu\n", done);
    printk("result errors %lu\n", errors);

    /* The mapper unmaps, then notifies; end_access succeeds once the
     * grant is no longer in use. */
    u64 deadline = monotonic_ns() + TIMEOUT_NS;
    int ended = 0;
    for (;;) {
        clear_evtchn(port);
        mb();
        if (gnttab_end_access(ref)) { ended = 1; break; }
        if (monotonic_ns() > deadline) break;
        evtchn_poll(port, monotonic_ns() + 100000000UL);
    }
    printk("result end_access %d\n", ended);
}

static void map(const char *cmd, domid_t peer, u64 rounds)
{
    grant_ref_t ref = cmdline_u64(cmd, "ref", 0);
    evtchn_port_t rport = cmdline_u64(cmd, "port", 0);
    unsigned long va = alloc_va_hole();
    grant_handle_t handle;
    int st = gnttab_map(peer, ref, va, 0, &handle);
    if (st) panic("map_grant_ref(d%u ref %u) failed: %d", peer, ref, st);
    long port = evtchn_bind_interdomain(peer, rport);
    if (port < 0) panic("bind_interdomain(d%u port %u) failed: %ld", peer, rport, port);
    mask_evtchn(port);
    struct shared *s = (struct shared *)va;

    u64 errors = 0, done = 0, total = 0;
    for (u64 i = 0; i < rounds; i++) {
        u64 t0 = monotonic_ns();
        for (unsigned k = 0; k < WORDS; k++)
            s->data[k] = pat_a(2 * i, k);
        wmb();
        s->seq = 2 * i;
        evtchn_send(port);
        if (wait_seq(s, port, 2 * i + 1)) {
            printk("map: timeout waiting for reply %lu (seq 0x%lx)\n", i, s->seq);
            errors++;
            break;
        }
        total += monotonic_ns() - t0;
        unsigned bad = 0;
        for (unsigned k = 0; k < WORDS; k++)
            if (s->data[k] != pat_b(2 * i + 1, k)) bad++;
        if (bad) errors++;
        done++;
    }
    printk("result rounds %lu\n", done);
    printk("result errors %lu\n", errors);
    printk("result rtt_ns %lu\n", done ? total / done : 0);
    st = gnttab_unmap(va, handle);
    printk("result unmap %d\n", st);
    evtchn_send(port);                  /* tell the offerer it may end access */
}

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    char role[16] = "";
    cmdline_str(cmd, "role", role, sizeof(role));
    domid_t peer = cmdline_u64(cmd, "peer", 0);
    u64 rounds = cmdline_u64(cmd, "rounds", 10000);
    mm_map_all();
    if (!strcmp(role, "offer"))
        offer(cmd, peer, rounds);
    else if (!strcmp(role, "map"))
        map(cmd, peer, rounds);
    else
        panic("grant_pair: role=offer or role=map required");
    poweroff();
}
