/* Xen's cooperative suspend, guest side (as Linux's manage.c/xen_suspend and
 * mini-os's kernel_suspend): acknowledge control/shutdown by clearing it,
 * unmap shared_info (a save refuses page tables that map frames outside the
 * guest's P2M), SCHEDOP_shutdown(SHUTDOWN_suspend) with the start_info MFN in
 * RDX, then re-map shared_info from start_info and re-init what lives on
 * event channels. The grant table's frames are unmapped too and mapped
 * again on resume (gnttab.c rebuilds the entries in a new domain); the
 * resume hook reconnects the frontends (netfront_resume, blkfront_resume). */
#include "suspend.h"
#include "hypercall.h"
#include "xenbus.h"
#include "console.h"
#include "events.h"
#include "mm.h"
#include "lib.h"
#include "sched.h"
#include "time.h"
#include "gnttab.h"

#define TOKEN "suspend"

static void (*hook)(void);
unsigned long bad_start_info;     /* test guests: pass this MFN instead (must be refused) */
int refuse_suspend;               /* test guests: acknowledge a request, then do not suspend */
unsigned long suspend_delay_ms;   /* test guests: this long between the acknowledgement and the
                                   * suspend, the rings not read (Linux's freezer and device
                                   * suspend take that time while its rx ring keeps filling) */

int suspend_init(void (*resume_hook)(void))
{
    hook = resume_hook;
    return xenbus_watch("control/shutdown", TOKEN);
}

long do_suspend(void)
{
    struct sched_shutdown sd = { .reason = SHUTDOWN_suspend };
    int mask = irq_save();
    console_flush();
    long rc = HYPERVISOR_update_va_mapping((unsigned long)HYPERVISOR_shared_info, 0, UVMF_INVLPG);
    if (rc) panic("suspend: unmapping shared_info failed: %ld", rc);
    rc = gnttab_suspend();
    if (rc) panic("suspend: unmapping the grant table failed: %ld", rc);
    /* The toolstack finds the store and console pages by PFN (as Linux's
     * xen_pre_suspend leaves them); the new side writes its MFNs back. */
    start_info->store_mfn = mfn_to_pfn(start_info->store_mfn);
    start_info->console.domU.mfn = mfn_to_pfn(start_info->console.domU.mfn);
    rc = _hypercall3(__HYPERVISOR_sched_op, SCHEDOP_shutdown, &sd, virt_to_mfn((void *)start_info));
    if (rc) {                         /* cancelled: the same domain, MFNs unchanged */
        start_info->store_mfn = pfn_to_mfn(start_info->store_mfn);
        start_info->console.domU.mfn = pfn_to_mfn(start_info->console.domU.mfn);
    }
    map_shared_info();
    long g = gnttab_resume(rc == 0);
    if (g) panic("suspend: mapping the grant table again failed: %ld", g);
    if (rc == 0) {                    /* a new domain: new event channels */
        console_resume();
        xenbus_resume();
        /* The frontends first: each round trip before their reconnect is
         * downtime their peers see. The watch fires once when set, so a
         * request written in between is not missed. */
        if (hook) hook();
        if (xenbus_watch("control/shutdown", TOKEN))
            panic("suspend: watch after resume failed");
    }
    irq_restore(mask);
    return rc;
}

int suspend_check(u64 deadline_ns)
{
    char path[128], token[32], val[32];
    for (;;) {
        int rc = xenbus_wait_event(TOKEN, path, sizeof(path), token, sizeof(token),
                                   deadline_ns ? deadline_ns : monotonic_ns() + 1UL);
        if (rc) return -1;
        rc = xenbus_read(XBT_NIL, "control/shutdown", val, sizeof(val));
        if (rc < 0 || strcmp(val, "suspend"))
            continue;
        xenbus_write(XBT_NIL, "control/shutdown", "");
        if (refuse_suspend) {         /* as Linux when its freezer gives up: acked, not done */
            printk("suspend: acknowledged, refused\n");
            return -1;
        }
        if (bad_start_info) {         /* hostile test: a start_info frame not ours */
            struct sched_shutdown sd = { .reason = SHUTDOWN_suspend };
            long r = _hypercall3(__HYPERVISOR_sched_op, SCHEDOP_shutdown, &sd, bad_start_info);
            printk("suspend: bad start_info 0x%lx rc=%ld\n", bad_start_info, r);
            return -1;
        }
        if (suspend_delay_ms) {
            u64 until = monotonic_ns() + suspend_delay_ms * 1000000UL;
            while (monotonic_ns() < until)
                ;
        }
        long r = do_suspend();
        printk("suspend: resumed rc=%ld\n", r);
        return (int)r;
    }
}
