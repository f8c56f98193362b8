/* blkfront: see blkfront.h. Handshake (xen-pv-abi.md §12.3, Linux order):
 * wait for the backend's InitWait; grant the ring, allocate an unbound port
 * for the backend; in one transaction write ring-ref, event-channel,
 * protocol and state Initialised; wait for the backend's Connected; read
 * sectors/sector-size/info/mode/features; switch to Connected. */
#include "os.h"
#include "blkfront.h"
#include <xen/io/protocols.h>
#include "xenbus.h"
#include "gnttab.h"
#include "events.h"
#include "console.h"
#include "time.h"
#include "lib.h"
#include "mm.h"

#define ETIMEDOUT 110
#define EAGAIN 11
#define HANDSHAKE_NS 10000000000UL

static struct blkfront_dev the_devs[4];
static unsigned nr_devs;

static int read_u64(const char *dir, const char *key, u64 *out)
{
    char path[192];
    long v;
    snprintf(path, sizeof(path), "%s/%s", dir, key);
    int rc = xenbus_read_long(XBT_NIL, path, &v);
    if (rc < 0) return rc;
    *out = (u64)v;
    return 0;
}

static int read_str(const char *dir, const char *key, char *buf, size_t size)
{
    char path[192];
    snprintf(path, sizeof(path), "%s/%s", dir, key);
    return xenbus_read(XBT_NIL, path, buf, size);
}

static int find_node(unsigned devid, char *node, size_t size)
{
    if (devid) {
        snprintf(node, size, "device/vbd/%u", devid);
        return 0;
    }
    char names[512];
    int n = xenbus_directory(XBT_NIL, "device/vbd", names, sizeof(names));
    if (n <= 0) return -1;
    /* The lowest devid (xvda before xvdb). */
    long best = -1;
    const char *p = names;
    for (int i = 0; i < n; i++) {
        long v;
        if (parse_long(p, &v) && (best < 0 || v < best)) best = v;
        p += strlen(p) + 1;
    }
    if (best < 0) return -1;
    snprintf(node, size, "device/vbd/%ld", best);
    return 0;
}

/* Publish ring-ref, event-channel, protocol and Initialised in one
 * transaction; wait for the backend's Connected. 0 or -1 (printed). */
static int handshake(struct blkfront_dev *dev)
{
    int st;
    char path[192];
    for (int tries = 0;; tries++) {
        xenbus_transaction_t t;
        int rc = xenbus_transaction_start(&t);
        if (rc) { printk("blkfront: transaction_start: %d\n", rc); return -1; }
        snprintf(path, sizeof(path), "%s/ring-ref", dev->nodename);
        rc = xenbus_printf(t, path, "%u", dev->ring_ref);
        snprintf(path, sizeof(path), "%s/event-channel", dev->nodename);
        if (!rc) rc = xenbus_printf(t, path, "%u", dev->port);
        snprintf(path, sizeof(path), "%s/protocol", dev->nodename);
        if (!rc) rc = xenbus_write(t, path, XEN_IO_PROTO_ABI_X86_64);
        if (!rc) rc = xenbus_switch_state(t, dev->nodename, XenbusStateInitialised);
        if (rc) {
            xenbus_transaction_end(t, 1);
            printk("blkfront: writing %s: %d\n", dev->nodename, rc);
            return -1;
        }
        rc = xenbus_transaction_end(t, 0);
        if (rc == -EAGAIN && tries < 10) continue;
        if (rc) { printk("blkfront: transaction_end: %d\n", rc); return -1; }
        break;
    }

    /* Connected or later: a backend that refuses the ring goes to Closing/Closed
     * (it had been seen in InitWait/Connected above), and waiting out the
     * timeout for a Connected that cannot come only delays the failure. */
    st = xenbus_wait_for_state(dev->backend, XenbusStateConnected, 1, HANDSHAKE_NS);
    if (st != XenbusStateConnected) {
        printk("blkfront: backend %s did not connect (state %d)\n", dev->backend, st);
        return -1;
    }
    return 0;
}

struct blkfront_dev *blkfront_init(unsigned devid, struct blkfront_info *info)
{
    if (nr_devs == ARRAY_SIZE(the_devs)) { printk("blkfront: too many devices\n"); return NULL; }
    struct blkfront_dev *dev = &the_devs[nr_devs];
    memset(dev, 0, sizeof(*dev));
    if (find_node(devid, dev->nodename, sizeof(dev->nodename))) {
        printk("blkfront: no vbd in device/vbd\n");
        return NULL;
    }
    long v;
    parse_long(dev->nodename + strlen("device/vbd/"), &v);
    dev->handle = (u16)v;
    u64 bid;
    if (read_str(dev->nodename, "backend", dev->backend, sizeof(dev->backend)) < 0 ||
        read_u64(dev->nodename, "backend-id", &bid)) {
        printk("blkfront: %s has no backend\n", dev->nodename);
        return NULL;
    }
    dev->backend_id = (domid_t)bid;

