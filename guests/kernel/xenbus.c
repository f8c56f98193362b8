#include <stdarg.h>
#include "xenbus.h"
#include "hypercall.h"
#include "events.h"
#include "console.h"
#include "time.h"
#include "lib.h"
#include "mm.h"
#include "sched.h"

#define ETIMEDOUT 110
#define EINVAL 22
#define E2BIG 7
#define EIO 5

static char store_page[PAGE_SIZE] __attribute__((aligned(PAGE_SIZE), section(".bss.page_aligned")));
static struct xenstore_domain_interface *ring;
static evtchn_port_t store_port;
static u32 next_req_id = 1;

/* Reply buffer (payload max 4096 + NUL). */
static char reply[XENSTORE_PAYLOAD_MAX + 1];

/* Watch-event queue. */
#define NR_EVENTS 16
struct xs_event { char path[256]; char token[64]; };
static struct xs_event events[NR_EVENTS];
static unsigned ev_head, ev_tail;          /* head: next to read; tail: next free */
static unsigned long events_dropped;

static const struct { const char *name; int err; } xs_errs[] = {
    { "EINVAL", 22 }, { "EACCES", 13 }, { "EEXIST", 17 }, { "EISDIR", 21 },
    { "ENOENT", 2 }, { "ENOMEM", 12 }, { "ENOSPC", 28 }, { "EIO", 5 },
    { "ENOTEMPTY", 39 }, { "ENOSYS", 38 }, { "EROFS", 30 }, { "EBUSY", 16 },
    { "EAGAIN", 11 }, { "EISCONN", 106 }, { "E2BIG", 7 }, { "EPERM", 1 },
};

int xenbus_init(void)
{
    if (ring) return 0;
    if (!start_info->store_mfn) return -EIO;
    long rc = map_frame((unsigned long)store_page, start_info->store_mfn, PTE_KERNEL_RW);
    if (rc) return (int)rc;
    store_port = start_info->store_evtchn;
    mask_evtchn(store_port);
    ring = (struct xenstore_domain_interface *)store_page;
    return 0;
}

/* After a suspend into a new domain: the ring keeps its VA (same PFN), the
 * event channel is new, queued watch events belong to the old xenstored. */
void xenbus_resume(void)
{
    if (!ring) return;
    store_port = start_info->store_evtchn;
    mask_evtchn(store_port);
    ev_head = ev_tail = 0;
}

/* Wait for a notification (or 100 ms) unless `ready` already holds. */
static int wait_step(int ready, u64 deadline)
{
    if (ready) return 0;
    if (monotonic_ns() > deadline) return -ETIMEDOUT;
    u64 t = monotonic_ns() + 100000000UL;
    evtchn_poll(store_port, t < deadline ? t : deadline);
    clear_evtchn(store_port);
    return 0;
}

static int ring_put(const void *data, u32 len, u64 deadline)
{
    const char *p = data;
    while (len) {
        clear_evtchn(store_port);
        mb();
        XENSTORE_RING_IDX cons = ACCESS_ONCE(ring->req_cons), prod = ring->req_prod;
        mb();
        u32 used = prod - cons;
        if (used > XENSTORE_RING_SIZE) return -EIO;
        u32 space = XENSTORE_RING_SIZE - used;
        if (!space) {
            evtchn_send(store_port);
            int rc = wait_step(0, deadline);
            if (rc) return rc;
            continue;
        }
        u32 n = len < space ? len : space;
        for (u32 i = 0; i < n; i++)
            ring->req[MASK_XENSTORE_IDX(prod + i)] = p[i];
        wmb();
        ACCESS_ONCE(ring->req_prod) = prod + n;
        p += n;
        len -= n;
    }
    return 0;
}

static int ring_get(void *data, u32 len, u64 deadline)
{
    char *p = data;
    while (len) {
        clear_evtchn(store_port);
        mb();
        XENSTORE_RING_IDX prod = ACCESS_ONCE(ring->rsp_prod), cons = ring->rsp_cons;
        rmb();
        u32 avail = prod - cons;
        if (avail > XENSTORE_RING_SIZE) return -EIO;
        if (!avail) {
            int rc = wait_step(0, deadline);
            if (rc) return rc;
            continue;
        }
        u32 n = len < avail ? len : avail;
        for (u32 i = 0; i < n; i++)
            p[i] = ring->rsp[MASK_XENSTORE_IDX(cons + i)];
        mb();
        ACCESS_ONCE(ring->rsp_cons) = cons + n;
        evtchn_send(store_port);             /* space freed for the server */
        p += n;
        len -= n;
    }
    return 0;
}

