/* A hostile vif frontend: brings up the netif rings by hand (like netfront,
 * but with no rx buffers posted) and then sends the backend malformed
 * requests, one case at a time.
 *
 * cmdline: ip=<a.b.c.d> peer=<a.b.c.d> [vif=<devid> (default 0)]
 *   ip:   our address (used in the ARP requests of the rx cases)
 *   peer: a host that answers ARP (the rx cases need frames to arrive)
 *
 * Each tx case prints `result <case> <status> n=<responses> ok=<k> err=<k>
 * null=<k> ids=ok|bad`, where <status> is the response status of the
 * packet's first slot (NETIF_RSP_ERROR -1, DROPPED -2, OKAY 0, or "none"
 * when the backend answered nothing within 2 s). Rx cases print `result
 * <case> <status>` (the rx response status: bytes, or -1). The last case
 * (insane_indices) publishes a req_prod 257 requests ahead (one more than
 * the ring holds: the exact bound) and prints
 * `result insane_indices state=<backend XenbusState> rsp=<responses>`.
 * Then `net_hostile: done` and poweroff.
 *
 * cmdline `dangling=1` runs one other case instead: after a valid packet, a
 * tx request with NETTXF_more_data is published alone (req_prod covers it,
 * the rest of its chain never comes). Linux netback treats a chain longer
 * than what is published as fatal and disconnects the vif; it prints
 * `result dangling_chain state=<backend XenbusState> rsp=<responses>`,
 * then holds `hold_ms` (default 1500) with its vCPU blocked, so the host's
 * CPU use meanwhile can be measured, then `net_hostile: done`. */
#include "os.h"
#define xen_mb()  mb()
#define xen_rmb() rmb()
#define xen_wmb() wmb()
#include <xen/io/netif.h>
#include "console.h"
#include "lib.h"
#include "sched.h"
#include "time.h"
#include "gnttab.h"
#include "xenbus.h"
#include "events.h"
#include "mm.h"
#include "net/ip.h"

#define EAGAIN 11
#define NPAGES 4
#define WAIT_NS 2000000000UL

static char node[32], backend[128];
static domid_t bid;
static u8 mac[6];
static u32 my_ip, peer_ip;
static evtchn_port_t port;
static netif_tx_front_ring_t tx;
static netif_rx_front_ring_t rx;
static void *tx_page[NPAGES], *rx_page[NPAGES];
static long tx_gref[NPAGES], rx_gref[NPAGES];

static int publish(long tx_ref, long rx_ref)
{
    char path[160];
    for (int attempt = 0; attempt < 20; attempt++) {
        xenbus_transaction_t t;
        int rc = xenbus_transaction_start(&t);
        if (rc) return rc;
#define W(key, fmt, val) do {                                              \
            snprintf(path, sizeof(path), "%s/" key, node);                 \
            rc = xenbus_printf(t, path, fmt, val);                         \
            if (rc) goto abort;                                            \
        } while (0)
        W("tx-ring-ref", "%ld", tx_ref);
        W("rx-ring-ref", "%ld", rx_ref);
        W("event-channel", "%u", port);
        W("request-rx-copy", "%d", 1);
        W("feature-rx-notify", "%d", 1);
#undef W
        rc = xenbus_switch_state(t, node, XenbusStateInitialised);
        if (rc) goto abort;
        rc = xenbus_transaction_end(t, 0);
        if (rc == -EAGAIN) continue;
        return rc;
abort:
        xenbus_transaction_end(t, 1);
        if (rc == -EAGAIN) continue;
        return rc;
    }
    return -EAGAIN;
}