    int st = xenbus_wait_for_state(dev->backend, XenbusStateInitWait, 1, HANDSHAKE_NS);
    if (st != XenbusStateInitWait && st != XenbusStateConnected) {
        printk("blkfront: backend %s in state %d, not InitWait\n", dev->backend, st);
        return NULL;
    }

    blkif_sring_t *sring = alloc_page();
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&dev->ring, sring, PAGE_SIZE);
    long ref = gnttab_grant_access(dev->backend_id, virt_to_mfn(sring), 0);
    if (ref < 0) { printk("blkfront: grant table full\n"); return NULL; }
    dev->ring_ref = (grant_ref_t)ref;
    long port = evtchn_alloc_unbound(dev->backend_id);
    if (port < 0) { printk("blkfront: alloc_unbound failed: %ld\n", port); return NULL; }
    dev->port = (evtchn_port_t)port;
    mask_evtchn(dev->port);
    for (unsigned i = 0; i < BLK_RING_SIZE; i++)
        dev->free_slots[i] = BLK_RING_SIZE - 1 - i;
    dev->nr_free = BLK_RING_SIZE;

    if (handshake(dev)) return NULL;
    u64 x;
    char mode[8];
    struct blkfront_info *in = &dev->info;
    if (read_u64(dev->backend, "sectors", &in->sectors)) { printk("blkfront: no sectors\n"); return NULL; }
    in->sector_size = read_u64(dev->backend, "sector-size", &x) ? BLK_SECTOR : (unsigned)x;
    in->info = read_u64(dev->backend, "info", &x) ? 0 : (unsigned)x;
    in->flush = !read_u64(dev->backend, "feature-flush-cache", &x) && x;
    in->barrier = !read_u64(dev->backend, "feature-barrier", &x) && x;
    in->discard = !read_u64(dev->backend, "feature-discard", &x) && x;
    in->discard_granularity = read_u64(dev->backend, "discard-granularity", &x) ? in->sector_size : (unsigned)x;
    in->discard_alignment = read_u64(dev->backend, "discard-alignment", &x) ? 0 : (unsigned)x;
    if (read_str(dev->backend, "mode", mode, sizeof(mode)) < 0) { printk("blkfront: no mode\n"); return NULL; }
    in->readonly = mode[0] != 'w' || (in->info & VDISK_READONLY);
    int rc = xenbus_switch_state(XBT_NIL, dev->nodename, XenbusStateConnected);
    if (rc) { printk("blkfront: switch to Connected: %d\n", rc); return NULL; }
    if (info) *info = *in;
    nr_devs++;
    return dev;
}

int blkfront_resume(struct blkfront_dev *dev)
{
    /* A new domain after a save or migration: a new backend, a new event
     * channel. Requests the old backend had not answered are copied out of
     * the ring page (it came along with the guest's memory) and issued again
     * on the new ring, as Linux's blkfront recovery does; their grants were
     * rebuilt by gnttab_resume. A request the old backend had completed but
     * whose response was not consumed is done twice (same data, same place). */
    static blkif_request_t pending[BLK_RING_SIZE];
    unsigned n = 0;
    for (RING_IDX i = dev->ring.rsp_cons; i != dev->ring.req_prod_pvt && n < BLK_RING_SIZE; i++)
        pending[n++] = *RING_GET_REQUEST(&dev->ring, i);
    u64 bid;                          /* the backend's path names the new domain id */
    if (read_str(dev->nodename, "backend", dev->backend, sizeof(dev->backend)) < 0 ||
        read_u64(dev->nodename, "backend-id", &bid)) {
        printk("blkfront: resume: %s has no backend\n", dev->nodename);
        return -1;
    }
    dev->backend_id = (domid_t)bid;
    int st = xenbus_wait_for_state(dev->backend, XenbusStateInitWait, 1, HANDSHAKE_NS);
    if (st != XenbusStateInitWait && st != XenbusStateConnected) {
        printk("blkfront: resume: backend %s in state %d, not InitWait\n", dev->backend, st);
        return -1;
    }
    blkif_sring_t *sring = dev->ring.sring;
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&dev->ring, sring, PAGE_SIZE);
    for (unsigned i = 0; i < n; i++)
        *RING_GET_REQUEST(&dev->ring, dev->ring.req_prod_pvt++) = pending[i];
    long port = evtchn_alloc_unbound(dev->backend_id);
    if (port < 0) { printk("blkfront: resume: alloc_unbound failed: %ld\n", port); return -1; }
    dev->port = (evtchn_port_t)port;
    mask_evtchn(dev->port);
    if (handshake(dev)) return -1;
    int rc = xenbus_switch_state(XBT_NIL, dev->nodename, XenbusStateConnected);
    if (rc) { printk("blkfront: resume: switch to Connected: %d\n", rc); return -1; }
    if (n) printk("blkfront: resume: %u requests issued again\n", n);
    blkfront_push(dev);
    return 0;
}

