/* netfront: Xen PV network frontend (see netfront.h).
 *
 * Rings: one tx and one rx sring page, each granted read/write to the
 * backend. Rx (request-rx-copy): every rx slot i owns page rxb[i], granted
 * writable once; request id = slot. The backend answers in the same slot, so
 * after consuming response `cons` the slot's buffer is re-posted as request
 * `req_prod_pvt`, which is the same slot. Tx: one pre-allocated page per
 * id, granted read-only once; the frame is copied into it. Grants stay in
 * place until shutdown. Everything the backend writes into the rings is
 * copied once and checked before use. */
#include "os.h"
/* io/ring.h leaves the barriers to the OS for interface versions >= 3.2.8. */
#define xen_mb()  mb()
#define xen_rmb() rmb()
#define xen_wmb() wmb()
#include <xen/io/netif.h>
#include "net/netfront.h"
#include "net/ip.h"
#include "gnttab.h"
#include "xenbus.h"
#include "events.h"
#include "mm.h"
#include "lib.h"
#include "console.h"
#include "time.h"

#define EAGAIN 11
#define TX_SLOTS __CONST_RING_SIZE(netif_tx, PAGE_SIZE)
#define RX_SLOTS __CONST_RING_SIZE(netif_rx, PAGE_SIZE)
/* How long to wait for the backend's InitWait and Connected before giving up: it only
 * bounds a failure (the waits end on the state change), so generous: 20 s was exceeded
 * once at host load ~20 ("netfront init failed" in test_net). */
#define CONNECT_TIMEOUT_NS 90000000000UL

struct netfront {
    char node[64];
    char backend[128];
    domid_t backend_id;
    u8 mac[6];
    evtchn_port_t port;
    netif_tx_front_ring_t tx;
    netif_rx_front_ring_t rx;
    long tx_ring_ref, rx_ring_ref;
    void *tx_page[TX_SLOTS];
    long tx_gref[TX_SLOTS];
    u8 tx_busy[TX_SLOTS];
    u16 tx_free[TX_SLOTS];
    unsigned tx_nfree;
    void *rx_page[RX_SLOTS];
    long rx_gref[RX_SLOTS];
    int rx_skip_extra;        /* the next rx slot carries netif_extra_info */
    int rx_in_chain;          /* dropping the rest of a multi-slot packet */
    int dead;                 /* the backend broke the protocol: stop */
    struct netfront_stats st;
};

static struct netfront dev;

const struct netfront_stats *netfront_stats(const struct netfront *nf) { return &nf->st; }
void netfront_mac(const struct netfront *nf, u8 mac[6]) { memcpy(mac, nf->mac, 6); }

static void notify(struct netfront *nf)
{
    nf->st.notify++;
    evtchn_send(nf->port);
}

static int read_node(struct netfront *nf, const char *key, char *buf, size_t size)
{
    char path[160];
    snprintf(path, sizeof(path), "%s/%s", nf->node, key);
    int rc = xenbus_read(XBT_NIL, path, buf, size);
    if (rc < 0)
        printk("net: cannot read %s: %d\n", path, rc);
    return rc;
}

/* The frontend's keys and its state `state`, in one transaction whose writes
 * go as one round trip (xenbus_write_many): three round trips, not nine. */