static void bring_up(void)
{
    char buf[128], path[160];
    long v;
    snprintf(path, sizeof(path), "%s/backend", node);
    if (xenbus_read(XBT_NIL, path, backend, sizeof(backend)) < 0) panic("net_hostile: no %s", path);
    snprintf(path, sizeof(path), "%s/backend-id", node);
    if (xenbus_read(XBT_NIL, path, buf, sizeof(buf)) < 0 || !parse_long(buf, &v))
        panic("net_hostile: no backend-id");
    bid = (domid_t)v;
    snprintf(path, sizeof(path), "%s/mac", node);
    if (xenbus_read(XBT_NIL, path, buf, sizeof(buf)) < 0 || !parse_mac(buf, mac))
        panic("net_hostile: no mac");
    int st = xenbus_wait_for_state(backend, XenbusStateInitWait, 1, 20000000000UL);
    if (st != XenbusStateInitWait) panic("net_hostile: backend state %d", st);

    mm_map_all();
    netif_tx_sring_t *txs = alloc_page();
    netif_rx_sring_t *rxs = alloc_page();
    SHARED_RING_INIT(txs);
    SHARED_RING_INIT(rxs);
    FRONT_RING_INIT(&tx, txs, PAGE_SIZE);
    FRONT_RING_INIT(&rx, rxs, PAGE_SIZE);
    long txr = gnttab_grant_access(bid, virt_to_mfn(txs), 0);
    long rxr = gnttab_grant_access(bid, virt_to_mfn(rxs), 0);
    for (int i = 0; i < NPAGES; i++) {
        tx_page[i] = alloc_page();
        tx_gref[i] = gnttab_grant_access(bid, virt_to_mfn(tx_page[i]), 1);
        rx_page[i] = alloc_page();
        rx_gref[i] = gnttab_grant_access(bid, virt_to_mfn(rx_page[i]), 0);
    }
    long p = evtchn_alloc_unbound(bid);
    if (p < 0) panic("net_hostile: evtchn_alloc_unbound: %ld", p);
    port = (evtchn_port_t)p;
    mask_evtchn(port);
    if (publish(txr, rxr)) panic("net_hostile: publish failed");
    st = xenbus_wait_for_state(backend, XenbusStateConnected, 0, 2000000000UL);
    if (st != XenbusStateConnected) {
        xenbus_switch_state(XBT_NIL, node, XenbusStateConnected);
        st = xenbus_wait_for_state(backend, XenbusStateConnected, 1, 20000000000UL);
    }
    if (st != XenbusStateConnected) panic("net_hostile: backend did not connect: %d", st);
    xenbus_switch_state(XBT_NIL, node, XenbusStateConnected);
}

/* ---- frames ---- */

/* A harmless frame: unicast to an address nobody has, local ethertype. */
static void put_junk_frame(u8 *f, int len)
{
    static const u8 nobody[6] = { 0x02, 0, 0, 0, 0, 0x01 };
    memcpy(f, nobody, 6);
    memcpy(f + 6, mac, 6);
    f[12] = 0x88; f[13] = 0xb5;
    for (int i = 14; i < len; i++) f[i] = (u8)i;
}

static int put_arp_request(u8 *f)
{
    memset(f, 0xff, 6);
    memcpy(f + 6, mac, 6);
    put16(f + 12, 0x0806);
    u8 *a = f + 14;
    put16(a, 1); put16(a + 2, 0x0800); a[4] = 6; a[5] = 4; put16(a + 6, 1);
    memcpy(a + 8, mac, 6);
    put32(a + 14, my_ip);
    memset(a + 18, 0, 6);
    put32(a + 24, peer_ip);
    memset(f + 42, 0, 18);
    return 60;
}

/* ---- tx ---- */

static void tx_req(grant_ref_t gref, u16 offset, u16 flags, u16 id, u16 size)
{
    netif_tx_request_t *r = RING_GET_REQUEST(&tx, tx.req_prod_pvt);
    r->gref = gref;
    r->offset = offset;
    r->flags = flags;
    r->id = id;
    r->size = size;
    tx.req_prod_pvt++;
}

static void tx_extra(u8 type, u8 flags, u8 fill)
{
    u8 *r = (u8 *)RING_GET_REQUEST(&tx, tx.req_prod_pvt);
    memset(r, fill, sizeof(netif_tx_request_t));
    r[0] = type;
    r[1] = flags;
    tx.req_prod_pvt++;
}