void blkfront_shutdown(struct blkfront_dev *dev)
{
    xenbus_switch_state(XBT_NIL, dev->nodename, XenbusStateClosing);
    xenbus_wait_for_state(dev->backend, XenbusStateClosing, 1, HANDSHAKE_NS);
    xenbus_switch_state(XBT_NIL, dev->nodename, XenbusStateClosed);
    xenbus_wait_for_state(dev->backend, XenbusStateClosed, 1, HANDSHAKE_NS);
    gnttab_end_access(dev->ring_ref);
    evtchn_close(dev->port);
}

int blkfront_submit(struct blkfront_dev *dev, u8 op, u64 sector,
                    const struct blk_seg *segs, unsigned nseg, u64 tag)
{
    if (!dev->nr_free || RING_FULL(&dev->ring)) return -1;
    if (op == BLKIF_OP_FLUSH_DISKCACHE ? nseg != 0 : (nseg < 1 || nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST))
        return -2;
    unsigned id = dev->free_slots[dev->nr_free - 1];
    struct blkfront_slot *s = &dev->slots[id];
    blkif_request_t *req = RING_GET_REQUEST(&dev->ring, dev->ring.req_prod_pvt);
    memset(req, 0, sizeof(*req));
    req->operation = op;
    req->nr_segments = (u8)nseg;
    req->handle = dev->handle;
    req->id = id;
    req->sector_number = sector;
    s->nr_grefs = 0;
    for (unsigned i = 0; i < nseg; i++) {
        unsigned long a = (unsigned long)segs[i].buf;
        unsigned first = (a & (PAGE_SIZE - 1)) / BLK_SECTOR;
        if ((a & (BLK_SECTOR - 1)) || !segs[i].nsect || first + segs[i].nsect > PAGE_SIZE / BLK_SECTOR) {
            for (unsigned k = 0; k < s->nr_grefs; k++) gnttab_end_access(s->grefs[k]);
            return -2;
        }
        /* The backend only reads the pages of a write. */
        long ref = gnttab_grant_access(dev->backend_id, virt_to_mfn(segs[i].buf), op != BLKIF_OP_READ);
        if (ref < 0) {
            for (unsigned k = 0; k < s->nr_grefs; k++) gnttab_end_access(s->grefs[k]);
            return -3;
        }
        s->grefs[s->nr_grefs++] = (grant_ref_t)ref;
        req->seg[i].gref = (grant_ref_t)ref;
        req->seg[i].first_sect = (u8)first;
        req->seg[i].last_sect = (u8)(first + segs[i].nsect - 1);
    }
    s->in_use = 1;
    s->tag = tag;
    dev->nr_free--;
    dev->inflight++;
    dev->ring.req_prod_pvt++;
    return 0;
}

int blkfront_submit_discard(struct blkfront_dev *dev, u64 sector, u64 nsect, u64 tag)
{
    if (!dev->nr_free || RING_FULL(&dev->ring)) return -1;
    if (!dev->info.discard) return -2;
    unsigned id = dev->free_slots[dev->nr_free - 1];
    struct blkfront_slot *s = &dev->slots[id];
    blkif_request_t *slot = RING_GET_REQUEST(&dev->ring, dev->ring.req_prod_pvt);
    memset(slot, 0, sizeof(*slot));
    blkif_request_discard_t *req = (blkif_request_discard_t *)slot;
    req->operation = BLKIF_OP_DISCARD;
    req->flag = 0;
    req->handle = dev->handle;
    req->id = id;
    req->sector_number = sector;
    req->nr_sectors = nsect;
    s->nr_grefs = 0;
    s->in_use = 1;
    s->tag = tag;
    dev->nr_free--;
    dev->inflight++;
    dev->ring.req_prod_pvt++;
    return 0;
}

int blkfront_submit_buf(struct blkfront_dev *dev, u8 op, u64 sector, void *buf,
                        unsigned nsect, u64 tag)
{
    struct blk_seg segs[BLKIF_MAX_SEGMENTS_PER_REQUEST];
    unsigned n = 0;
    unsigned long a = (unsigned long)buf;
    while (nsect) {
        if (n == BLKIF_MAX_SEGMENTS_PER_REQUEST) return -2;
        unsigned room = (PAGE_SIZE - (a & (PAGE_SIZE - 1))) / BLK_SECTOR;
        unsigned k = nsect < room ? nsect : room;
        segs[n].buf = (void *)a;
        segs[n].nsect = k;
        n++;
        a += (unsigned long)k * BLK_SECTOR;
        nsect -= k;
    }
    return blkfront_submit(dev, op, sector, segs, n, tag);
}

