/* Attack: make its own page-table frames writable with mmu_update, by
 * rewriting the (read-only) bootstrap L1 entry that maps each table frame.
 * Xen: the frame already has an L1/L2/L3/L4 type, so it cannot take the
 * writable type: -EBUSY or -EINVAL (ABI §6.6 rules 1-2), entry unchanged. */
#include "hostile.h"

static void attack(const char *name, unsigned long table_mfn)
{
    char key[64];
    void *va = mfn_virt(table_mfn);
    struct walk w;
    if (!va || pt_walk((unsigned long)va, &w)) panic("%s: table not in the bootstrap map", name);
    unsigned done = 0;
    snprintf(key, sizeof(key), "pt_rw_%s", name);
    long rc = mmu1(w.ma[1], (table_mfn << PAGE_SHIFT) | PTE_KERNEL_RW, &done);
    result_done(key, rc, done);
    tlb_flush_local();
    u64 e = read_entry(w.mfn[1], L1_IDX((unsigned long)va));
    snprintf(key, sizeof(key), "pt_rw_%s_entry_rw", name);
    result(key, (e & PTE_RW) != 0);
}

void app_main(void)
{
    hostile_traps_init();
    struct walk w;
    if (pt_walk((unsigned long)_text, &w)) panic("code not mapped");
    attack("l1", w.mfn[1]);     /* the L1 that maps its own code */
    attack("l2", w.mfn[2]);
    attack("l3", w.mfn[3]);
    attack("l4", w.mfn[4]);
    poweroff();
}