static void kick(void)
{
    RING_PUSH_REQUESTS(&tx);
    RING_PUSH_REQUESTS(&rx);
    evtchn_send(port);
}

/* Wait until `want` responses are past rsp_cons on `sring` (or 2 s). */
static unsigned wait_rsp(volatile RING_IDX *rsp_prod, volatile RING_IDX *rsp_event,
                         RING_IDX cons, unsigned want)
{
    u64 deadline = monotonic_ns() + WAIT_NS;
    for (;;) {
        *rsp_event = cons + 1;
        mb();
        unsigned n = *rsp_prod - cons;
        if (n >= want || monotonic_ns() >= deadline) return n;
        clear_evtchn(port);
        if ((unsigned)(*rsp_prod - cons) >= want) continue;
        evtchn_poll(port, deadline);
    }
}

static u16 case_id;

/* Publish the requests queued since `first`, wait for as many responses
 * (extra-info slots are answered too) and print the result line. */
static void tx_case(const char *name, RING_IDX first)
{
    unsigned slots = tx.req_prod_pvt - first;
    kick();
    unsigned n = wait_rsp(&tx.sring->rsp_prod, &tx.sring->rsp_event, tx.rsp_cons, slots);
    if (n > slots) n = slots;
    unsigned ok = 0, err = 0, null = 0, ids_ok = 1;
    int status0 = 2;
    for (unsigned i = 0; i < n; i++) {
        netif_tx_response_t r = *RING_GET_RESPONSE(&tx, tx.rsp_cons + i);
        if (i == 0) status0 = r.status;
        if (r.status == NETIF_RSP_OKAY) ok++;
        else if (r.status == NETIF_RSP_NULL) null++;
        else err++;
        /* Data slots echo their ids; extra-info slots carry no id of ours. */
        if (r.status != NETIF_RSP_NULL && (r.id & 0xff00) != (u16)(case_id << 8)) ids_ok = 0;
    }
    tx.rsp_cons += n;
    if (n)
        printk("result %s %d n=%u ok=%u err=%u null=%u ids=%s\n", name, status0, n, ok, err,
               null, ids_ok ? "ok" : "bad");
    else
        printk("result %s none n=0\n", name);
    case_id++;
}

static u16 id(unsigned k) { return (u16)(case_id << 8 | k); }