static void copy_str(char *dst, size_t size, const char *src)
{
    size_t n = strnlen(src, size - 1);
    memcpy(dst, src, n);
    dst[n] = 0;
}

static void queue_event(const char *payload, u32 len)
{
    /* payload: path\0token\0 */
    if (ev_tail - ev_head >= NR_EVENTS) { events_dropped++; return; }
    struct xs_event *e = &events[ev_tail % NR_EVENTS];
    copy_str(e->path, sizeof(e->path), payload);
    size_t pl = strnlen(payload, len);
    copy_str(e->token, sizeof(e->token), pl + 1 < len ? payload + pl + 1 : "");
    ev_tail++;
}

/* Read one message into `reply`; watch events are queued. Returns 1 for an
 * event, 0 for a reply (header in *hdr), or -errno. */
static int read_message(struct xsd_sockmsg *hdr, u64 deadline)
{
    int rc = ring_get(hdr, sizeof(*hdr), deadline);
    if (rc) return rc;
    if (hdr->len > XENSTORE_PAYLOAD_MAX) return -E2BIG;
    rc = ring_get(reply, hdr->len, deadline);
    if (rc) return rc;
    reply[hdr->len] = 0;
    if (hdr->type == XS_WATCH_EVENT) {
        queue_event(reply, hdr->len);
        return 1;
    }
    return 0;
}

static int error_code(const char *name)
{
    for (unsigned i = 0; i < ARRAY_SIZE(xs_errs); i++)
        if (!strcmp(name, xs_errs[i].name)) return -xs_errs[i].err;
    return -EINVAL;
}

/* Put one request of `n` parts on the ring (the caller notifies); its
 * req_id in *id. */
static int xs_put(u32 type, xenbus_transaction_t t, const char *const *parts,
                  const u32 *lens, unsigned n, u64 deadline, u32 *id)
{
    struct xsd_sockmsg hdr = { .type = type, .req_id = next_req_id++, .tx_id = t };
    for (unsigned i = 0; i < n; i++) hdr.len += lens[i];
    if (hdr.len > XENSTORE_PAYLOAD_MAX) return -E2BIG;
    *id = hdr.req_id;
    int rc = ring_put(&hdr, sizeof(hdr), deadline);
    for (unsigned i = 0; !rc && i < n; i++)
        rc = ring_put(parts[i], lens[i], deadline);
    return rc;
}

/* Read messages until the reply to request `id` (left in `reply`): its
 * length, or -errno. Watch events are queued; replies to other requests
 * (stale ones, after a timeout) are skipped. */
static int xs_reply(u32 id, u64 deadline)
{
    for (;;) {
        struct xsd_sockmsg rh;
        int rc = read_message(&rh, deadline);
        if (rc == 1) continue;
        if (rc) return rc;
        if (rh.req_id != id) continue;
        return rh.type == XS_ERROR ? error_code(reply) : (int)rh.len;
    }
}

static int ensure_ring(void)
{
    return ring ? 0 : xenbus_init();
}

/* Send a request of `n` parts and wait for its reply (left in `reply`,
 * length returned), or -errno. */
static int xs_talk(u32 type, xenbus_transaction_t t, const char *const *parts,
                   const u32 *lens, unsigned n)
{
    int rc = ensure_ring();
    if (rc) return rc;
    int mask = irq_save();
    u64 deadline = monotonic_ns() + XENBUS_TIMEOUT_NS;
    u32 id;
    rc = xs_put(type, t, parts, lens, n, deadline, &id);
    evtchn_send(store_port);
    if (!rc) rc = xs_reply(id, deadline);
    irq_restore(mask);
    return rc;
}

/* `n` writes as one round trip: every request goes on the ring before the
 * first reply is awaited (xenstored answers a connection's requests in
 * order, each on its own; Linux's xenbus has several in flight the same
 * way). Returns 0 or the first failure's -errno; every reply is consumed. */
int xenbus_write_many(xenbus_transaction_t t, unsigned n, const char *const *paths,
                      const char *const *values)
{
    int rc = ensure_ring();
    if (rc) return rc;
    int mask = irq_save();
    u64 deadline = monotonic_ns() + XENBUS_TIMEOUT_NS;
    u32 first = next_req_id;
    unsigned sent = 0;
    for (; !rc && sent < n; sent++) {
        const char *parts[] = { paths[sent], values[sent] };
        u32 lens[] = { (u32)strlen(paths[sent]) + 1, (u32)strlen(values[sent]) };
        u32 id;
        rc = xs_put(XS_WRITE, t, parts, lens, 2, deadline, &id);
        if (rc) break;
    }
    evtchn_send(store_port);
    for (unsigned i = 0; i < sent; i++) {
        int r = xs_reply(first + i, deadline);
        if (r < 0 && !rc) rc = r;
        if (r == -ETIMEDOUT || r == -EIO || r == -E2BIG) break;   /* the ring is gone */
    }
    irq_restore(mask);
    return rc < 0 ? rc : 0;
}

