/* Attack: an mmu_update batch of 3 whose middle entry is bad (maps a foreign
 * frame). Xen processes entries in order and stops at the first failure:
 * return -EINVAL (upstream: -EBUSY for a foreign RAM frame, see README),
 * *done_out += 1, entry 0 applied, entry 2 not (ABI §1.5, §6.2).
 * A second batch starts with *done_out = 5 to check that Xen adds. */
#include "hostile.h"

void app_main(void)
{
    hostile_traps_init();
    volatile u64 *a = alloc_page(), *b = alloc_page();
    volatile u64 *x = alloc_page(), *y = alloc_page();
    *x = 0xAAAA; *y = 0xBBBB;
    struct walk wa, wb;
    if (pt_walk((unsigned long)a, &wa) || pt_walk((unsigned long)b, &wb)) panic("not mapped");
    unsigned long bmfn = virt_to_mfn((void *)b);

    mmu_update_t req[3] = {
        { wa.ma[1], ((u64)virt_to_mfn((void *)x) << PAGE_SHIFT) | PTE_KERNEL_RW },
        { wb.ma[1], ((u64)foreign_mfn() << PAGE_SHIFT) | PTE_KERNEL_RW },
        { wb.ma[1], ((u64)virt_to_mfn((void *)y) << PAGE_SHIFT) | PTE_KERNEL_RW },
    };
    unsigned done = 0;
    long rc = HYPERVISOR_mmu_update(req, 3, &done, DOMID_SELF);
    result("batch", rc);
    result("batch_done", done);
    tlb_flush_local();                       /* L1 updates are not flushed by Xen */
    result("batch_first_applied", *a == 0xAAAA);
    result("batch_third_applied", *b == 0xBBBB);
    result("batch_b_entry_unchanged",
           ((read_entry(wb.mfn[1], L1_IDX((unsigned long)b)) & PTE_ADDR_MASK) >> PAGE_SHIFT) == bmfn);

    done = 5;
    rc = HYPERVISOR_mmu_update(req, 3, &done, DOMID_SELF);
    result("batch2", rc);
    result("batch2_done", done);

    /* The bad entry first: nothing is applied. */
    mmu_update_t req2[2] = { req[1], req[2] };
    done = 0;
    rc = HYPERVISOR_mmu_update(req2, 2, &done, DOMID_SELF);
    result("batch_first_bad", rc);
    result("batch_first_bad_done", done);
    tlb_flush_local();
    result("batch_first_bad_second_applied", *b == 0xBBBB);
    poweroff();
}
