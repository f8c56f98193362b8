/* Event channels (2-level ABI) and the virtual interrupt flag. */
#ifndef AIOVMM_EVENTS_H
#define AIOVMM_EVENTS_H

#include "os.h"
#include "traps.h"
#include <xen/event_channel.h>

typedef void (*evtchn_handler_t)(evtchn_port_t port, struct regs *regs);

#define NR_EVTCHN_HANDLED 1024

/* Virtual CLI/STI via vcpu_info.evtchn_upcall_mask (no-ops before
 * shared_info is mapped). irq_enable() delivers anything pending. */
void irq_disable(void);
void irq_enable(void);
int irq_save(void);              /* returns the old mask and masks */
void irq_restore(int mask);

/* EVTCHNOP_bind_virq on `vcpu`; returns the port or a negative errno. */
long bind_virq(unsigned virq, unsigned vcpu, evtchn_handler_t h);
void set_evtchn_handler(evtchn_port_t port, evtchn_handler_t h);
long unmask_evtchn(evtchn_port_t port);   /* EVTCHNOP_unmask */
void mask_evtchn(evtchn_port_t port);     /* local mask bit */
void clear_evtchn(evtchn_port_t port);    /* clear pending bit */

/* Interdomain channels; each returns the port or a negative errno. */
long evtchn_alloc_unbound(domid_t remote);
long evtchn_bind_interdomain(domid_t remote, evtchn_port_t remote_port);
long evtchn_send(evtchn_port_t port);
long evtchn_close(evtchn_port_t port);
static inline int evtchn_is_pending(evtchn_port_t port)
{
    return (ACCESS_ONCE(HYPERVISOR_shared_info->evtchn_pending[port / 64]) >> (port % 64)) & 1;
}
/* SCHEDOP_poll on one port: block until it is pending or until system time
 * `timeout_ns` (0 = no timeout). Does not clear the pending bit. Works with
 * the port masked (the usual way to wait without an upcall handler). */
long evtchn_poll(evtchn_port_t port, u64 timeout_ns);

/* Called from the event-callback entry with events masked. */
void evtchn_do_upcall(struct regs *regs);

extern unsigned long events_handled;

#endif