static int talk_path(u32 type, xenbus_transaction_t t, const char *path)
{
    const char *parts[] = { path };
    u32 lens[] = { (u32)strlen(path) + 1 };
    return xs_talk(type, t, parts, lens, 1);
}

int xenbus_read(xenbus_transaction_t t, const char *path, char *buf, size_t size)
{
    int rc = talk_path(XS_READ, t, path);
    if (rc < 0) return rc;
    if (size) {
        size_t n = (size_t)rc < size - 1 ? (size_t)rc : size - 1;
        memcpy(buf, reply, n);
        buf[n] = 0;
    }
    return rc;
}

int xenbus_read_long(xenbus_transaction_t t, const char *path, long *out)
{
    char buf[32];
    int rc = xenbus_read(t, path, buf, sizeof(buf));
    if (rc < 0) return rc;
    return parse_long(buf, out) ? 0 : -EINVAL;
}

int xenbus_write(xenbus_transaction_t t, const char *path, const char *value)
{
    const char *parts[] = { path, value };
    u32 lens[] = { (u32)strlen(path) + 1, (u32)strlen(value) };
    int rc = xs_talk(XS_WRITE, t, parts, lens, 2);
    return rc < 0 ? rc : 0;
}

int xenbus_printf(xenbus_transaction_t t, const char *path, const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return xenbus_write(t, path, buf);
}

int xenbus_mkdir(xenbus_transaction_t t, const char *path)
{
    int rc = talk_path(XS_MKDIR, t, path);
    return rc < 0 ? rc : 0;
}

int xenbus_rm(xenbus_transaction_t t, const char *path)
{
    int rc = talk_path(XS_RM, t, path);
    return rc < 0 ? rc : 0;
}

int xenbus_directory(xenbus_transaction_t t, const char *path, char *buf, size_t size)
{
    int rc = talk_path(XS_DIRECTORY, t, path);
    if (rc < 0) return rc;
    int count = 0;
    size_t out = 0;
    for (int i = 0; i < rc; ) {
        size_t l = strnlen(reply + i, (size_t)(rc - i));
        if (out + l + 1 <= size) {
            memcpy(buf + out, reply + i, l);
            buf[out + l] = 0;
            out += l + 1;
            count++;
        }
        i += (int)l + 1;
    }
    return count;
}

int xenbus_watch(const char *path, const char *token)
{
    const char *parts[] = { path, token };
    u32 lens[] = { (u32)strlen(path) + 1, (u32)strlen(token) + 1 };
    int rc = xs_talk(XS_WATCH, XBT_NIL, parts, lens, 2);
    return rc < 0 ? rc : 0;
}

int xenbus_unwatch(const char *path, const char *token)
{
    const char *parts[] = { path, token };
    u32 lens[] = { (u32)strlen(path) + 1, (u32)strlen(token) + 1 };
    int rc = xs_talk(XS_UNWATCH, XBT_NIL, parts, lens, 2);
    return rc < 0 ? rc : 0;
}

static int take_event(const char *filter, char *path, size_t ps, char *token, size_t ts)
{
    for (unsigned i = ev_head; i != ev_tail; i++) {
        struct xs_event *e = &events[i % NR_EVENTS];
        if (filter && strcmp(filter, e->token)) continue;
        if (path && ps) copy_str(path, ps, e->path);
        if (token && ts) copy_str(token, ts, e->token);
        /* remove entry i, keeping the order of the others */
        for (unsigned j = i; j + 1 != ev_tail; j++)
            events[j % NR_EVENTS] = events[(j + 1) % NR_EVENTS];
        ev_tail--;
        return 1;
    }
    return 0;
}

