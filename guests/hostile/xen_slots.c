/* Attack: take over Xen's part of the address space.
 *  - mmu_update of its own L4 slots 256, 261 and 271 (Xen's: M2P, Xen
 *    text/data, direct map), pointing them at its own L3 or clearing them
 *  - read and write VAs in Xen's private area (0xFFFF828000000000) and the
 *    direct map (0xFFFF830000000000)
 * Xen: L4 slots 256-271 -> -EINVAL (ABI §6.6 rule 8); the accesses #PF
 * (§6.7: only the M2P is guest-readable). Slot 272 is a guest slot (control). */
#include "hostile.h"

static void slot(const char *key, unsigned long l4, unsigned idx, u64 val)
{
    unsigned done = 0;
    long rc = mmu1(entry_ma(l4, idx), val, &done);
    result_done(key, rc, done);
}

static void access(const char *key, unsigned long va, int write)
{
    trap_clear();
    if (write) probe_store64((volatile void *)va, 0xbad);
    else probe_load64((const volatile void *)va);
    result_trap(key);
}

void app_main(void)
{
    hostile_traps_init();
    unsigned long l4 = l4_mfn();
    struct walk w;
    pt_walk(VIRT_BASE, &w);
    u64 l3e = ((u64)w.mfn[3] << PAGE_SHIFT) | PTE_TABLE;

    slot("l4_slot256", l4, 256, l3e);
    slot("l4_slot256_zero", l4, 256, 0);
    slot("l4_slot261", l4, 261, l3e);
    slot("l4_slot261_zero", l4, 261, 0);
    slot("l4_slot271", l4, 271, l3e);
    /* Control: slot 272 is the guest's. */
    slot("l4_slot272", l4, 272, l3e);
    slot("l4_slot272_clear", l4, 272, 0);

    access("xen_priv_read_trap", XEN_PRIV_VA, 0);
    access("xen_priv_write_trap", XEN_PRIV_VA, 1);
    access("xen_dmap_read_trap", XEN_DMAP_VA, 0);
    access("xen_dmap_write_trap", XEN_DMAP_VA, 1);
    access("xen_linear_read_trap", 0xFFFF810000000000UL, 0);
    access("xen_perdomain_read_trap", 0xFFFF820000000000UL, 0);
    access("xen_end_read_trap", 0xFFFF880000000000UL - 8, 0);
    poweroff();
}
