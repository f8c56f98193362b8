/* Block device test guest (blkfront against aiovmm's blkback).
 *
 * cmdline (all optional):
 *   mode=rw|ro|bench|hostile|discard|persistent   default rw
 *                              (persistent: offers feature-persistent, then rewrites and
 *                              revokes a grant the backend holds; see persistent_test)
 *   vdev=<devid>               default: the first vbd (lowest devid)
 *   sectors=<n> pattern=<seed> start=<sector>   the area the pattern covers
 *   depth=<d>                  requests in flight (1..16 in rw/ro, 1..32 in bench; default 8)
 *   hold=1                     rw: after "result flush" (ro: after the read-back), print
 *                              "result hold 1" and wait forever (until the host destroys the
 *                              domain or kills the hypervisor: durability and sharing tests)
 *   bench=seqread|seqwrite|randread|randwrite ops=<n> span=<sectors> bs=<sectors>
 *                              (mode=bench: ops requests of bs sectors, 1..88 (11 pages,
 *                              the most one request carries), default 8 = 4 KiB;
 *                              sequential wraps over span, random picks bs-aligned blocks)
 *   reconnect=1                rw/ro: after the read-back, close the vbd (Closing, Closed),
 *                              start over (Initialising, as a reloaded driver), connect again
 *                              and read the pattern back through the new ring:
 *                              result reconnect_state <backend state after Initialising>,
 *                              result reconnect_read_ok <n>
 *   hotplug=<seconds>          the vbd may not exist at boot (xl block-attach later): wait
 *                              up to <seconds> for device/vbd/<vdev> (needs vdev=)
 *   dstart=<sector> dlen=<n>   mode=discard: the range discarded, relative to start
 *                              (default: the middle half of the pattern area)
 *
 * Prints (see guests/README.md):
 *   blk: sectors=<total> size=<sector-size> ro=<0|1>
 *   rw:      result write <n>, result flush <status>, [result ordered <status> (n >= 32:
 *            writes + FLUSH + WRITE_BARRIER in one batch)], result read_ok <n>, result errors <k>, result io_ns <ns>
 *   ro:      result ro_write <status>, then the read-back of a pattern the host wrote:
 *            result read_ok <n>, result errors <k>, result io_ns <ns>
 *   bench:   result bench_ops <n>, result errors <k>, result io_ns <ns>
 *   discard: result feature_discard <0|1>, result discard_granularity <bytes>,
 *            result discard_alignment <bytes>; the pattern is written and flushed, then
 *            result discard <status>, result discard_beyond <status> (a range past the
 *            end: -1), result discard_zero <n> (sectors of the discarded range reading as
 *            zeros), result discard_kept <n> (pattern sectors around it still intact),
 *            result errors <k>
 *   hostile: result hostile_<case> <status> per malformed request, result hostile_after <status>
 *            (a good read after them), result barrier_nseg0 / flush_nseg0 <status> (a
 *            WRITE_BARRIER / FLUSH_DISKCACHE without segments: a flush, 0), result hostile_disconnect <backend state> after a
 *            ring-index violation, result other_ok <0|1> (a second vbd still works, if any)
 * The pattern: sector s, 64-bit word w = splitmix64(seed * 0x9e3779b97f4a7c15 +
 * s * 0xc2b2ae3d27d4eb4f + w). */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "events.h"
#include "gnttab.h"
#include "xenbus.h"
#include "blkfront.h"
#include "time.h"
#include "lib.h"
#include "mm.h"

#define MAX_DEPTH 16
#define CHUNK_SECT 64                           /* 32 KiB per request in rw/ro modes */
#define CHUNK_BYTES (CHUNK_SECT * BLK_SECTOR)

static u8 bufs[MAX_DEPTH][CHUNK_BYTES] __attribute__((aligned(PAGE_SIZE), section(".bss.page_aligned")));

static u64 pattern_word(u64 seed, u64 sector, unsigned w)
{
    u64 x = seed * 0x9e3779b97f4a7c15UL + sector * 0xc2b2ae3d27d4eb4fUL + w;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
    return x ^ (x >> 31);
}

static void fill(u8 *buf, u64 seed, u64 sector, unsigned nsect)
{
    u64 *p = (u64 *)buf;
    for (unsigned s = 0; s < nsect; s++)
        for (unsigned w = 0; w < BLK_SECTOR / 8; w++)
            *p++ = pattern_word(seed, sector + s, w);
}