static void tx_cases(void)
{
    grant_ref_t g = (grant_ref_t)tx_gref[0];
    put_junk_frame(tx_page[0], 60);
    put_junk_frame((u8 *)tx_page[0] + 2048, 60);
    memset(tx_page[1], 0xa5, PAGE_SIZE);
    RING_IDX f;

    f = tx.req_prod_pvt; tx_req(g, 0, 0, id(0), 60);                        tx_case("valid", f);
    f = tx.req_prod_pvt; tx_req(0x7fffffff, 0, 0, id(0), 60);               tx_case("bad_gref", f);
    f = tx.req_prod_pvt; tx_req(GNTTAB_NR_ENTRIES - 1, 0, 0, id(0), 60);    tx_case("ungranted_gref", f);
    f = tx.req_prod_pvt; tx_req(3, 0, 0, id(0), 60);                        tx_case("reserved_gref", f);
    /* A grant that names another domain, not the backend. */
    long foreign = gnttab_grant_access((domid_t)(bid + 7), virt_to_mfn(tx_page[0]), 1);
    f = tx.req_prod_pvt; tx_req((grant_ref_t)foreign, 0, 0, id(0), 60);     tx_case("foreign_gref", f);
    f = tx.req_prod_pvt; tx_req(g, 4000, 0, id(0), 200);                    tx_case("page_overrun", f);
    f = tx.req_prod_pvt; tx_req(g, 0xfff0, 0, id(0), 60);                   tx_case("offset_beyond_page", f);
    f = tx.req_prod_pvt; tx_req(g, 0, 0, id(0), 0xffff);                    tx_case("oversize_65535", f);
    f = tx.req_prod_pvt; tx_req(g, 0, 0, id(0), PAGE_SIZE + 1);             tx_case("oversize_page", f);
    f = tx.req_prod_pvt; tx_req(g, 0, 0, id(0), 0);                         tx_case("zero_size", f);
    f = tx.req_prod_pvt; tx_req(g, 0, 0, id(0), 13);                        tx_case("runt", f);
    /* Two slots whose fragment is larger than the announced total. */
    f = tx.req_prod_pvt;
    tx_req(g, 0, NETTXF_more_data, id(0), 10);
    tx_req(g, 2048, 0, id(1), 60);
    tx_case("size_mismatch", f);
    /* Total 65535 announced, first fragment then > a page. */
    f = tx.req_prod_pvt;
    tx_req(g, 0, NETTXF_more_data, id(0), 0xffff);
    tx_req(g, 2048, 0, id(1), 60);
    tx_case("chain_oversize", f);
    /* A more_data chain of 30 slots (a backend accepts 18 at least; no
     * packet needs more); each fragment valid. */
    f = tx.req_prod_pvt;
    tx_req(g, 0, NETTXF_more_data, id(0), 30 * 60);
    for (unsigned k = 1; k < 30; k++)
        tx_req(g, 2048, k < 29 ? NETTXF_more_data : 0, id(k), 60);
    tx_case("too_many_slots", f);
    /* The same length of chain, laid out so that its last 8 slots would
     * form a valid packet of their own: a backend that stops reading the
     * chain early and resumes in its middle transmits them. */
    f = tx.req_prod_pvt;
    tx_req(g, 0, NETTXF_more_data, id(0), 29 * 60 + 480);
    for (unsigned k = 1; k < 30; k++)
        tx_req(g, 2048, k < 29 ? NETTXF_more_data : 0, id(k), k == 22 ? 480 : 60);
    tx_case("too_many_slots_tail", f);
    /* A valid frame followed by an extra-info slot of an unknown type. */
    f = tx.req_prod_pvt;
    tx_req(g, 0, NETTXF_extra_info, id(0), 60);
    tx_extra(0xee, 0, 0x5a);
    tx_case("extra_garbage", f);
    /* A GSO extra (never negotiated: no feature-gso-*), garbage fields. */
    f = tx.req_prod_pvt;
    tx_req(g, 0, NETTXF_extra_info, id(0), 60);
    tx_extra(XEN_NETIF_EXTRA_TYPE_GSO, 0, 0xff);
    tx_case("extra_gso_unnegotiated", f);
    /* An extra-info chain that never ends within the packet limit. */
    f = tx.req_prod_pvt;
    tx_req(g, 0, NETTXF_extra_info, id(0), 60);
    for (unsigned k = 0; k < 24; k++)
        tx_extra(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, k < 23 ? XEN_NETIF_EXTRA_FLAG_MORE : 0, 0xc3);
    tx_case("extra_endless", f);
    /* The ring still works. */
    f = tx.req_prod_pvt; tx_req(g, 0, 0, id(0), 60);                        tx_case("valid_after", f);
}

/* ---- rx ---- */

