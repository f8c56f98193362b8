/* Attack: batch hypercalls with enormous counts.
 *  - mmu_update / mmuext_op / multicall with count 0x7fffffff and a bad
 *    pointer (unmapped 0x1000, non-canonical)   -> -EFAULT (or -EINVAL)
 *  - mmu_update with count 0xffffffff over one page of valid
 *    MMU_MACHPHYS_UPDATE entries followed by an unmapped guard page
 *    -> the 256 entries are done, then -EFAULT at the guard page (upstream
 *    Xen may also refuse the whole range up front in guest_handle_okay:
 *    -EFAULT, done 0); with count 300 upstream gives -EFAULT, done 256
 * Xen: never a hang (long batches are preempted and continued), ABI §1.4,
 * §1.5, §6.2. */
#include "hostile.h"

static char area[2 * PAGE_SIZE] __attribute__((aligned(PAGE_SIZE), section(".bss.page_aligned")));

void app_main(void)
{
    hostile_traps_init();
    RESULT_DONE("mmu_huge_badptr", HYPERVISOR_mmu_update((mmu_update_t *)0x1000, 0x7fffffff, &done, DOMID_SELF));
    RESULT_DONE("mmu_huge_noncanon", HYPERVISOR_mmu_update((mmu_update_t *)0x8000000000000000UL, 0x7fffffff, &done, DOMID_SELF));
    RESULT_DONE("mmu_max_badptr", HYPERVISOR_mmu_update((mmu_update_t *)0x1000, 0xffffffffu, &done, DOMID_SELF));
    RESULT_DONE("mmuext_huge_badptr", HYPERVISOR_mmuext_op((struct mmuext_op *)0x1000, 0x7fffffff, &done, DOMID_SELF));
    result("multicall_huge_badptr", HYPERVISOR_multicall((void *)0x1000, 0x7fffffff));
    RESULT_DONE("mmu_zero_count", HYPERVISOR_mmu_update((mmu_update_t *)0x1000, 0, &done, DOMID_SELF));

    /* One page of valid entries, then a guard page. */
    long rc = unmap_page((unsigned long)area + PAGE_SIZE);
    if (rc) panic("unmap guard: %ld", rc);
    mmu_update_t *req = (mmu_update_t *)area;
    unsigned n = PAGE_SIZE / sizeof(*req);
    for (unsigned i = 0; i < n; i++) {
        unsigned long pfn = virt_to_pfn(area);    /* the same harmless entry */
        req[i].ptr = ((u64)pfn_to_mfn(pfn) << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE;
        req[i].val = pfn;
    }
    printk("about to run a 0xffffffff-entry batch over %u valid entries\n", n);
    RESULT_DONE("mmu_huge_guarded", HYPERVISOR_mmu_update(req, 0xffffffffu, &done, DOMID_SELF));
    RESULT_DONE("mmu_guarded_300", HYPERVISOR_mmu_update(req, 300, &done, DOMID_SELF));
    RESULT_DONE("mmu_huge_guarded_7fff", HYPERVISOR_mmu_update(req, 0x7fffffff, &done, DOMID_SELF));
    /* A bad done pointer with a valid one-entry batch. */
    result("mmu_bad_done_ptr", HYPERVISOR_mmu_update(req, 1, (unsigned *)0x1000, DOMID_SELF));
    result("still_running", 1);
    poweroff();
}