static unsigned check(const u8 *buf, u64 seed, u64 sector, unsigned nsect)
{
    const u64 *p = (const u64 *)buf;
    unsigned good = 0;
    for (unsigned s = 0; s < nsect; s++) {
        unsigned ok = 1;
        for (unsigned w = 0; w < BLK_SECTOR / 8; w++)
            if (p[s * (BLK_SECTOR / 8) + w] != pattern_word(seed, sector + s, w)) ok = 0;
        good += ok;
    }
    return good;
}

/* ------------------------------------------------ a pipeline of requests */
struct pipe {
    struct blkfront_dev *dev;
    u8 op;
    u64 seed;
    int verify;
    u64 slot_sector[MAX_DEPTH];
    unsigned slot_nsect[MAX_DEPTH];
    unsigned free[MAX_DEPTH];
    unsigned nr_free;
    u64 ok_sectors, errors, completed;
};

static void pipe_cb(u64 tag, int status, void *arg)
{
    struct pipe *p = arg;
    unsigned b = (unsigned)tag;
    p->completed++;
    if (status) {
        p->errors++;
    } else if (p->verify) {
        unsigned good = check(bufs[b], p->seed, p->slot_sector[b], p->slot_nsect[b]);
        p->ok_sectors += good;
        if (good != p->slot_nsect[b]) p->errors++;
    } else {
        p->ok_sectors += p->slot_nsect[b];
    }
    p->free[p->nr_free++] = b;
}

/* Issue `nreq` requests; sector_of(i)/nsect give each one's range. */
typedef u64 (*sector_fn)(u64 i, void *ctx);

/* A verifying read pass over the pattern: the pipe reset, the buffers cleared. */
static void read_start(struct pipe *p, struct blkfront_dev *dev, u64 seed)
{
    memset(p, 0, sizeof(*p));
    p->dev = dev;
    p->seed = seed;
    p->op = BLKIF_OP_READ;
    p->verify = 1;
    memset(bufs, 0, sizeof(bufs));
}

static int run_pipe(struct pipe *p, u64 nreq, unsigned depth, sector_fn where, void *ctx,
                    unsigned nsect_each, u64 total_sect)
{
    p->nr_free = 0;
    for (unsigned b = 0; b < depth; b++) p->free[p->nr_free++] = b;
    u64 issued = 0;
    u64 covered = 0;
    while (p->completed < nreq) {
        int queued = 0;
        while (issued < nreq && p->nr_free) {
            unsigned b = p->free[p->nr_free - 1];
            u64 sec = where(issued, ctx);
            unsigned n = nsect_each;
            if (total_sect && covered + n > total_sect) n = (unsigned)(total_sect - covered);
            if (p->op == BLKIF_OP_WRITE) fill(bufs[b], p->seed, sec, n);
            p->slot_sector[b] = sec;
            p->slot_nsect[b] = n;
            int rc = blkfront_submit_buf(p->dev, p->op, sec, bufs[b], n, b);
            if (rc == -1) break;
            if (rc) { printk("blk: submit failed: %d\n", rc); return rc; }
            p->nr_free--;
            issued++;
            covered += n;
            queued = 1;
        }
        if (queued) blkfront_push(p->dev);
        int n = blkfront_wait(p->dev, pipe_cb, p, 0);
        if (n < 0) { printk("blk: timeout with %lu in flight\n", issued - p->completed); return n; }
    }
    return 0;
}

struct linear { u64 start; unsigned step; };
static u64 linear_at(u64 i, void *ctx)
{
    struct linear *l = ctx;
    return l->start + i * l->step;
}

/* ------------------------------------------------------- bench stream */
struct bstate { u64 done, errors; };
static void bench_cb(u64 tag, int status, void *arg)
{
    struct bstate *b = arg;
    b->done++;
    if (status) b->errors++;
}

/* `ops` requests of `bs` sectors, up to `depth` in flight; each in-flight request uses
 * its own pages of bufs (as many regions as fit, reused round-robin). */
static int bench_stream(struct blkfront_dev *dev, u8 op, u64 ops, unsigned depth, unsigned bs,
                        u64 span, int rnd, u64 seed, struct bstate *b)
{
    unsigned pages = (bs + 7) / 8;
    unsigned regions = sizeof(bufs) / (pages * PAGE_SIZE);
    u8 *base = &bufs[0][0];
    u64 issued = 0, rstate = seed, blocks = span / bs;
    unsigned slot = 0;
    while (b->done < ops) {
        int queued = 0;
        while (issued < ops && dev->inflight < depth) {
            u64 sec;
            if (rnd) {
                rstate = rstate * 6364136223846793005UL + 1442695040888963407UL;
                sec = ((rstate >> 33) % blocks) * bs;
            } else {
                sec = (issued % blocks) * bs;
            }
            u8 *buf = base + (u64)(slot % regions) * pages * PAGE_SIZE;
            int rc = blkfront_submit_buf(dev, op, sec, buf, bs, issued);
            if (rc == -1) break;
            if (rc) return rc;
            slot++;
            issued++;
            queued = 1;
        }
        if (queued) blkfront_push(dev);
        int n = blkfront_wait(dev, bench_cb, b, 0);
        if (n < 0) return n;
    }
    return 0;
}