static void rx_cases(void)
{
    static const char *names[] = { "rx_bad_gref", "rx_ungranted", "rx_readonly_grant",
                                   "rx_pagetable", "rx_good" };
    long pt_ref = gnttab_grant_access(bid, virt_to_mfn((void *)start_info->pt_base), 0);
    grant_ref_t grefs[] = { 0x7fffffff, GNTTAB_NR_ENTRIES - 1, (grant_ref_t)tx_gref[2],
                            (grant_ref_t)pt_ref, (grant_ref_t)rx_gref[0] };
    unsigned n = ARRAY_SIZE(grefs);
    for (unsigned i = 0; i < n; i++) {
        netif_rx_request_t *r = RING_GET_REQUEST(&rx, rx.req_prod_pvt);
        r->id = (u16)i;
        r->gref = grefs[i];
        rx.req_prod_pvt++;
    }
    /* Frames must arrive: ask the peer for its MAC, once per buffer (and
     * a few more, ARP replies can be rate limited). */
    RING_IDX cons = rx.rsp_cons;
    for (unsigned k = 0; k < n + 3; k++) {
        int len = put_arp_request((u8 *)tx_page[3] + (k & 1) * 2048);
        RING_IDX f = tx.req_prod_pvt;
        tx_req((grant_ref_t)tx_gref[3], (u16)((k & 1) * 2048), 0, id(0), (u16)len);
        kick();
        wait_rsp(&tx.sring->rsp_prod, &tx.sring->rsp_event, tx.rsp_cons, tx.req_prod_pvt - f);
        tx.rsp_cons = tx.sring->rsp_prod;
        unsigned have = rx.sring->rsp_prod - cons;
        if (have >= n) break;
        if (wait_rsp(&rx.sring->rsp_prod, &rx.sring->rsp_event, cons, have + 1) >= n) break;
    }
    unsigned got = rx.sring->rsp_prod - cons;
    if (got > n) got = n;
    for (unsigned i = 0; i < n; i++) {
        if (i >= got) { printk("result %s none\n", names[i]); continue; }
        netif_rx_response_t r = *RING_GET_RESPONSE(&rx, cons + i);
        if (r.id != i) printk("net_hostile: rx response %u has id %u\n", i, r.id);
        printk("result %s %d\n", names[i], r.status);
    }
    rx.rsp_cons = cons + got;
    case_id++;
}

/* ---- insane indices ---- */

static void insane_indices(void)
{
    RING_IDX prod0 = tx.sring->rsp_prod;
    wmb();
    tx.sring->req_prod = tx.req_prod_pvt + RING_SIZE(&tx) + 1;
    evtchn_send(port);
    int st = xenbus_wait_for_state(backend, XenbusStateClosing, 1, WAIT_NS);
    printk("result insane_indices state=%d rsp=%u\n", st, tx.sring->rsp_prod - prod0);
}

static void dangling_chain(u64 hold_ns)
{
    grant_ref_t g = (grant_ref_t)tx_gref[0];
    put_junk_frame(tx_page[0], 60);
    RING_IDX f = tx.req_prod_pvt;
    tx_req(g, 0, 0, id(0), 60);
    tx_case("dangling_before", f);
    RING_IDX prod0 = tx.sring->rsp_prod;
    tx_req(g, 0, NETTXF_more_data, id(0), 120);        /* its second slot never comes */
    kick();
    int st = xenbus_wait_for_state(backend, XenbusStateClosing, 1, WAIT_NS);
    printk("result dangling_chain state=%d rsp=%u\n", st, tx.sring->rsp_prod - prod0);
    u64 end = monotonic_ns() + hold_ns;
    while (monotonic_ns() < end) {
        clear_evtchn(port);
        evtchn_poll(port, end);
    }
}

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    char buf[64];
    if (!cmdline_str(cmd, "ip", buf, sizeof(buf)) || !parse_ipv4(buf, &my_ip))
        panic("net_hostile: need ip=<a.b.c.d>");
    if (!cmdline_str(cmd, "peer", buf, sizeof(buf)) || !parse_ipv4(buf, &peer_ip))
        panic("net_hostile: need peer=<a.b.c.d>");
    snprintf(node, sizeof(node), "device/vif/%lu", cmdline_u64(cmd, "vif", 0));
    int rc = xenbus_init();
    if (rc) panic("net_hostile: xenbus_init failed: %d", rc);
    long g = gnttab_init();
    if (g) panic("net_hostile: gnttab_init failed: %ld", g);
    bring_up();
    char m[18];
    fmt_mac(m, mac);
    printk("net_hostile: up mac=%s\n", m);
    if (cmdline_u64(cmd, "dangling", 0)) {
        dangling_chain(cmdline_u64(cmd, "hold_ms", 1500) * 1000000UL);
        printk("net_hostile: done\n");
        poweroff();
    }
    tx_cases();
    rx_cases();
    insane_indices();
    printk("net_hostile: done\n");
    poweroff();
}
