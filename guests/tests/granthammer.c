/* Grant-revoke hammer for the locked-pin test (tests/test_kvm_vthread.py): the guest
 * grants a page to domid 0, prints its ref, then for secs=<n> seconds revokes the entry
 * (gnttab_end_access: cmpxchg of the flags to 0, refused while GTF_reading/GTF_writing
 * is set) and re-grants it, while the host pins and unpins it as fast as it can. After a
 * successful revoke the entry must stay 0 until the guest grants it again: a host that
 * checks the entry and then writes GTF_reading with a plain store brings a revoked entry
 * back (Xen's _set_status_v1 is a cmpxchg on flags+domid for exactly this). */
#include "os.h"
#include "console.h"
#include "gnttab.h"
#include "lib.h"
#include "mm.h"
#include "sched.h"
#include "time.h"

void app_main(void)
{
    u64 secs = cmdline_u64((const char *)start_info->cmd_line, "secs", 2);
    long rc = gnttab_init();
    if (rc) panic("gnttab_init failed: %ld", rc);
    void *page = alloc_page();
    long ref = gnttab_grant_access(0, virt_to_mfn(page), 0);
    u64 revoked = 0, busy = 0, resurrected = 0;
    u64 end = monotonic_ns() + secs * 1000000000UL;
    printk("granthammer: ready ref=%ld\n", ref);
    volatile u16 *flags = &gnttab_entry(ref)->flags;
    for (;;) {
        for (int i = 0; i < 1024; i++) {
            u16 f = GTF_permit_access;
            /* gnttab_end_access's revoke, without its ref bookkeeping (whose M2P lookup
             * at the re-grant costs an emulated read on the KVM engine) */
            if (!__atomic_compare_exchange_n(flags, &f, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
                busy++;                             /* pinned by the host: try again */
                continue;
            }
            revoked++;
            for (int j = 0; j < 64; j++)
                if (*flags) {
                    resurrected++;                  /* a revoked entry came back */
                    break;
                }
            /* a host pin that resurrected it is undone by its unpin: wait for that */
            while (*flags & (GTF_reading | GTF_writing))
                ;
            *flags = GTF_permit_access;             /* granted again (domid, frame kept) */
            for (int j = 0; j < 2000; j++)          /* long enough for the host to pin it */
                __asm__ volatile("pause");
        }
        if (monotonic_ns() >= end)
            break;
    }
    printk("granthammer: done revoked=%lu busy=%lu resurrected=%lu\n", revoked, busy, resurrected);
    poweroff();
}