void blkfront_push(struct blkfront_dev *dev)
{
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&dev->ring, notify);
    if (notify) {
        evtchn_send(dev->port);
        dev->notifications++;
    }
}

int blkfront_reap(struct blkfront_dev *dev, blkfront_cb_t cb, void *arg)
{
    int done = 0, more;
    do {
        RING_IDX rp = ACCESS_ONCE(dev->ring.sring->rsp_prod);
        rmb();
        for (RING_IDX i = dev->ring.rsp_cons; i != rp; i++) {
            blkif_response_t rsp = *RING_GET_RESPONSE(&dev->ring, i);
            dev->ring.rsp_cons = i + 1;
            if (rsp.id >= BLK_RING_SIZE || !dev->slots[rsp.id].in_use) {
                dev->bad_responses++;
                continue;
            }
            struct blkfront_slot *s = &dev->slots[rsp.id];
            for (unsigned k = 0; k < s->nr_grefs; k++)
                if (!gnttab_end_access(s->grefs[k]))
                    printk("blkfront: backend still holds grant %u\n", s->grefs[k]);
            s->in_use = 0;
            dev->free_slots[dev->nr_free++] = (unsigned)rsp.id;
            dev->inflight--;
            done++;
            if (cb) cb(s->tag, rsp.status, arg);
        }
        RING_FINAL_CHECK_FOR_RESPONSES(&dev->ring, more);
    } while (more);
    return done;
}

int blkfront_wait(struct blkfront_dev *dev, blkfront_cb_t cb, void *arg, u64 deadline_ns)
{
    if (!deadline_ns) deadline_ns = monotonic_ns() + HANDSHAKE_NS;
    for (;;) {
        clear_evtchn(dev->port);
        mb();
        int n = blkfront_reap(dev, cb, arg);
        if (n) return n;
        if (monotonic_ns() > deadline_ns) return -ETIMEDOUT;
        evtchn_poll(dev->port, deadline_ns);
    }
}

struct sync_state { int status; unsigned done; };

static void sync_cb(u64 tag, int status, void *arg)
{
    struct sync_state *s = arg;
    if (status && !s->status) s->status = status;
    s->done++;
}

int blkfront_io(struct blkfront_dev *dev, u8 op, u64 sector, void *buf, u64 nsect)
{
    struct sync_state ss = { 0, 0 };
    unsigned issued = 0;
    u8 *p = buf;
    const unsigned max = BLKIF_MAX_SEGMENTS_PER_REQUEST * (PAGE_SIZE / BLK_SECTOR);
    while (nsect || ss.done < issued) {
        while (nsect) {
            /* Up to 11 segments: stop at the page boundary that makes it 11. */
            unsigned off = ((unsigned long)p & (PAGE_SIZE - 1)) / BLK_SECTOR;
            unsigned k = max - off;
            if (k > nsect) k = (unsigned)nsect;
            int rc = blkfront_submit_buf(dev, op, sector, p, k, issued);
            if (rc == -1) break;                 /* ring full */
            if (rc) return -2;
            issued++;
            sector += k;
            p += (unsigned long)k * BLK_SECTOR;
            nsect -= k;
        }
        blkfront_push(dev);
        if (ss.done < issued) {
            int n = blkfront_wait(dev, sync_cb, &ss, 0);
            if (n < 0) return n;
        }
    }
    return ss.status;
}

int blkfront_read(struct blkfront_dev *dev, u64 sector, void *buf, u64 nsect)
{
    return blkfront_io(dev, BLKIF_OP_READ, sector, buf, nsect);
}

int blkfront_write(struct blkfront_dev *dev, u64 sector, const void *buf, u64 nsect)
{
    return blkfront_io(dev, BLKIF_OP_WRITE, sector, (void *)buf, nsect);
}

int blkfront_flush(struct blkfront_dev *dev)
{
    struct sync_state ss = { 0, 0 };
    int rc = blkfront_submit(dev, BLKIF_OP_FLUSH_DISKCACHE, 0, NULL, 0, 0);
    if (rc) return rc;
    blkfront_push(dev);
    while (!ss.done) {
        int n = blkfront_wait(dev, sync_cb, &ss, 0);
        if (n < 0) return n;
    }
    return ss.status;
}

int blkfront_discard(struct blkfront_dev *dev, u64 sector, u64 nsect)
{
    struct sync_state ss = { 0, 0 };
    int rc = blkfront_submit_discard(dev, sector, nsect, 0);
    if (rc) return rc;
    blkfront_push(dev);
    while (!ss.done) {
        int n = blkfront_wait(dev, sync_cb, &ss, 0);
        if (n < 0) return n;
    }
    return ss.status;
}
