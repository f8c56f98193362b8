/* Attack: superpage entries. An L2 entry with PSE (bit 7) mapping 2 MiB of
 * its own memory writable, one mapping machine address 0, and an L3 entry
 * with PSE (1 GiB). Xen: PSE is never allowed for PV -> -EINVAL (ABI §6.1,
 * §6.6 rule 5); the slots stay empty. */
#include "hostile.h"

static void attack(const char *key, u64 ptr, u64 val)
{
    unsigned done = 0;
    long rc = mmu1(ptr, val, &done);
    result_done(key, rc, done);
    if (rc == 0) mmu1(ptr, 0, NULL);
}

void app_main(void)
{
    hostile_traps_init();
    struct walk w;
    pt_walk(VIRT_BASE, &w);
    unsigned long l2 = w.mfn[2], l3 = w.mfn[3];
    unsigned s2 = free_l2_slot();
    u64 own2m = (u64)(own_min_mfn() & ~511UL) << PAGE_SHIFT;

    attack("l2_pse_own", entry_ma(l2, s2), own2m | PTE_PSE | PTE_TABLE);
    attack("l2_pse_zero", entry_ma(l2, s2), PTE_PSE | PTE_TABLE);
    unsigned s3 = 0;
    for (unsigned i = 509; i > 0; i--)
        if (!(read_entry(l3, i) & PTE_P)) { s3 = i; break; }
    attack("l3_pse_zero", entry_ma(l3, s3), PTE_PSE | PTE_TABLE);
    result("l2_slot_still_empty", !(read_entry(l2, s2) & PTE_P));
    /* Probe the would-be superpage VA. */
    trap_clear();
    probe_load64((const volatile void *)(VIRT_BASE + ((unsigned long)s2 << 21)));
    result_trap("l2_pse_va_read_trap");
    poweroff();
}