static int publish(struct netfront *nf, XenbusState state)
{
    char path[7][160], val[7][16];
    static const char *const keys[7] = { "tx-ring-ref", "rx-ring-ref", "event-channel",
        "request-rx-copy", "feature-rx-notify", "feature-no-csum-offload", "state" };
    const char *paths[7], *vals[7];
    snprintf(val[0], sizeof(val[0]), "%ld", nf->tx_ring_ref);
    snprintf(val[1], sizeof(val[1]), "%ld", nf->rx_ring_ref);
    snprintf(val[2], sizeof(val[2]), "%u", nf->port);
    snprintf(val[3], sizeof(val[3]), "1");
    snprintf(val[4], sizeof(val[4]), "1");
    snprintf(val[5], sizeof(val[5]), "1");
    snprintf(val[6], sizeof(val[6]), "%d", (int)state);
    for (int i = 0; i < 7; i++) {
        snprintf(path[i], sizeof(path[i]), "%s/%s", nf->node, keys[i]);
        paths[i] = path[i];
        vals[i] = val[i];
    }
    for (int attempt = 0; attempt < 20; attempt++) {
        xenbus_transaction_t t;
        int rc = xenbus_transaction_start(&t);
        if (rc) { printk("net: transaction_start failed: %d\n", rc); return rc; }
        rc = xenbus_write_many(t, 7, paths, vals);
        if (rc) {
            xenbus_transaction_end(t, 1);
            if (rc == -EAGAIN) continue;
            printk("net: writing %s/... failed: %d\n", nf->node, rc);
            return rc;
        }
        rc = xenbus_transaction_end(t, 0);
        if (rc == -EAGAIN) continue;
        if (rc) printk("net: transaction_end failed: %d\n", rc);
        return rc;
    }
    printk("net: transaction kept conflicting\n");
    return -EAGAIN;
}

static void post_rx(struct netfront *nf, unsigned slot)
{
    netif_rx_request_t *req = RING_GET_REQUEST(&nf->rx, nf->rx.req_prod_pvt);
    req->id = (u16)slot;
    req->gref = (grant_ref_t)nf->rx_gref[slot];
    nf->rx.req_prod_pvt++;
}

static const char *state_name(int s)
{
    static const char *n[] = { "Unknown", "Initialising", "InitWait", "Initialised",
                               "Connected", "Closing", "Closed", "Reconfiguring",
                               "Reconfigured" };
    if (s == -110) return "timeout";
    return s >= 0 && s < (int)ARRAY_SIZE(n) ? n[s] : "error";
}

static int connect(struct netfront *nf, int resume);

struct netfront *netfront_init(const char *nodename)
{
    struct netfront *nf = &dev;
    char buf[128];
    long v;

    memset(nf, 0, sizeof(*nf));
    snprintf(nf->node, sizeof(nf->node), "%s", nodename);
    if (read_node(nf, "backend", nf->backend, sizeof(nf->backend)) < 0) return NULL;
    if (read_node(nf, "backend-id", buf, sizeof(buf)) < 0) return NULL;
    if (!parse_long(buf, &v) || v < 0 || v >= DOMID_FIRST_RESERVED) {
        printk("net: bad backend-id '%s'\n", buf);
        return NULL;
    }
    nf->backend_id = (domid_t)v;
    if (read_node(nf, "mac", buf, sizeof(buf)) < 0) return NULL;
    if (!parse_mac(buf, nf->mac) || (nf->mac[0] & 1)) {
        printk("net: bad mac '%s'\n", buf);
        return NULL;
    }

    /* The backend publishes its features, then goes to InitWait. */
    int st = xenbus_wait_for_state(nf->backend, XenbusStateInitWait, 1, CONNECT_TIMEOUT_NS);
    if (st < 0 || st > XenbusStateConnected) {
        printk("net: backend %s not ready: state %d (%s)\n", nf->backend, st, state_name(st));
        return NULL;
    }
    char path[160];
    snprintf(path, sizeof(path), "%s/feature-rx-copy", nf->backend);
    if (xenbus_read(XBT_NIL, path, buf, sizeof(buf)) < 0 || strcmp(buf, "1"))
        printk("net: backend does not advertise feature-rx-copy; trying anyway\n");

