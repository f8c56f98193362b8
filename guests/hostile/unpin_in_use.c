/* Attack: unpin tables that are not pinned, and unpin the active L4.
 *  - UNPIN of a data frame / a live but unpinned L1 -> -EINVAL
 *  - UNPIN of the active, builder-pinned L4 -> 0: it stays validated as
 *    long as it is the kernel root (CR3 holds a type reference), so the
 *    domain keeps running and can still update its mappings.
 * Xen: ABI §6.3 (UNPIN: not pinned -> -EINVAL), §6.6 rules 2-4. */
#include "hostile.h"

void app_main(void)
{
    hostile_traps_init();
    struct walk w;
    if (pt_walk((unsigned long)_text, &w)) panic("code not mapped");
    void *data = alloc_page();

    mmuext1_result("unpin_data", MMUEXT_UNPIN_TABLE, virt_to_mfn(data));
    mmuext1_result("unpin_l1_unpinned", MMUEXT_UNPIN_TABLE, w.mfn[1]);
    mmuext1_result("unpin_foreign", MMUEXT_UNPIN_TABLE, foreign_mfn());
    printk("about to unpin the active L4\n");
    mmuext1_result("unpin_active_l4", MMUEXT_UNPIN_TABLE, w.mfn[4]);
    result("still_running", 1);

    /* Tables still validated: a mapping update works, a bad one is refused,
     * and the L1 still cannot be made writable. */
    result("uvm_after_unpin", map_frame((unsigned long)data, virt_to_mfn(data), PTE_KERNEL_RW));
    result("uvm_bad_after_unpin", map_frame((unsigned long)data, foreign_mfn(), PTE_KERNEL_RW));
    void *l1va = mfn_virt(w.mfn[1]);
    result("l1_rw_after_unpin", map_frame((unsigned long)l1va, w.mfn[1], PTE_KERNEL_RW));
    *(volatile u64 *)data = 9;
    result("data_ok", *(volatile u64 *)data == 9);

    mmuext1_result("unpin_l4_again", MMUEXT_UNPIN_TABLE, w.mfn[4]);
    mmuext1_result("repin_l4", MMUEXT_PIN_L4_TABLE, w.mfn[4]);
    poweroff();
}
