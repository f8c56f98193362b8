/* blkfront: the guest end of a Xen vbd (io/blkif.h, one-page ring of 32
 * slots), Mini-OS-shaped but with Linux's handshake order.
 *
 * Needs gnttab_init() and xenbus_init() first. The event channel is kept
 * masked and polled (SCHEDOP_poll), like the xenstore client.
 *
 * Synchronous use: blkfront_io(dev, BLKIF_OP_WRITE, sector, buf, nsect).
 * Asynchronous use (several requests in flight): blkfront_submit() each,
 * blkfront_push() once, then blkfront_reap()/blkfront_wait() for the
 * completions (each reported once through the callback with the caller's
 * tag and the BLKIF_RSP_* status). */
#ifndef AIOVMM_BLKFRONT_H
#define AIOVMM_BLKFRONT_H

#include "os.h"
#ifndef xen_mb
#define xen_mb()  mb()
#define xen_rmb() rmb()
#define xen_wmb() wmb()
#endif
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#include <xen/io/blkif.h>

#define BLK_SECTOR 512
#define BLK_RING_SIZE __CONST_RING_SIZE(blkif, PAGE_SIZE)   /* 32 */

struct blkfront_info {
    u64 sectors;            /* in 512-byte units */
    unsigned sector_size;
    int readonly;           /* mode != "w" or info & VDISK_READONLY */
    unsigned info;          /* VDISK_* */
    int flush;              /* feature-flush-cache */
    int barrier;            /* feature-barrier */
    int discard;            /* feature-discard */
    unsigned discard_granularity;   /* bytes (default: sector-size) */
    unsigned discard_alignment;     /* bytes (default 0) */
};

typedef void (*blkfront_cb_t)(u64 tag, int status, void *arg);

struct blkfront_slot {
    int in_use;
    u64 tag;
    unsigned nr_grefs;
    grant_ref_t grefs[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};

struct blkfront_dev {
    char nodename[64];              /* device/vbd/<devid> */
    char backend[128];
    domid_t backend_id;
    u16 handle;                     /* devid */
    evtchn_port_t port;
    grant_ref_t ring_ref;
    blkif_front_ring_t ring;
    struct blkfront_info info;
    struct blkfront_slot slots[BLK_RING_SIZE];
    unsigned free_slots[BLK_RING_SIZE];
    unsigned nr_free;
    unsigned inflight;
    u64 notifications;              /* evtchn_send calls */
    u64 bad_responses;              /* unknown ids from the backend */
};

/* Connect vbd `devid` (0: the first one in device/vbd). NULL on failure
 * (the reason is printed). */
struct blkfront_dev *blkfront_init(unsigned devid, struct blkfront_info *info);
/* After a resume in a new domain (suspend hook): reconnect to the new
 * backend; unanswered requests are issued again. 0 or -1. */
int blkfront_resume(struct blkfront_dev *dev);
/* Closing -> wait for the backend -> Closed; frees the ring's grant. */
void blkfront_shutdown(struct blkfront_dev *dev);

/* One segment: `nsect` 512-byte sectors at `buf` (512-aligned, inside one
 * page of the kernel's linear mapping). */
struct blk_seg { void *buf; unsigned nsect; };

/* Queue a request (not yet visible to the backend: see blkfront_push).
 * READ/WRITE/WRITE_BARRIER take 1..11 segments; FLUSH_DISKCACHE none.
 * Returns 0, or -1 if the ring is full (reap first), -2 on bad arguments,
 * -3 if the grant table is full. */
int blkfront_submit(struct blkfront_dev *dev, u8 op, u64 sector,
                    const struct blk_seg *segs, unsigned nseg, u64 tag);
/* Queue a BLKIF_OP_DISCARD of `nsect` sectors (no data pages). Same returns;
 * -2 if the backend did not offer feature-discard. */
int blkfront_submit_discard(struct blkfront_dev *dev, u64 sector, u64 nsect, u64 tag);
/* Same, for a contiguous (512-aligned) buffer of up to 11 pages' worth. */
int blkfront_submit_buf(struct blkfront_dev *dev, u8 op, u64 sector, void *buf,
                        unsigned nsect, u64 tag);
/* Publish queued requests; notifies the backend if it asked (event index). */
void blkfront_push(struct blkfront_dev *dev);
/* Consume available responses (callback per completion); returns how many. */
int blkfront_reap(struct blkfront_dev *dev, blkfront_cb_t cb, void *arg);
/* Reap, blocking until at least one completion or `deadline_ns` (system
 * time; 0 = 10 s from now). Returns completions or -110 on timeout. */
int blkfront_wait(struct blkfront_dev *dev, blkfront_cb_t cb, void *arg, u64 deadline_ns);

/* Synchronous helpers: split into requests of up to 11 pages, wait for all.
 * Return 0 or the first non-zero BLKIF_RSP_* status (or -110 timeout). */
int blkfront_io(struct blkfront_dev *dev, u8 op, u64 sector, void *buf, u64 nsect);
int blkfront_read(struct blkfront_dev *dev, u64 sector, void *buf, u64 nsect);
int blkfront_write(struct blkfront_dev *dev, u64 sector, const void *buf, u64 nsect);
int blkfront_flush(struct blkfront_dev *dev);
int blkfront_discard(struct blkfront_dev *dev, u64 sector, u64 nsect);

#endif