    mm_map_all();
    netif_tx_sring_t *txs = alloc_page();
    netif_rx_sring_t *rxs = alloc_page();
    SHARED_RING_INIT(txs);
    SHARED_RING_INIT(rxs);
    FRONT_RING_INIT(&nf->tx, txs, PAGE_SIZE);
    FRONT_RING_INIT(&nf->rx, rxs, PAGE_SIZE);
    nf->tx_ring_ref = gnttab_grant_access(nf->backend_id, virt_to_mfn(txs), 0);
    nf->rx_ring_ref = gnttab_grant_access(nf->backend_id, virt_to_mfn(rxs), 0);
    if (nf->tx_ring_ref < 0 || nf->rx_ring_ref < 0) {
        printk("net: out of grant entries\n");
        return NULL;
    }
    for (unsigned i = 0; i < TX_SLOTS; i++) {
        nf->tx_page[i] = alloc_page();
        nf->tx_gref[i] = gnttab_grant_access(nf->backend_id, virt_to_mfn(nf->tx_page[i]), 1);
        nf->tx_free[nf->tx_nfree++] = (u16)(TX_SLOTS - 1 - i);
    }
    for (unsigned i = 0; i < RX_SLOTS; i++) {
        nf->rx_page[i] = alloc_page();
        nf->rx_gref[i] = gnttab_grant_access(nf->backend_id, virt_to_mfn(nf->rx_page[i]), 0);
        if (nf->rx_gref[i] < 0 || nf->tx_gref[i] < 0) {
            printk("net: out of grant entries\n");
            return NULL;
        }
        post_rx(nf, i);
    }
    return connect(nf, 0) ? NULL : nf;
}

/* Event channel, keys, XenbusState handshake (rx buffers are posted).
 * resume: as Linux's netfront after a resume (the backend is in InitWait:
 * xennet_connect, then Connected at once), the keys and state Connected go
 * in one transaction and the frontend does not wait for the backend's
 * Connected: its first pass serves the rings as they are. Every round trip
 * left out here is downtime a migrated vif's peers see. */
static int connect(struct netfront *nf, int resume)
{
    int st, unused;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&nf->rx, unused);
    (void)unused;

    long port = evtchn_alloc_unbound(nf->backend_id);
    if (port < 0) {
        printk("net: evtchn_alloc_unbound(%u) failed: %ld\n", nf->backend_id, port);
        return -1;
    }
    nf->port = (evtchn_port_t)port;
    mask_evtchn(nf->port);                     /* we wait with SCHEDOP_poll */

    if (publish(nf, resume ? XenbusStateConnected : XenbusStateInitialised)) return -1;
    if (resume) {
        notify(nf);                            /* rx buffers are waiting */
        return 0;
    }

    /* Wait for the backend to connect. A backend that (like Linux netback)
     * only connects once the frontend says Connected gets that after a
     * short wait. */
    st = xenbus_wait_for_state(nf->backend, XenbusStateConnected, 0, 2000000000UL);
    if (st != XenbusStateConnected && st >= 0 && st < XenbusStateConnected) {
        xenbus_switch_state(XBT_NIL, nf->node, XenbusStateConnected);
        st = xenbus_wait_for_state(nf->backend, XenbusStateConnected, 1, CONNECT_TIMEOUT_NS);
    }
    if (st != XenbusStateConnected) {
        printk("net: backend did not connect: state %d (%s)\n", st, state_name(st));
        return -1;
    }
    int rc = xenbus_switch_state(XBT_NIL, nf->node, XenbusStateConnected);
    if (rc) {
        printk("net: switch to Connected failed: %d\n", rc);
        return -1;
    }
    notify(nf);                                /* rx buffers are waiting */
    return 0;
}

int netfront_resume(struct netfront *nf)
{
    /* A new domain after a save or migration: a new backend (it offers InitWait
     * again) and new event channels. The ring pages and buffers keep their
     * PFNs and grant refs (gnttab_resume re-granted them); the rings start
     * empty, frames in flight at the suspend are lost, as on a wire. The
     * backend's path names the domain id, which changed: read it again. */
    char buf[16];
    long v;
    if (read_node(nf, "backend", nf->backend, sizeof(nf->backend)) < 0 ||
        read_node(nf, "backend-id", buf, sizeof(buf)) < 0 || !parse_long(buf, &v) ||
        v < 0 || v >= DOMID_FIRST_RESERVED) {
        nf->dead = 1;
        return -1;
    }
    nf->backend_id = (domid_t)v;
    int st = xenbus_wait_for_state(nf->backend, XenbusStateInitWait, 1, CONNECT_TIMEOUT_NS);
    if (st < 0 || st > XenbusStateConnected) {
        printk("net: resume: backend %s not ready: state %d (%s)\n", nf->backend, st, state_name(st));
        nf->dead = 1;
        return -1;
    }
    SHARED_RING_INIT(nf->tx.sring);
    SHARED_RING_INIT(nf->rx.sring);
    FRONT_RING_INIT(&nf->tx, nf->tx.sring, PAGE_SIZE);
    FRONT_RING_INIT(&nf->rx, nf->rx.sring, PAGE_SIZE);
    nf->tx_nfree = 0;
    for (unsigned i = 0; i < TX_SLOTS; i++) {
        nf->tx_busy[i] = 0;
        nf->tx_free[nf->tx_nfree++] = (u16)(TX_SLOTS - 1 - i);
    }
    for (unsigned i = 0; i < RX_SLOTS; i++)
        post_rx(nf, i);
    nf->rx_skip_extra = nf->rx_in_chain = 0;
    nf->dead = 0;
    if (connect(nf, 1)) {
        nf->dead = 1;
        return -1;
    }
    return 0;
}

