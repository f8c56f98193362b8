/* Attack (found by the stateful grant/MMU fuzzer): an L1 table whose own entry
 * maps the table itself writable. The guest writes that entry into a fresh page
 * while it is still a plain data page, makes the page read-only, then asks for it
 * to become an L1 (PIN_L1_TABLE; then as an L2 entry). While validating, Xen has
 * already typed the frame as an L1 (type set, not yet validated), so the RW self
 * entry cannot get PGT_writable_page: promote_l1_table fails, -EBUSY, and the frame
 * stays a plain page. Had it been accepted, the table would be writable through
 * its own entry: any PTE, any frame. The guest checks that too: if the pin
 * succeeds it hooks the table into its L2 and tries to plant a PTE to a foreign
 * frame through the self mapping (`self_map_writable`). A read-only self entry
 * is allowed (control). */
#include "hostile.h"

void app_main(void)
{
    hostile_traps_init();
    u64 *t = alloc_page();
    unsigned long tmfn = virt_to_mfn(t);
    t[3] = (tmfn << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D;
    if (make_readonly(t)) panic("make_readonly");
    unsigned slot = free_l2_slot();
    u64 l2e = entry_ma(kernel_l2_mfn(), slot);
    unsigned long base = (VIRT_BASE & ~((1UL << 30) - 1)) + ((unsigned long)slot << 21);

    unsigned done = 0;
    long rc = mmuext1(MMUEXT_PIN_L1_TABLE, tmfn, 0, &done);
    result_done("pin_self_rw", rc, done);
    done = 0;
    long rc2 = mmu1(l2e, (tmfn << PAGE_SHIFT) | PTE_TABLE, &done);
    result_done("hook_self_rw", rc2, done);
    if (rc == 0 || rc2 == 0) {
        if (rc2 != 0) mmu1(l2e, (tmfn << PAGE_SHIFT) | PTE_TABLE, NULL);
        volatile u64 *self = (volatile u64 *)(base + 3 * PAGE_SIZE);
        trap_clear();
        probe_store64(&self[4], (foreign_mfn() << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US | PTE_A);
        result("self_map_writable", trap_vec == -1);
        poweroff();
    }
    result("still_plain_page", read_entry(kernel_l2_mfn(), slot) == 0);
    /* Control: the same table with the self entry read-only. */
    done = 0;
    rc = mmu1(entry_ma(tmfn, 3), (tmfn << PAGE_SHIFT) | PTE_P | PTE_US | PTE_A, &done);
    result_done("self_ro_store", rc, done);
    done = 0;
    rc = mmu1(l2e, (tmfn << PAGE_SHIFT) | PTE_TABLE, &done);
    result_done("hook_self_ro", rc, done);
    volatile u64 *self = (volatile u64 *)(base + 3 * PAGE_SIZE);
    trap_clear();
    u64 v = probe_load64(&self[3]);
    result("self_ro_readable", trap_vec == -1 && (v >> PAGE_SHIFT & 0xFFFFFFFFFUL) == tmfn);
    trap_clear();
    probe_store64(&self[4], 0);
    result_trap("self_ro_store_trap");
    result("unhook", mmu1(l2e, 0, NULL));
    poweroff();
}
