#include "events.h"
#include "hypercall.h"
#include "console.h"

static evtchn_handler_t handlers[NR_EVTCHN_HANDLED];
unsigned long events_handled;

static inline void force_evtchn_callback(void)
{
    /* Any hypercall returns through Xen's event check. */
    HYPERVISOR_xen_version(XENVER_version, NULL);
}

void irq_disable(void)
{
    if (!HYPERVISOR_shared_info) return;
    vcpu0()->evtchn_upcall_mask = 1;
    barrier();
}

void irq_enable(void)
{
    if (!HYPERVISOR_shared_info) return;
    vcpu_info_t *v = vcpu0();
    barrier();
    v->evtchn_upcall_mask = 0;
    barrier();  /* unmask before checking pending (no lost wakeup) */
    if (ACCESS_ONCE(v->evtchn_upcall_pending))
        force_evtchn_callback();
}

int irq_save(void)
{
    if (!HYPERVISOR_shared_info) return 1;
    int old = vcpu0()->evtchn_upcall_mask;
    irq_disable();
    return old;
}

void irq_restore(int mask)
{
    if (mask) irq_disable(); else irq_enable();
}

static inline void sync_set_bit(unsigned long nr, volatile void *addr)
{ __asm__ volatile("lock btsq %1, %0" : "+m"(*(volatile long *)addr) : "Ir"(nr) : "memory"); }
static inline void sync_clear_bit(unsigned long nr, volatile void *addr)
{ __asm__ volatile("lock btrq %1, %0" : "+m"(*(volatile long *)addr) : "Ir"(nr) : "memory"); }

void mask_evtchn(evtchn_port_t port)
{
    sync_set_bit(port % 64, &HYPERVISOR_shared_info->evtchn_mask[port / 64]);
}

void clear_evtchn(evtchn_port_t port)
{
    sync_clear_bit(port % 64, &HYPERVISOR_shared_info->evtchn_pending[port / 64]);
}

long unmask_evtchn(evtchn_port_t port)
{
    struct evtchn_unmask op = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_unmask, &op);
}

void set_evtchn_handler(evtchn_port_t port, evtchn_handler_t h)
{
    if (port < NR_EVTCHN_HANDLED)
        handlers[port] = h;
}

long bind_virq(unsigned virq, unsigned vcpu, evtchn_handler_t h)
{
    struct evtchn_bind_virq op = { .virq = virq, .vcpu = vcpu };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_virq, &op);
    if (rc < 0) return rc;
    set_evtchn_handler(op.port, h);
    return op.port;
}

void evtchn_do_upcall(struct regs *regs)
{
    shared_info_t *s = HYPERVISOR_shared_info;
    vcpu_info_t *v = vcpu0();

    v->evtchn_upcall_pending = 0;
    barrier();
    unsigned long sel = __atomic_exchange_n(&v->evtchn_pending_sel, 0UL, __ATOMIC_SEQ_CST);
    while (sel) {
        unsigned i = __builtin_ctzl(sel);
        sel &= sel - 1;
        for (;;) {
            unsigned long w = ACCESS_ONCE(s->evtchn_pending[i]) & ~ACCESS_ONCE(s->evtchn_mask[i]);
            if (!w) break;
            evtchn_port_t port = i * 64 + __builtin_ctzl(w);
            clear_evtchn(port);
            events_handled++;
            if (port < NR_EVTCHN_HANDLED && handlers[port])
                handlers[port](port, regs);
            else {
                mask_evtchn(port);   /* nobody wants it: silence it */
                printk("event: unhandled port %u\n", port);
            }
        }
    }
}

long evtchn_alloc_unbound(domid_t remote)
{
    struct evtchn_alloc_unbound op = { .dom = DOMID_SELF, .remote_dom = remote };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &op);
    return rc < 0 ? rc : (long)op.port;
}

long evtchn_bind_interdomain(domid_t remote, evtchn_port_t remote_port)
{
    struct evtchn_bind_interdomain op = { .remote_dom = remote, .remote_port = remote_port };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_interdomain, &op);
    return rc < 0 ? rc : (long)op.local_port;
}

long evtchn_send(evtchn_port_t port)
{
    struct evtchn_send op = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_send, &op);
}

long evtchn_close(evtchn_port_t port)
{
    struct evtchn_close op = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_close, &op);
}

long evtchn_poll(evtchn_port_t port, u64 timeout_ns)
{
    struct sched_poll p = { .nr_ports = 1, .timeout = timeout_ns };
    set_xen_guest_handle(p.ports, &port);
    return HYPERVISOR_sched_op(SCHEDOP_poll, &p);
}