/* ------------------------------------------------------------ discard */
static int is_zero(const u8 *p, unsigned n)
{
    for (unsigned i = 0; i < n; i++) if (p[i]) return 0;
    return 1;
}

static void discard_test(struct blkfront_dev *dev, struct blkfront_info *info, u64 seed,
                         u64 start, u64 nsect, u64 dstart, u64 dlen, unsigned depth)
{
    u64 errors = 0;
    printk("result feature_discard %d\n", info->discard);
    printk("result discard_granularity %u\n", info->discard_granularity);
    printk("result discard_alignment %u\n", info->discard_alignment);
    struct pipe p;
    memset(&p, 0, sizeof(p));
    p.dev = dev;
    p.seed = seed;
    p.op = BLKIF_OP_WRITE;
    u64 nreq = (nsect + CHUNK_SECT - 1) / CHUNK_SECT;
    struct linear lin = { start, CHUNK_SECT };
    if (run_pipe(&p, nreq, depth, linear_at, &lin, CHUNK_SECT, nsect)) panic("write pipeline");
    errors += p.errors;
    if (blkfront_flush(dev)) errors++;
    int st = info->discard ? blkfront_discard(dev, start + dstart, dlen) : -2;
    printk("result discard %d\n", st);
    st = info->discard ? blkfront_discard(dev, info->sectors - 1, 2) : -2;
    printk("result discard_beyond %d\n", st);
    u64 zero = 0, kept = 0;
    for (u64 s = 0; s < nsect; s += CHUNK_SECT) {
        unsigned n = nsect - s < CHUNK_SECT ? (unsigned)(nsect - s) : CHUNK_SECT;
        memset(bufs[0], 0xee, CHUNK_BYTES);
        if (blkfront_read(dev, start + s, bufs[0], n)) { errors++; continue; }
        for (unsigned k = 0; k < n; k++) {
            u64 rel = s + k;
            const u8 *sec = bufs[0] + k * BLK_SECTOR;
            if (rel >= dstart && rel < dstart + dlen)
                zero += is_zero(sec, BLK_SECTOR);
            else
                kept += check(sec, seed, start + rel, 1);
        }
    }
    printk("result discard_zero %lu\n", zero);
    printk("result discard_kept %lu\n", kept);
    printk("result errors %lu\n", errors);
}

/* Ordering points behind writes in flight: four 4 KiB writes, a FLUSH and a
 * WRITE_BARRIER (rewriting the same pattern) in one push; 0 if all succeed. */
struct ord_state { int status; unsigned done; };
static void ord_cb(u64 tag, int status, void *arg)
{
    struct ord_state *o = arg;
    if (status && !o->status) o->status = status;
    o->done++;
}

static int ordered(struct blkfront_dev *dev, u64 seed, u64 start)
{
    struct ord_state o = { 0, 0 };
    for (unsigned i = 0; i < 4; i++) {
        fill(bufs[i], seed, start + 8 * i, 8);
        if (blkfront_submit_buf(dev, BLKIF_OP_WRITE, start + 8 * i, bufs[i], 8, i)) return -100;
    }
    if (blkfront_submit(dev, BLKIF_OP_FLUSH_DISKCACHE, 0, NULL, 0, 4)) return -101;
    fill(bufs[5], seed, start, 8);
    if (blkfront_submit_buf(dev, BLKIF_OP_WRITE_BARRIER, start, bufs[5], 8, 5)) return -102;
    blkfront_push(dev);
    while (o.done < 6) {
        int n = blkfront_wait(dev, ord_cb, &o, 0);
        if (n < 0) return n;
    }
    return o.status;
}

/* ------------------------------------------------------ hostile requests */
static int raw_request(struct blkfront_dev *dev, const blkif_request_t *src)
{
    blkif_request_t *req = RING_GET_REQUEST(&dev->ring, dev->ring.req_prod_pvt);
    *req = *src;
    dev->ring.req_prod_pvt++;
    blkfront_push(dev);
    u64 deadline = monotonic_ns() + 10000000000UL;
    for (;;) {
        clear_evtchn(dev->port);
        mb();
        if (ACCESS_ONCE(dev->ring.sring->rsp_prod) != dev->ring.rsp_cons) break;
        if (monotonic_ns() > deadline) return -1000;
        dev->ring.sring->rsp_event = dev->ring.rsp_cons + 1;
        mb();
        if (ACCESS_ONCE(dev->ring.sring->rsp_prod) != dev->ring.rsp_cons) break;
        evtchn_poll(dev->port, deadline);
    }
    rmb();
    blkif_response_t rsp = *RING_GET_RESPONSE(&dev->ring, dev->ring.rsp_cons);
    dev->ring.rsp_cons++;
    return rsp.status;
}

