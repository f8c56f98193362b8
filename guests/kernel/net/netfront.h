/* netfront: the Xen PV network frontend (io/netif.h), one queue, rx-copy.
 *
 * The caller has run xenbus_init() and gnttab_init(). The driver uses no
 * upcall handler: its event channel stays masked and netfront_wait() blocks
 * in SCHEDOP_poll, so it works with or without traps_init().
 * Not re-entrant: call everything from one context. */
#ifndef AIOVMM_NET_NETFRONT_H
#define AIOVMM_NET_NETFRONT_H

#include "os.h"

struct netfront_stats {
    u64 rx, tx;            /* frames delivered / queued to the backend */
    u64 rx_err;            /* rx responses with status <= 0 (backend dropped or failed) */
    u64 rx_bad;            /* malformed rx responses: bad offset/length/id, unexpected
                            * multi-slot packets or extra-info slots */
    u64 tx_err;            /* tx responses with a non-OKAY status */
    u64 tx_full;           /* xmit refused: no free tx slot, or bad length */
    u64 bogus;             /* impossible producer indices from the backend */
    u64 notify;            /* event channel notifications sent */
};

struct netfront;

/* Rx callback: one frame (valid only during the call). `flags` has
 * NET_RX_CSUM_VALID (net/ip.h) when the backend says the L4 checksum was
 * validated or left blank by a local sender. */
typedef void (*netfront_rx_t)(void *arg, const void *frame, int len, unsigned flags);

/* Connect to the backend of `nodename` (e.g. "device/vif/0"): reads
 * backend, backend-id and mac; sets up the rings, grants and event channel;
 * publishes them in one transaction; walks the XenbusState handshake.
 * Returns NULL on failure after printing a `net: ...` line. */
struct netfront *netfront_init(const char *nodename);
void netfront_mac(const struct netfront *nf, u8 mac[6]);
/* Queue one frame (14..PAGE_SIZE bytes); 0, or -1 if refused (counted). */
int netfront_xmit(struct netfront *nf, const void *frame, int len);
/* Tx requests that can be queued now without refusal (reclaims completed
 * ones first); TX ring size (256) when every sent frame was answered. */
int netfront_tx_space(struct netfront *nf);
/* Drain both rings (tx completions and received frames, re-posting rx
 * buffers); returns the number of frames delivered to `rx`. */
int netfront_poll(struct netfront *nf, netfront_rx_t rx, void *arg);
/* Block until the backend signals or until system time `deadline_ns`
 * (0 = no deadline). Returns at once if work is already pending. */
void netfront_wait(struct netfront *nf, u64 deadline_ns);
/* After a resume in a new domain (suspend hook): reconnect to the new
 * backend with the same grants (rings reset). 0, or -1 (device dead). */
int netfront_resume(struct netfront *nf);
/* Closing -> Closed handshake, revoke grants. */
void netfront_shutdown(struct netfront *nf);
const struct netfront_stats *netfront_stats(const struct netfront *nf);

#endif
