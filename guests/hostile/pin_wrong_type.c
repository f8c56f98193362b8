/* Attack: pin frames as the wrong table type.
 *  - PIN_L1 on a data frame mapped writable   -> error (type conflict)
 *  - PIN_L2 on a live bootstrap L1            -> error (type conflict)
 *  - PIN_L4 on the active L4 (already pinned by the builder) -> -EINVAL
 *  - PIN_L1 on a fresh read-only zero page    -> 0, again -> -EINVAL
 *  - PIN_L1 on a foreign frame                -> -EINVAL
 * Xen: ABI §6.3 (pin semantics), §6.6 rules 1-4. */
#include "hostile.h"

void app_main(void)
{
    hostile_traps_init();
    struct walk w;
    if (pt_walk((unsigned long)_text, &w)) panic("code not mapped");

    void *data = alloc_page();
    mmuext1_result("pin_l1_writable_data", MMUEXT_PIN_L1_TABLE, virt_to_mfn(data));
    mmuext1_result("pin_l2_on_l1", MMUEXT_PIN_L2_TABLE, w.mfn[1]);
    mmuext1_result("pin_l3_on_l2", MMUEXT_PIN_L3_TABLE, w.mfn[2]);
    mmuext1_result("pin_l1_on_l4", MMUEXT_PIN_L1_TABLE, w.mfn[4]);
    mmuext1_result("pin_l4_twice", MMUEXT_PIN_L4_TABLE, w.mfn[4]);
    mmuext1_result("pin_l1_foreign", MMUEXT_PIN_L1_TABLE, foreign_mfn());

    void *fresh = alloc_page();
    long rc = make_readonly(fresh);
    if (rc) panic("make_readonly failed: %ld", rc);
    mmuext1_result("pin_l1_fresh", MMUEXT_PIN_L1_TABLE, virt_to_mfn(fresh));
    mmuext1_result("pin_l1_fresh_again", MMUEXT_PIN_L1_TABLE, virt_to_mfn(fresh));
    mmuext1_result("pin_l2_on_pinned_l1", MMUEXT_PIN_L2_TABLE, virt_to_mfn(fresh));
    /* While pinned as an L1 it cannot be made writable. */
    result("map_pinned_l1_rw", map_frame((unsigned long)fresh, virt_to_mfn(fresh), PTE_KERNEL_RW));
    mmuext1_result("unpin_fresh", MMUEXT_UNPIN_TABLE, virt_to_mfn(fresh));
    result("map_unpinned_rw", map_frame((unsigned long)fresh, virt_to_mfn(fresh), PTE_KERNEL_RW));

    /* The data page is still usable. */
    *(volatile u64 *)data = 7;
    result("data_writable", *(volatile u64 *)data == 7);
    poweroff();
}