/* One request of the hostile run: operation (of an indirect request: its indirect_op),
 * segment count and sector, then at most one segment changed from the well-formed default
 * (every segment: the good grant, sectors 0-7). Zero fields change nothing (no case needs a
 * grant, first or last sector of 0 as its change). */
#define DESC_PAGE 0xffff            /* `nth` for an indirect request's descriptor-page grant */
struct req_case {
    const char *name;
    u8 op;
    u16 nseg;
    u64 sector;
    u16 nth;                        /* 1 + the segment changed; 0: none */
    long gref;
    u8 first, last;
};

/* A direct request: `nseg` segments from sector `sector`, every segment grant g, sectors 0-7. */
static void build_request(blkif_request_t *r, struct blkfront_dev *dev, u8 op, u16 nseg,
                          u64 sector, grant_ref_t g)
{
    memset(r, 0, sizeof(*r));
    r->operation = op;
    r->nr_segments = (u8)nseg;
    r->handle = dev->handle;
    r->id = 0xabc;
    r->sector_number = sector;
    for (unsigned i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
        r->seg[i].gref = g;
        r->seg[i].first_sect = 0;
        r->seg[i].last_sect = 7;
    }
}

static void change_segment(struct blkif_request_segment *s, const struct req_case *c)
{
    if (c->gref) s->gref = (grant_ref_t)c->gref;
    if (c->first) s->first_sect = c->first;
    if (c->last) s->last_sect = c->last;
}

/* Send each case as a direct request; print "result <name> <status>". */
static void send_direct(struct blkfront_dev *dev, grant_ref_t g, const struct req_case *c, unsigned n)
{
    blkif_request_t r;
    for (; n--; c++) {
        build_request(&r, dev, c->op, c->nseg, c->sector, g);
        if (c->nth) change_segment(&r.seg[c->nth - 1], c);
        printk("result %s %d\n", c->name, raw_request(dev, &r));
    }
}

/* Send each case as BLKIF_OP_INDIRECT, its segment descriptors in page ip (granted as ind),
 * all 512 rewritten to the default before each request. */
static void send_indirect(struct blkfront_dev *dev, grant_ref_t g, struct blkif_request_segment *ip,
                          grant_ref_t ind, const struct req_case *c, unsigned n)
{
    blkif_request_t r;
    blkif_request_indirect_t *ir = (blkif_request_indirect_t *)&r;
    for (; n--; c++) {
        memset(&r, 0, sizeof(r));
        ir->operation = BLKIF_OP_INDIRECT;
        ir->indirect_op = c->op;
        ir->nr_segments = c->nseg;
        ir->handle = dev->handle;
        ir->id = 0xdef;
        ir->sector_number = c->sector;
        ir->indirect_grefs[0] = ind;
        for (unsigned i = 0; i < 512; i++) {
            ip[i].gref = g;
            ip[i].first_sect = 0;
            ip[i].last_sect = 7;
        }
        if (c->nth == DESC_PAGE)
            ir->indirect_grefs[0] = (grant_ref_t)c->gref;
        else if (c->nth)
            change_segment(&ip[c->nth - 1], c);
        printk("result %s %d\n", c->name, raw_request(dev, &r));
    }
}

#define NCASES(a) (sizeof(a) / sizeof((a)[0]))
#define REQ(name_, op_, nseg_, sector_, ...) \
    { .name = (name_), .op = (op_), .nseg = (nseg_), .sector = (sector_), __VA_ARGS__ }

