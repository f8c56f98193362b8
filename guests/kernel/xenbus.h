/* A xenstore client over the shared ring page (start_info store_mfn,
 * store_evtchn) and the frontend/backend state-machine helpers.
 * Synchronous: each call sends one request and waits for its reply; watch
 * events that arrive meanwhile are queued for xenbus_wait_event().
 * Errors are negative errno values (the XS_ERROR name mapped back: -ENOENT,
 * -EACCES, -EAGAIN, ...), -ETIMEDOUT (-110) if the server does not answer. */
#ifndef AIOVMM_XENBUS_H
#define AIOVMM_XENBUS_H

#include "os.h"
#include <xen/io/xs_wire.h>
#include <xen/io/xenbus.h>

typedef u32 xenbus_transaction_t;
#define XBT_NIL ((xenbus_transaction_t)0)

#define XENBUS_TIMEOUT_NS 10000000000UL

/* Map the ring, mask the store port (we poll it). 0 or -errno. */
int xenbus_init(void);
void xenbus_resume(void);      /* new store event channel after a suspend */

/* Value into buf (NUL-terminated, truncated to size-1); returns the full
 * value length or -errno. */
int xenbus_read(xenbus_transaction_t t, const char *path, char *buf, size_t size);
int xenbus_write(xenbus_transaction_t t, const char *path, const char *value);
/* `n` writes with one round trip (all requests sent, then all replies read);
 * 0 or the first failure. */
int xenbus_write_many(xenbus_transaction_t t, unsigned n, const char *const *paths,
                      const char *const *values);
int xenbus_mkdir(xenbus_transaction_t t, const char *path);
int xenbus_rm(xenbus_transaction_t t, const char *path);
/* Children as consecutive NUL-terminated names in buf; returns their count. */
int xenbus_directory(xenbus_transaction_t t, const char *path, char *buf, size_t size);
/* Read a decimal value (e.g. "domid", a state node). */
int xenbus_read_long(xenbus_transaction_t t, const char *path, long *out);
/* xenbus_init(), then our home "/local/domain/<domid>" into buf; panics on failure. */
void xenbus_init_home(char *buf, size_t size);
int xenbus_printf(xenbus_transaction_t t, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

int xenbus_watch(const char *path, const char *token);
int xenbus_unwatch(const char *path, const char *token);
/* Dequeue the next watch event (any token if token_filter is NULL); waits
 * until system time `deadline_ns` (0: XENBUS_TIMEOUT_NS from now).
 * Returns 0 or -ETIMEDOUT. */
int xenbus_wait_event(const char *token_filter, char *path, size_t path_size,
                      char *token, size_t token_size, u64 deadline_ns);
/* Drop queued events for a token. */
void xenbus_flush_events(const char *token);

int xenbus_transaction_start(xenbus_transaction_t *t);
/* Commit (abort = 0) or abort; -EAGAIN means a conflict: redo the whole
 * transaction. */
int xenbus_transaction_end(xenbus_transaction_t t, int abort);

/* ---- frontend/backend state machine (io/xenbus.h XenbusState) ---- */
/* Write "<dir>/state" = state. */
int xenbus_switch_state(xenbus_transaction_t t, const char *dir, XenbusState state);
/* Read "<dir>/state"; returns the state or -errno. */
int xenbus_read_state(const char *dir);
/* Watch "<otherend>/state" until it reads `want` (or, if any_later, any
 * state >= want); returns the last state read, or -errno/-ETIMEDOUT. */
int xenbus_wait_for_state(const char *otherend, XenbusState want, int any_later, u64 timeout_ns);

/* Wait until `node` exists (device hot-plug); 0 or -ETIMEDOUT/-errno. */
int xenbus_wait_for_node(const char *node, u64 timeout_ns);

#endif
