/* Attack: make its own page-table frames writable with update_va_mapping on
 * the VA of their (read-only) bootstrap mapping.
 * Xen: -EBUSY or -EINVAL (ABI §6.4, §6.6 rules 1-2), mapping stays read-only. */
#include "hostile.h"

static void attack(const char *name, unsigned long table_mfn)
{
    char key[64];
    void *va = mfn_virt(table_mfn);
    struct walk w;
    if (!va || pt_walk((unsigned long)va, &w)) panic("%s: table not in the bootstrap map", name);
    snprintf(key, sizeof(key), "pt_uvm_%s", name);
    result(key, HYPERVISOR_update_va_mapping((unsigned long)va,
                                             (table_mfn << PAGE_SHIFT) | PTE_KERNEL_RW,
                                             UVMF_INVLPG));
    u64 e = read_entry(w.mfn[1], L1_IDX((unsigned long)va));
    snprintf(key, sizeof(key), "pt_uvm_%s_entry_rw", name);
    result(key, (e & PTE_RW) != 0);
}

void app_main(void)
{
    hostile_traps_init();
    struct walk w;
    if (pt_walk((unsigned long)_text, &w)) panic("code not mapped");
    attack("l1", w.mfn[1]);
    attack("l2", w.mfn[2]);
    attack("l3", w.mfn[3]);
    attack("l4", w.mfn[4]);
    poweroff();
}