static void hostile(struct blkfront_dev *dev, struct blkfront_info *info, u64 seed)
{
    u8 *page = bufs[0];
    long good = gnttab_grant_access(dev->backend_id, virt_to_mfn(page), 0);
    long ro = gnttab_grant_access(dev->backend_id, virt_to_mfn(bufs[1]), 1);
    long other = gnttab_grant_access(7, virt_to_mfn(bufs[2]), 0);   /* for d7, not dom0 */
    const struct req_case direct[] = {
        REQ("hostile_nseg0", BLKIF_OP_READ, 0, 0),
        REQ("hostile_write_nseg0", BLKIF_OP_WRITE, 0, 0),
        /* Not hostile: a barrier or flush without data is a flush (Linux blkback). */
        REQ("barrier_nseg0", BLKIF_OP_WRITE_BARRIER, 0, 0),
        REQ("flush_nseg0", BLKIF_OP_FLUSH_DISKCACHE, 0, 0),
        REQ("hostile_nseg12", BLKIF_OP_READ, 12, 0),
        REQ("hostile_nseg255", BLKIF_OP_READ, 255, 0),
        REQ("hostile_first_gt_last", BLKIF_OP_READ, 1, 0, .nth = 1, .first = 5, .last = 4),
        REQ("hostile_last8", BLKIF_OP_READ, 1, 0, .nth = 1, .last = 8),
        REQ("hostile_beyond_end", BLKIF_OP_READ, 1, info->sectors - 4),
        REQ("hostile_sector_wrap", BLKIF_OP_READ, 1, ~0UL - 3),
        REQ("hostile_bad_gref", BLKIF_OP_READ, 1, 0, .nth = 1, .gref = 99999999),
        REQ("hostile_ungranted", BLKIF_OP_READ, 1, 0, .nth = 1, .gref = 3),        /* reserved, never granted */
        REQ("hostile_other_domain_grant", BLKIF_OP_READ, 1, 0, .nth = 1, .gref = other),
        REQ("hostile_read_into_ro_grant", BLKIF_OP_READ, 1, 0, .nth = 1, .gref = ro),
        REQ("hostile_second_seg_bad", BLKIF_OP_READ, 2, 0, .nth = 2, .gref = 99999999),
        REQ("hostile_discard", BLKIF_OP_DISCARD, 0, 0),
    };
    send_direct(dev, (grant_ref_t)good, direct, NCASES(direct));
    /* BLKIF_OP_INDIRECT (feature-max-indirect-segments): the segment descriptors are in a
     * page granted read-only; a valid read and write first, then malformed ones. */
    {
        struct blkif_request_segment *ip = (struct blkif_request_segment *)bufs[3];
        long ind = gnttab_grant_access(dev->backend_id, virt_to_mfn(ip), 1);
        long wr = gnttab_grant_access(dev->backend_id, virt_to_mfn(bufs[4]), 1);
        const struct req_case indirect[] = {
            REQ("indirect_read", BLKIF_OP_READ, 1, 0),
            REQ("indirect_write", BLKIF_OP_WRITE, 1, 16, .nth = 1, .gref = wr),
            REQ("indirect_read256", BLKIF_OP_READ, 256, 0),                 /* 1 MiB, the most offered */
            REQ("hostile_indirect_op", BLKIF_OP_WRITE_BARRIER, 1, 0),       /* only READ or WRITE */
            REQ("hostile_indirect_nested", BLKIF_OP_INDIRECT, 1, 0),
            REQ("hostile_indirect_nseg0", BLKIF_OP_READ, 0, 0),
            REQ("hostile_indirect_nseg257", BLKIF_OP_READ, 257, 0),
            REQ("hostile_indirect_bad_page_gref", BLKIF_OP_READ, 1, 0, .nth = DESC_PAGE, .gref = 99999999),
            REQ("hostile_indirect_page_other_domain", BLKIF_OP_READ, 1, 0, .nth = DESC_PAGE, .gref = other),
            REQ("hostile_indirect_last8", BLKIF_OP_READ, 3, 0, .nth = 3, .last = 8),
            REQ("hostile_indirect_first_gt_last", BLKIF_OP_READ, 3, 0, .nth = 2, .first = 6, .last = 5),
            REQ("hostile_indirect_bad_seg_gref", BLKIF_OP_READ, 200, 0, .nth = 200, .gref = 99999999),
            REQ("hostile_indirect_read_into_ro", BLKIF_OP_READ, 2, 0, .nth = 2, .gref = ro),
            REQ("hostile_indirect_beyond_end", BLKIF_OP_READ, 256, info->sectors - 2047),  /* one sector past the end */
        };
        fill(bufs[4], seed, 16, 8);                    /* what indirect_write writes */
        send_indirect(dev, (grant_ref_t)good, ip, (grant_ref_t)ind, indirect, NCASES(indirect));
        /* FLUSH_DISKCACHE with data (a REQ_PREFLUSH write) and WRITE_BARRIER with data
         * (Linux blkback: a write with REQ_PREFLUSH after draining): the data is written too. */
        fill(bufs[4], seed, 24, 8);
        const struct req_case flush[] = { REQ("flush_with_data", BLKIF_OP_FLUSH_DISKCACHE, 1, 24, .nth = 1, .gref = wr) };
        send_direct(dev, (grant_ref_t)good, flush, 1);
        fill(bufs[4], seed, 32, 8);
        const struct req_case barrier[] = { REQ("barrier_with_data", BLKIF_OP_WRITE_BARRIER, 1, 32, .nth = 1, .gref = wr) };
        send_direct(dev, (grant_ref_t)good, barrier, 1);
        printk("result indirect_page_free %d\n", gnttab_end_access((grant_ref_t)ind));
        printk("result indirect_write_free %d\n", gnttab_end_access((grant_ref_t)wr));
    }
    const struct req_case last[] = {
        REQ("hostile_unknown_op", 200, 1, 0),
        /* The device still works after all that. */
        REQ("hostile_after", BLKIF_OP_READ, 1, 0),
    };
    send_direct(dev, (grant_ref_t)good, last, NCASES(last));
    printk("result hostile_grant_free %d\n", gnttab_end_access((grant_ref_t)good));
    gnttab_end_access((grant_ref_t)ro);
    gnttab_end_access((grant_ref_t)other);

    /* Ring-index violation: publish 1000 requests on a 32-slot ring. */
    dev->ring.sring->req_prod = dev->ring.req_prod_pvt + 1000;
    wmb();
    evtchn_send(dev->port);
    int st = xenbus_wait_for_state(dev->backend, XenbusStateClosing, 1, 10000000000UL);
    printk("result hostile_disconnect %d\n", st);
}

