/* Attack: map frames the domain does not own. A frame beyond its own MFNs,
 * MFN 0, and (if XENMEM_machphys_mfn_list answers) a frame backing Xen's M2P,
 * with update_va_mapping and with mmu_update, writable and read-only.
 * Xen: -EINVAL for each (ABI §6.6 rule 6); the old mapping stays. */
#include "hostile.h"

static void *scratch;
static struct walk sw;

static void try_mfn(const char *name, unsigned long mfn)
{
    char key[64];
    unsigned long va = (unsigned long)scratch;

    snprintf(key, sizeof(key), "uvm_%s_rw", name);
    result(key, HYPERVISOR_update_va_mapping(va, (mfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG));
    snprintf(key, sizeof(key), "uvm_%s_ro", name);
    result(key, HYPERVISOR_update_va_mapping(va, (mfn << PAGE_SHIFT) | PTE_KERNEL_RO, UVMF_INVLPG));
    snprintf(key, sizeof(key), "mmu_%s_rw", name);
    RESULT_DONE(key, mmu1(sw.ma[1], (mfn << PAGE_SHIFT) | PTE_KERNEL_RW, &done));
    snprintf(key, sizeof(key), "mmu_%s_ro", name);
    RESULT_DONE(key, mmu1(sw.ma[1], (mfn << PAGE_SHIFT) | PTE_KERNEL_RO, &done));
}

void app_main(void)
{
    hostile_traps_init();
    scratch = alloc_page();
    *(volatile u64 *)scratch = 0x5ca7c4u;
    if (pt_walk((unsigned long)scratch, &sw)) panic("scratch page not mapped");
    unsigned long own = virt_to_mfn(scratch);

    try_mfn("beyond", foreign_mfn());

    /* MFN 0 is Xen's on real hardware; an emulator may hand it to a guest. */
    int mfn0_owned = own_mfn(0);
    result("mfn0_owned", mfn0_owned);
    if (!mfn0_owned)
        try_mfn("mfn0", 0);

    /* A frame of Xen's M2P (Xen-owned). */
    xen_pfn_t chunks[4] = { 0 };
    struct xen_machphys_mfn_list ml = { .max_extents = 4 };
    set_xen_guest_handle(ml.extent_start, chunks);
    long rc = memory_op(XENMEM_machphys_mfn_list, &ml);
    result("machphys_mfn_list", rc);
    if (rc == 0 && ml.nr_extents > 0 && !own_mfn(chunks[0]))
        try_mfn("m2p", chunks[0]);

    /* The scratch page must still map its own frame. */
    tlb_flush_local();
    u64 e = read_entry(sw.mfn[1], L1_IDX((unsigned long)scratch));
    result("mapping_intact", ((e & PTE_ADDR_MASK) >> PAGE_SHIFT) == own &&
                             *(volatile u64 *)scratch == 0x5ca7c4u);
    poweroff();
}
