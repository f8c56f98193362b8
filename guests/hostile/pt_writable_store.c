/* Attack: an ordinary store into the read-only mapping of its own L1 table,
 * changing the entry of a scratch page to map a frame it does not own.
 * Xen: the store is trapped by writable-page-table emulation (ABI §6.6 rule
 * 10), the new entry fails validation (rule 6) and the #PF is bounced to the
 * guest (or the domain is crashed); the entry is unchanged. A legal store
 * (same frame, read-only) is emulated and takes effect without a fault. */
#include "hostile.h"

void app_main(void)
{
    hostile_traps_init();
    void *scratch = alloc_page();
    unsigned long va = (unsigned long)scratch;
    struct walk w;
    if (pt_walk(va, &w)) panic("scratch page not mapped");
    u64 *l1 = mfn_virt(w.mfn[1]);
    if (!l1) panic("L1 not in the bootstrap map");
    volatile u64 *slot = &l1[L1_IDX(va)];
    *(volatile u64 *)scratch = 0x5ca7c4;                /* marks its own frame */
    u64 before = *slot;
    unsigned long own = virt_to_mfn(scratch);

    printk("about to store a foreign frame into the L1 at %p\n", (void *)slot);
    trap_clear();
    probe_store64(slot, (foreign_mfn() << PAGE_SHIFT) | PTE_KERNEL_RW);
    result_trap("pt_store_trap");
    if (trap_vec == 14) {
        printk("result pt_store_err 0x%lx\n", trap_err);
        result("pt_store_cr2_ok", trap_cr2 == (u64)slot);
    }
    result("pt_store_changed", *slot != before);
    if (*slot != before) {
        printk("result pt_store_entry 0x%lx\n", *slot);
        /* Is the foreign frame now really mapped? (read only, never write) */
        tlb_flush_local();
        trap_clear();
        u64 v = probe_load64(scratch);
        result_trap("pt_store_foreign_read_trap");
        result("pt_store_reads_own_frame", v == 0x5ca7c4);
    }

    /* Control: a legal store (same frame, read-only) must be emulated. */
    trap_clear();
    probe_store64(slot, (own << PAGE_SHIFT) | PTE_KERNEL_RO);
    result_trap("pt_store_legal_trap");
    u64 after = *slot;
    result("pt_store_legal_changed", after != before);
    result("pt_store_legal_rw", (after & PTE_RW) != 0);
    /* Restore the writable mapping. */
    long rc = map_frame(va, own, PTE_KERNEL_RW);
    result("restore", rc);

    /* Control: a store to a read-only data page must fault (#PF). */
    void *ro = alloc_page();
    if ((rc = make_readonly(ro))) panic("make_readonly failed: %ld", rc);
    trap_clear();
    probe_store64(ro, 1);
    result_trap("ro_data_store_trap");
    result("ro_data_changed", *(volatile u64 *)ro != 0);
    poweroff();
}
