/* Grant and event-channel misuse, cmdline `peer=<domid> ref=<r> [port=<p>]`:
 * `ref` is a grant of <peer>'s that is read-only for us (or not ours).
 * Each case prints `result <case> <status>` (GNTST_* or -errno, signed). */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "events.h"
#include "gnttab.h"
#include "time.h"
#include "lib.h"
#include "mm.h"

#define FLOOD 100000

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    domid_t peer = cmdline_u64(cmd, "peer", 0);
    grant_ref_t ref = cmdline_u64(cmd, "ref", 8);
    mm_map_all();
    unsigned long va = alloc_va_hole();
    grant_handle_t h = 0;

    /* A grant never offered to us. */
    int st = gnttab_map(peer, 200, va, 0, &h);
    printk("result map_unoffered %d\n", st);
    if (st == 0) gnttab_unmap(va, h);

    /* The read-only (or foreign) grant, mapped writable. */
    st = gnttab_map(peer, ref, va, 0, &h);
    printk("result map_ro_writable %d\n", st);
    if (st == 0) gnttab_unmap(va, h);

    /* Map it read-only (fine if it is ours), then unmap the handle twice. */
    h = 0xdead;
    st = gnttab_map(peer, ref, va, 1, &h);
    printk("result map_ro %d\n", st);
    if (st == 0) {
        volatile u64 x = *(volatile u64 *)va;    /* readable */
        (void)x;
    }
    printk("result unmap_first %d\n", gnttab_unmap(va, h));
    printk("result unmap_twice %d\n", gnttab_unmap(va, h));

    /* An unknown handle. */
    printk("result unmap_bad_handle %d\n", gnttab_unmap(va, 0x7fffffff));

    /* Send on a closed port. */
    long port = evtchn_alloc_unbound(peer);
    if (port < 0) panic("alloc_unbound failed: %ld", port);
    long rc = evtchn_close(port);
    if (rc) panic("close failed: %ld", rc);
    printk("result send_closed %ld\n", evtchn_send(port));

    /* Flood an interdomain port: the peer's (port=<p>, unbound for us)
     * or else a loopback channel to ourselves. */
    long lport;
    u64 pport = cmdline_u64(cmd, "port", 0);
    if (pport) {
        lport = evtchn_bind_interdomain(peer, pport);
    } else {
        long p = evtchn_alloc_unbound(DOMID_SELF);
        if (p < 0) panic("alloc_unbound(self) failed: %ld", p);
        mask_evtchn(p);
        lport = evtchn_bind_interdomain(DOMID_SELF, p);
    }
    if (lport < 0) panic("bind_interdomain failed: %ld", lport);
    mask_evtchn(lport);
    long first_err = 0;
    u64 ok = 0, t0 = monotonic_ns();
    for (unsigned i = 0; i < FLOOD; i++) {
        rc = evtchn_send(lport);
        if (rc == 0) ok++;
        else if (!first_err) first_err = rc;
    }
    u64 t1 = monotonic_ns();
    printk("result flood %ld\n", first_err);
    printk("result flood_sent %lu\n", ok);
    printk("result flood_ns %lu\n", t1 - t0);
    printk("result hostile_done 1\n");
    poweroff();
}