/* ---- tx ---- */

static void tx_reclaim(struct netfront *nf)
{
    int more;
    do {
        RING_IDX prod = ACCESS_ONCE(nf->tx.sring->rsp_prod);
        rmb();
        if ((u32)(prod - nf->tx.rsp_cons) > (u32)(nf->tx.req_prod_pvt - nf->tx.rsp_cons)) {
            if (!nf->st.bogus++)
                printk("net: backend tx rsp_prod %u beyond requests %u\n", prod,
                       nf->tx.req_prod_pvt);
            nf->dead = 1;
            return;
        }
        for (RING_IDX c = nf->tx.rsp_cons; c != prod; c++) {
            netif_tx_response_t r = *RING_GET_RESPONSE(&nf->tx, c);
            if (r.status == NETIF_RSP_NULL) continue;
            if (r.id >= TX_SLOTS || !nf->tx_busy[r.id]) { nf->st.bogus++; continue; }
            if (r.status != NETIF_RSP_OKAY) nf->st.tx_err++;
            nf->tx_busy[r.id] = 0;
            nf->tx_free[nf->tx_nfree++] = r.id;
        }
        nf->tx.rsp_cons = prod;
        RING_FINAL_CHECK_FOR_RESPONSES(&nf->tx, more);
    } while (more);
}

int netfront_xmit(struct netfront *nf, const void *frame, int len)
{
    if (nf->dead || len < 14 || len > (int)PAGE_SIZE) { nf->st.tx_full++; return -1; }
    if (!nf->tx_nfree) tx_reclaim(nf);
    if (!nf->tx_nfree || RING_FULL(&nf->tx)) { nf->st.tx_full++; return -1; }
    u16 id = nf->tx_free[--nf->tx_nfree];
    nf->tx_busy[id] = 1;
    memcpy(nf->tx_page[id], frame, (size_t)len);
    netif_tx_request_t *req = RING_GET_REQUEST(&nf->tx, nf->tx.req_prod_pvt);
    req->gref = (grant_ref_t)nf->tx_gref[id];
    req->offset = 0;
    req->flags = 0;             /* checksums are complete; one slot */
    req->id = id;
    req->size = (u16)len;
    nf->tx.req_prod_pvt++;
    int n;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&nf->tx, n);
    if (n) notify(nf);
    nf->st.tx++;
    return 0;
}

int netfront_tx_space(struct netfront *nf)
{
    if (nf->dead) return 0;
    tx_reclaim(nf);
    if (nf->dead) return 0;
    unsigned ring = RING_FREE_REQUESTS(&nf->tx);
    return (int)(ring < nf->tx_nfree ? ring : nf->tx_nfree);
}

/* ---- rx ---- */

