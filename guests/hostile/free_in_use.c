/* Attack: give back (XENMEM_decrease_reservation) frames that are live page
 * tables: the L1 that maps its own code, and the active L4; plus a foreign
 * frame. Xen: a foreign frame is refused (0 extents). For its own live tables
 * Xen may report the extent as done (1): the frame leaves the domain's
 * allocation but stays alive, typed and in use while references remain, so
 * the domain keeps running (ABI §8.1, §8.3, §6.6 rule 3). A hypervisor
 * without memory_op returns -ENOSYS. What must never happen: the frame is
 * reused while still mapped, or the domain silently loses its mappings. */
#include "hostile.h"

static long decrease(unsigned long mfn)
{
    xen_pfn_t list[1] = { mfn };
    struct xen_memory_reservation r;
    memset(&r, 0, sizeof(r));
    set_xen_guest_handle(r.extent_start, list);
    r.nr_extents = 1;
    r.extent_order = 0;
    r.domid = DOMID_SELF;
    return memory_op(XENMEM_decrease_reservation, &r);
}

static u64 code_sum(void)
{
    u64 s = 0;
    for (const u64 *p = (const u64 *)_text; p < (const u64 *)_etext; p++)
        s = rol64(s, 7) ^ *p;
    return s;
}

void app_main(void)
{
    hostile_traps_init();
    struct walk w;
    if (pt_walk((unsigned long)_text, &w)) panic("code not mapped");
    u64 sum0 = code_sum();

    result("free_foreign_extents", decrease(foreign_mfn()));
    printk("about to free the live L1 that maps the code\n");
    result("free_l1_extents", decrease(w.mfn[1]));
    result("still_running", 1);
    tlb_flush_local();
    result("code_intact", code_sum() == sum0);
    struct walk w2;
    result("l1_still_used", pt_walk((unsigned long)_text, &w2) == 0 && w2.mfn[1] == w.mfn[1]);

    printk("about to free the active L4\n");
    result("free_l4_extents", decrease(w.mfn[4]));
    result("still_running_after_l4", 1);
    tlb_flush_local();
    result("code_intact_after_l4", code_sum() == sum0);
    /* Mappings still work. */
    void *p = alloc_page();
    *(volatile u64 *)p = 0x77;
    result("uvm_after_free", map_frame((unsigned long)p, virt_to_mfn(p), PTE_KERNEL_RW));
    result("data_ok", *(volatile u64 *)p == 0x77);
    poweroff();
}