int xenbus_wait_event(const char *filter, char *path, size_t ps, char *token, size_t ts,
                      u64 deadline)
{
    if (!ring) {
        int rc = xenbus_init();
        if (rc) return rc;
    }
    if (!deadline) deadline = monotonic_ns() + XENBUS_TIMEOUT_NS;
    int mask = irq_save();
    int rc = 0;
    while (!take_event(filter, path, ps, token, ts)) {
        struct xsd_sockmsg rh;
        clear_evtchn(store_port);
        mb();
        if (ACCESS_ONCE(ring->rsp_prod) == ring->rsp_cons) {
            if (monotonic_ns() > deadline) { rc = -ETIMEDOUT; break; }
            u64 t = monotonic_ns() + 100000000UL;
            evtchn_poll(store_port, t < deadline ? t : deadline);
            continue;
        }
        rc = read_message(&rh, deadline);
        if (rc < 0) break;
        rc = 0;                               /* a stray reply is dropped */
    }
    irq_restore(mask);
    return rc;
}

void xenbus_flush_events(const char *token)
{
    while (take_event(token, NULL, 0, NULL, 0))
        ;
}

int xenbus_transaction_start(xenbus_transaction_t *t)
{
    const char *parts[] = { "" };
    u32 lens[] = { 1 };
    int rc = xs_talk(XS_TRANSACTION_START, XBT_NIL, parts, lens, 1);
    if (rc < 0) return rc;
    long id;
    if (!parse_long(reply, &id)) return -EINVAL;
    *t = (xenbus_transaction_t)id;
    return 0;
}

int xenbus_transaction_end(xenbus_transaction_t t, int abort)
{
    const char *parts[] = { abort ? "F" : "T" };
    u32 lens[] = { 2 };
    int rc = xs_talk(XS_TRANSACTION_END, t, parts, lens, 1);
    return rc < 0 ? rc : 0;
}

int xenbus_switch_state(xenbus_transaction_t t, const char *dir, XenbusState state)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/state", dir);
    return xenbus_printf(t, path, "%d", (int)state);
}

int xenbus_read_state(const char *dir)
{
    char path[256];
    long v;
    snprintf(path, sizeof(path), "%s/state", dir);
    int rc = xenbus_read_long(XBT_NIL, path, &v);
    return rc < 0 ? rc : (int)v;
}

int xenbus_wait_for_state(const char *otherend, XenbusState want, int any_later, u64 timeout_ns)
{
    char path[256], token[32];
    static unsigned seq;
    snprintf(path, sizeof(path), "%s/state", otherend);
    snprintf(token, sizeof(token), "state-%u", seq++);
    u64 deadline = monotonic_ns() + (timeout_ns ? timeout_ns : XENBUS_TIMEOUT_NS);
    /* Already there (a backend in InitWait when a resumed frontend looks, as
     * usual): one round trip instead of three (watch, read, unwatch). Else
     * watch, then read again: the watch fires once when set, so a change in
     * between is not missed. */
    int st = xenbus_read_state(otherend);
    if (st >= 0 && (st == (int)want || (any_later && st >= (int)want)))
        return st;
    int rc = xenbus_watch(path, token);
    if (rc) return rc;
    for (;;) {
        st = xenbus_read_state(otherend);
        if (st >= 0 && (st == (int)want || (any_later && st >= (int)want)))
            break;
        rc = xenbus_wait_event(token, NULL, 0, NULL, 0, deadline);
        if (rc) { st = rc; break; }
    }
    xenbus_unwatch(path, token);
    xenbus_flush_events(token);
    return st;
}

/* Hot-plug: wait (on a watch, as a frontend driver does on device/) until
 * `node` exists, e.g. device/vif/0 written by `xl network-attach` after boot. */
int xenbus_wait_for_node(const char *node, u64 timeout_ns)
{
    char buf[8], token[32];
    static unsigned seq;
    snprintf(token, sizeof(token), "node-%u", seq++);
    u64 deadline = monotonic_ns() + (timeout_ns ? timeout_ns : XENBUS_TIMEOUT_NS);
    int rc = xenbus_watch(node, token);
    if (rc) return rc;
    for (;;) {
        rc = xenbus_read(XBT_NIL, node, buf, sizeof(buf));
        if (rc >= 0) { rc = 0; break; }
        rc = xenbus_wait_event(token, NULL, 0, NULL, 0, deadline);
        if (rc) break;
    }
    xenbus_unwatch(node, token);
    xenbus_flush_events(token);
    return rc;
}

void xenbus_init_home(char *buf, size_t size)
{
    int rc = xenbus_init();
    if (rc) panic("xenbus_init failed: %d", rc);
    long domid;
    rc = xenbus_read_long(XBT_NIL, "domid", &domid);
    if (rc) panic("xenbus read domid failed: %d", rc);
    snprintf(buf, size, "/local/domain/%ld", domid);
}