static int rx_drain(struct netfront *nf, netfront_rx_t cb, void *arg)
{
    int delivered = 0, more;
    do {
        RING_IDX prod = ACCESS_ONCE(nf->rx.sring->rsp_prod);
        rmb();
        if ((u32)(prod - nf->rx.rsp_cons) > (u32)(nf->rx.req_prod_pvt - nf->rx.rsp_cons)) {
            if (!nf->st.bogus++)
                printk("net: backend rx rsp_prod %u beyond requests %u\n", prod,
                       nf->rx.req_prod_pvt);
            nf->dead = 1;
            return delivered;
        }
        for (RING_IDX c = nf->rx.rsp_cons; c != prod; c++) {
            unsigned slot = c & (RX_SLOTS - 1);
            netif_rx_response_t r = *RING_GET_RESPONSE(&nf->rx, c);
            if (nf->rx_skip_extra) {
                /* An extra-info slot (we asked for none): skip the chain. */
                struct netif_extra_info x;
                memcpy(&x, &r, sizeof(x));
                nf->rx_skip_extra = x.flags & XEN_NETIF_EXTRA_FLAG_MORE;
                post_rx(nf, slot);
                continue;
            }
            if (r.flags & NETRXF_extra_info) {
                nf->rx_skip_extra = 1;
                nf->st.rx_bad++;
            }
            int chained = nf->rx_in_chain;
            nf->rx_in_chain = !!(r.flags & NETRXF_more_data);
            if (r.id != slot) {
                nf->st.rx_bad++;
            } else if (chained || (r.flags & NETRXF_more_data)) {
                if (!chained) nf->st.rx_bad++;     /* no feature-sg: drop whole packet */
            } else if (r.status <= 0) {
                nf->st.rx_err++;
            } else if ((u32)r.offset + (u32)r.status > PAGE_SIZE) {
                nf->st.rx_bad++;
            } else {
                unsigned fl = (r.flags & (NETRXF_data_validated | NETRXF_csum_blank))
                              ? NET_RX_CSUM_VALID : 0;
                nf->st.rx++;
                delivered++;
                cb(arg, (u8 *)nf->rx_page[slot] + r.offset, r.status, fl);
            }
            post_rx(nf, slot);
        }
        nf->rx.rsp_cons = prod;
        int n;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&nf->rx, n);
        if (n) notify(nf);
        RING_FINAL_CHECK_FOR_RESPONSES(&nf->rx, more);
    } while (more);
    return delivered;
}

int netfront_poll(struct netfront *nf, netfront_rx_t cb, void *arg)
{
    if (nf->dead) return 0;
    clear_evtchn(nf->port);          /* before looking: no lost wakeup */
    tx_reclaim(nf);
    return rx_drain(nf, cb, arg);
}

void netfront_wait(struct netfront *nf, u64 deadline_ns)
{
    if (evtchn_is_pending(nf->port)) return;
    if (!nf->dead && (RING_HAS_UNCONSUMED_RESPONSES(&nf->rx) ||
                      RING_HAS_UNCONSUMED_RESPONSES(&nf->tx)))
        return;
    if (deadline_ns && monotonic_ns() >= deadline_ns) return;
    evtchn_poll(nf->port, deadline_ns);
}

void netfront_shutdown(struct netfront *nf)
{
    xenbus_switch_state(XBT_NIL, nf->node, XenbusStateClosing);
    int st = xenbus_wait_for_state(nf->backend, XenbusStateClosing, 1, 5000000000UL);
    xenbus_switch_state(XBT_NIL, nf->node, XenbusStateClosed);
    if (st < XenbusStateClosing)
        printk("net: backend did not close: state %d (%s)\n", st, state_name(st));
    else
        xenbus_wait_for_state(nf->backend, XenbusStateClosed, 1, 5000000000UL);
    unsigned busy = 0;
    for (unsigned i = 0; i < TX_SLOTS; i++)
        busy += !gnttab_end_access((grant_ref_t)nf->tx_gref[i]);
    for (unsigned i = 0; i < RX_SLOTS; i++)
        busy += !gnttab_end_access((grant_ref_t)nf->rx_gref[i]);
    busy += !gnttab_end_access((grant_ref_t)nf->tx_ring_ref);
    busy += !gnttab_end_access((grant_ref_t)nf->rx_ring_ref);
    if (busy)
        printk("net: %u grants still in use by the backend\n", busy);
    evtchn_close(nf->port);
    nf->dead = 1;
}