/* ------------------------------------------------- persistent grants (attacker) */
/* A second, writable mapping of our grant table: to rewrite an entry the backend holds. */
static volatile grant_entry_v1_t *grant_entries(void)
{
    xen_pfn_t frames[1];
    struct gnttab_setup_table setup = { .dom = DOMID_SELF, .nr_frames = 1 };
    set_xen_guest_handle(setup.frame_list, frames);
    if (HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &setup, 1) || setup.status)
        panic("setup_table");
    unsigned long va = alloc_va_hole();
    if (map_frame(va, frames[0], PTE_KERNEL_RW)) panic("map grant frame");
    return (volatile grant_entry_v1_t *)va;
}

static int one_seg(struct blkfront_dev *dev, u8 op, u64 sector, grant_ref_t g)
{
    blkif_request_t r;
    build_request(&r, dev, op, 1, sector, g);
    return raw_request(dev, &r);
}

/* The frontend wrote feature-persistent=1, so the backend keeps the grants it maps. A guest
 * may rewrite or revoke an entry the backend holds at any time: the backend must go on
 * using the frame it mapped (still ours, pinned by the mapping), never the new one, and
 * must release every persistent grant when the device disconnects. */
static void persistent_test(struct blkfront_dev *dev, u64 seed)
{
    volatile grant_entry_v1_t *e = grant_entries();
    u8 *p1 = bufs[0], *p2 = bufs[1];
    grant_ref_t g = (grant_ref_t)gnttab_grant_access(dev->backend_id, virt_to_mfn(p1), 0);
    fill(p1, seed, 0, 8);
    printk("result persist_write %d\n", one_seg(dev, BLKIF_OP_WRITE, 0, g));
    printk("result persist_held %d\n", (e[g].flags & (GTF_reading | GTF_writing)) != 0);
    /* Re-point the entry at p2 behind the backend's back, then read into "g". */
    memset(p1, 0, PAGE_SIZE);
    memset(p2, 0xaa, PAGE_SIZE);
    u32 frame = e[g].frame;
    e[g].frame = (u32)virt_to_mfn(p2);
    wmb();
    printk("result persist_read %d\n", one_seg(dev, BLKIF_OP_READ, 0, g));
    printk("result persist_read_original %u\n", check(p1, seed, 0, 8));
    unsigned untouched = 1;
    for (unsigned i = 0; i < PAGE_SIZE; i++) if (p2[i] != 0xaa) untouched = 0;
    printk("result persist_repointed_untouched %u\n", untouched);
    /* Revoke it (flags 0) and write from it: still p1's bytes that reach the disk. */
    u16 flags = e[g].flags;
    fill(p1, seed, 8, 8);
    e[g].flags = 0;
    wmb();
    printk("result persist_write_revoked %d\n", one_seg(dev, BLKIF_OP_WRITE, 8, g));
    e[g].frame = frame;
    e[g].flags = flags;
    wmb();
    /* The bound: three fresh grants in one request; only what fits stays mapped. */
    grant_ref_t h[3];
    blkif_request_t r;
    build_request(&r, dev, BLKIF_OP_READ, 3, 0, 0);
    for (unsigned i = 0; i < 3; i++) {
        h[i] = (grant_ref_t)gnttab_grant_access(dev->backend_id, virt_to_mfn(bufs[2 + i]), 0);
        r.seg[i].gref = h[i];
    }
    printk("result persist_three %d\n", raw_request(dev, &r));
    unsigned held = 0;
    for (unsigned i = 0; i < 3; i++) held += (e[h[i]].flags & (GTF_reading | GTF_writing)) != 0;
    printk("result persist_bound_held %u\n", held);
    /* Disconnect: the backend lets go of everything. */
    blkfront_shutdown(dev);
    unsigned still = (e[g].flags & (GTF_reading | GTF_writing)) != 0;
    for (unsigned i = 0; i < 3; i++) still += (e[h[i]].flags & (GTF_reading | GTF_writing)) != 0;
    printk("result persist_still_held_after_close %u\n", still);
    printk("result persist_end_access %d\n", gnttab_end_access(g));
}

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    char mode[16] = "rw", bench[16] = "seqread";
    cmdline_str(cmd, "mode", mode, sizeof(mode));
    cmdline_str(cmd, "bench", bench, sizeof(bench));
    u64 nsect = cmdline_u64(cmd, "sectors", 64);
    u64 seed = cmdline_u64(cmd, "pattern", 1);
    u64 start = cmdline_u64(cmd, "start", 0);
    unsigned depth = (unsigned)cmdline_u64(cmd, "depth", 8);
    unsigned bench_depth = depth > BLK_RING_SIZE ? BLK_RING_SIZE : depth;
    if (depth < 1) depth = bench_depth = 1;
    if (depth > MAX_DEPTH) depth = MAX_DEPTH;

    long rc = gnttab_init();
    if (rc) panic("gnttab_init: %ld", rc);
    rc = xenbus_init();
    if (rc) panic("xenbus_init: %ld", rc);
    u64 hotplug = cmdline_u64(cmd, "hotplug", 0);
    if (hotplug) {
        char node[32];
        u64 vdev = cmdline_u64(cmd, "vdev", 0);
        if (!vdev) panic("blk: hotplug= needs vdev=");
        snprintf(node, sizeof(node), "device/vbd/%lu", vdev);
        printk("blk: waiting for %s\n", node);
        rc = xenbus_wait_for_node(node, hotplug * 1000000000UL);
        if (rc) panic("blk: %s did not appear: %ld", node, rc);
    }
    if (!strcmp(mode, "persistent")) {
        /* Offer feature-persistent on every vbd before connecting (as Linux's blkfront). */
        char names[256], path[64];
        int n = xenbus_directory(XBT_NIL, "device/vbd", names, sizeof(names));
        const char *q = names;
        for (int i = 0; i < n; i++, q += strlen(q) + 1) {
            snprintf(path, sizeof(path), "device/vbd/%s/feature-persistent", q);
            if (xenbus_write(XBT_NIL, path, "1")) panic("write %s", path);
        }
    }
    struct blkfront_info info;
    struct blkfront_dev *dev = blkfront_init((unsigned)cmdline_u64(cmd, "vdev", 0), &info);
    if (!dev) panic("blkfront_init failed");
    printk("blk: sectors=%lu size=%u ro=%d\n", info.sectors, info.sector_size, info.readonly);

    struct pipe p;
    memset(&p, 0, sizeof(p));
    p.dev = dev;
    p.seed = seed;
    u64 errors = 0;

    if (!strcmp(mode, "rw") || !strcmp(mode, "ro")) {
        if (start + nsect > info.sectors) panic("sectors=%lu beyond the disk", nsect);
        u64 nreq = (nsect + CHUNK_SECT - 1) / CHUNK_SECT;
        struct linear lin = { start, CHUNK_SECT };
        u64 t0 = monotonic_ns();
        if (!strcmp(mode, "rw")) {
            p.op = BLKIF_OP_WRITE;
            if (run_pipe(&p, nreq, depth, linear_at, &lin, CHUNK_SECT, nsect)) panic("write pipeline");
            printk("result write %lu\n", p.ok_sectors);
            errors += p.errors;
            int st = blkfront_flush(dev);
            printk("result flush %d\n", st);
            if (st) errors++;
            if (cmdline_u64(cmd, "hold", 0)) {
                printk("result hold 1\n");
                for (;;) evtchn_poll(dev->port, monotonic_ns() + 1000000000UL);
            }
            if (nsect >= 32) {
                st = ordered(dev, seed, start);
                printk("result ordered %d\n", st);
                if (st) errors++;
            }
        } else {
            fill(bufs[0], seed ^ 0xdead, start, 1);
            int st = blkfront_write(dev, start, bufs[0], 1);
            printk("result ro_write %d\n", st);
            printk("result write 0\n");
        }
        read_start(&p, dev, seed);
        if (run_pipe(&p, nreq, depth, linear_at, &lin, CHUNK_SECT, nsect)) panic("read pipeline");
        u64 t1 = monotonic_ns();
        errors += p.errors;
        printk("result read_ok %lu\n", p.ok_sectors);
        printk("result errors %lu\n", errors);
        printk("result io_ns %lu\n", t1 - t0);
        if (cmdline_u64(cmd, "reconnect", 0)) {
            /* The frontend closes and starts over: the backend, Closed, goes back to
             * InitWait on the frontend's Initialising (Linux blkback frontend_changed). */
            blkfront_shutdown(dev);
            xenbus_switch_state(XBT_NIL, dev->nodename, XenbusStateInitialising);
            int st = xenbus_wait_for_state(dev->backend, XenbusStateInitWait, 1, 10000000000UL);
            printk("result reconnect_state %d\n", st);
            dev = blkfront_init((unsigned)cmdline_u64(cmd, "vdev", 0), &info);
            if (!dev) panic("blkfront_init (reconnect) failed");
            read_start(&p, dev, seed);
            if (run_pipe(&p, nreq, depth, linear_at, &lin, CHUNK_SECT, nsect)) panic("read pipeline (reconnect)");
            printk("result reconnect_read_ok %lu\n", p.errors ? 0 : p.ok_sectors);
        }
        if (!strcmp(mode, "ro") && cmdline_u64(cmd, "hold", 0)) {
            printk("result hold 1\n");
            for (;;) evtchn_poll(dev->port, monotonic_ns() + 1000000000UL);
        }
    } else if (!strcmp(mode, "bench")) {
        u64 ops = cmdline_u64(cmd, "ops", 1000);
        u64 span = cmdline_u64(cmd, "span", info.sectors);
        unsigned bs = (unsigned)cmdline_u64(cmd, "bs", 8);
        if (bs < 1 || bs > BLKIF_MAX_SEGMENTS_PER_REQUEST * 8) panic("bs=%u: want 1..88", bs);
        if (span > info.sectors) span = info.sectors;
        span -= span % bs;
        if (span < bs) panic("disk too small");
        int rnd = !strncmp(bench, "rand", 4);
        int wr = !strcmp(bench + (rnd ? 4 : 3), "write");
        struct bstate b = { 0, 0 };
        u64 t0 = monotonic_ns();
        int rc2 = bench_stream(dev, wr ? BLKIF_OP_WRITE : BLKIF_OP_READ, ops, bench_depth, bs, span,
                               rnd, seed, &b);
        u64 t1 = monotonic_ns();
        if (rc2) panic("bench pipeline: %d", rc2);
        if (wr && blkfront_flush(dev)) b.errors++;
        printk("result bench_ops %lu\n", b.done);
        printk("result errors %lu\n", b.errors);
        printk("result io_ns %lu\n", t1 - t0);
        printk("result notifications %lu\n", dev->notifications);
    } else if (!strcmp(mode, "discard")) {
        if (start + nsect > info.sectors) panic("sectors=%lu beyond the disk", nsect);
        u64 dstart = cmdline_u64(cmd, "dstart", nsect / 4);
        u64 dlen = cmdline_u64(cmd, "dlen", nsect / 2);
        discard_test(dev, &info, seed, start, nsect, dstart, dlen, depth);
    } else if (!strcmp(mode, "persistent")) {
        persistent_test(dev, seed);
        poweroff();
    } else if (!strcmp(mode, "hostile")) {
        hostile(dev, &info, seed);
        /* A second vbd keeps working. */
        char names[256];
        int n = xenbus_directory(XBT_NIL, "device/vbd", names, sizeof(names));
        int other_ok = -1;
        const char *q = names;
        for (int i = 0; i < n; i++, q += strlen(q) + 1) {
            long v;
            if (parse_long(q, &v) && v != dev->handle) {
                struct blkfront_info i2;
                struct blkfront_dev *d2 = blkfront_init((unsigned)v, &i2);
                other_ok = 0;
                if (d2) {
                    fill(bufs[3], seed, 0, 8);
                    int a = blkfront_write(d2, 0, bufs[3], 8);
                    memset(bufs[3], 0, PAGE_SIZE);
                    int b = blkfront_read(d2, 0, bufs[3], 8);
                    other_ok = !a && !b && check(bufs[3], seed, 0, 8) == 8;
                }
                break;
            }
        }
        printk("result other_ok %d\n", other_ok);
        poweroff();
    } else {
        panic("unknown mode %s", mode);
    }
    blkfront_shutdown(dev);
    poweroff();
}
