/* Attack: write to the read-only M2P at 0xFFFF800000000000 with a store, and
 * update M2P entries of frames it does not own with MMU_MACHPHYS_UPDATE.
 * Xen: the M2P is mapped read-only (ABI §6.7): the store gets a #PF bounced
 * to the guest (handler records and skips); MACHPHYS_UPDATE of a foreign
 * frame -> -EINVAL (§6.2); of an own frame -> 0 (control). */
#include "hostile.h"

void app_main(void)
{
    hostile_traps_init();
    void *page = alloc_page();
    unsigned long mfn = virt_to_mfn(page), pfn = virt_to_pfn(page);
    volatile u64 *m2p = (volatile u64 *)M2P_VA;

    trap_clear();
    u64 v = probe_load64(&m2p[mfn]);
    result_trap("m2p_read_trap");
    result("m2p_read_matches", v == pfn);

    printk("about to store into the M2P at %p\n", (void *)&m2p[mfn]);
    trap_clear();
    probe_store64(&m2p[mfn], pfn ^ 0x5555);
    result_trap("m2p_store_trap");
    if (trap_vec == 14)
        printk("result m2p_store_err 0x%lx\n", trap_err);
    u64 after = probe_load64(&m2p[mfn]);
    result("m2p_store_changed", after != v);

    /* Store into the M2P entry of a foreign frame too. */
    unsigned long f = foreign_mfn();
    trap_clear();
    probe_store64(&m2p[f], 0x1234);
    result_trap("m2p_store_foreign_trap");

    RESULT_DONE("machphys_foreign", mmu1(((u64)f << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE, 0x1234, &done));
    RESULT_DONE("machphys_huge", mmu1((1UL << 50) | MMU_MACHPHYS_UPDATE, 0x1234, &done));
    RESULT_DONE("machphys_own", mmu1(((u64)mfn << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE, pfn, &done));
    trap_clear();
    result("m2p_own_ok", probe_load64(&m2p[mfn]) == pfn);
    poweroff();
}
