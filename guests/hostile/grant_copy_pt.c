/* Attack (issue 9 finding 1): GNTTABOP_copy into a page table.
 * The guest grants its own live L1 (then L2, L3, L4) frame to itself (it writes
 * its own grant entry), puts a PTE mapping a frame it does not own, writable, in
 * a data page, and copies those 8 bytes into a free slot of the table: through
 * the self-grant (GNTCOPY_dest_gref) and by frame number. Xen's
 * gnttab_copy_claim_buf must get PGT_writable_page on the destination and a page
 * table cannot have it: GNTST_general_error (-1), the table unchanged, the
 * entry's GTF_reading/GTF_writing clear again. Control: the same copy into a
 * data page through a self-grant is GNTST_okay and the bytes arrive.
 * Its own domid is found the way a guest can: the one domid for which a copy
 * from a self-grant succeeds. */
#include "hostile.h"
#include "gnttab.h"

static int16_t copy8(unsigned long src_mfn, grant_ref_t dref, unsigned long dst_mfn,
                     unsigned dst_off, int dest_gref)
{
    struct gnttab_copy op;
    memset(&op, 0, sizeof(op));
    op.source.u.gmfn = src_mfn;
    op.source.domid = DOMID_SELF;
    op.dest.domid = DOMID_SELF;
    op.dest.offset = dst_off;
    if (dest_gref) op.dest.u.ref = dref; else op.dest.u.gmfn = dst_mfn;
    op.len = 8;
    op.flags = dest_gref ? GNTCOPY_dest_gref : 0;
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_copy, &op, 1);
    if (rc) panic("GNTTABOP_copy returned %ld", rc);
    return op.status;
}

static domid_t find_own_domid(u64 *probe_src, u64 *probe_dst)
{
    for (domid_t d = 1; d < 2048; d++) {
        long ref = gnttab_grant_access(d, virt_to_mfn(probe_src), 0);
        if (ref < 0) panic("grant table full");
        struct gnttab_copy op;
        memset(&op, 0, sizeof(op));
        op.source.u.ref = (grant_ref_t)ref;
        op.source.domid = DOMID_SELF;
        op.dest.u.gmfn = virt_to_mfn(probe_dst);
        op.dest.domid = DOMID_SELF;
        op.len = 8;
        op.flags = GNTCOPY_source_gref;
        HYPERVISOR_grant_table_op(GNTTABOP_copy, &op, 1);
        gnttab_end_access((grant_ref_t)ref);
        if (op.status == GNTST_okay) return d;
    }
    return 0;
}

static unsigned free_slot(unsigned long table, int level)
{
    for (unsigned i = (level == 4 ? 255 : 511); i > 0; i--)
        if (!(read_entry(table, i) & PTE_P)) return i;
    return 0;
}

void app_main(void)
{
    hostile_traps_init();
    long rc = gnttab_init();
    if (rc) panic("gnttab_init: %ld", rc);
    u64 *data = alloc_page();
    u64 *probe = alloc_page();
    domid_t self = find_own_domid(data, probe);
    result("self_domid_found", self != 0);

    /* An L1 with a free slot: the one mapping a VA hole. */
    unsigned long hole = alloc_va_hole();
    struct walk w;
    pt_walk(hole, &w);
    static const char *names[5] = { "", "l1", "l2", "l3", "l4" };
    /* The tables walked from the hole's VA: L1 (slot of the hole), L2, L3, L4. */
    for (int lvl = 1; lvl <= 4; lvl++) {
        unsigned long table = w.mfn[lvl];
        unsigned slot = lvl == 1 ? L1_IDX(hole) : free_slot(table, lvl);
        if (!slot || (read_entry(table, slot) & PTE_P)) panic("no free slot in the L%d", lvl);
        /* A writable PTE to a frame we do not own (L1), or a "table" we do not own. */
        data[0] = (foreign_mfn() << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US | PTE_A;
        long ref = gnttab_grant_access(self, table, 0);
        if (ref < 0) panic("grant table full");
        char key[48];
        int16_t st = copy8(virt_to_mfn(data), (grant_ref_t)ref, 0, slot * 8, 1);
        snprintf(key, sizeof(key), "copy_gref_%s", names[lvl]);
        result(key, st);
        snprintf(key, sizeof(key), "copy_gref_%s_unchanged", names[lvl]);
        result(key, read_entry(table, slot) == 0);
        snprintf(key, sizeof(key), "copy_gref_%s_flags", names[lvl]);
        result(key, gnttab_flags((grant_ref_t)ref) & (GTF_reading | GTF_writing));
        gnttab_end_access((grant_ref_t)ref);
        st = copy8(virt_to_mfn(data), 0, table, slot * 8, 0);
        snprintf(key, sizeof(key), "copy_gmfn_%s", names[lvl]);
        result(key, st);
        snprintf(key, sizeof(key), "copy_gmfn_%s_unchanged", names[lvl]);
        result(key, read_entry(table, slot) == 0);
    }
    /* Control: a data page through a self-grant. */
    data[0] = 0x1122334455667788UL;
    long ref = gnttab_grant_access(self, virt_to_mfn(probe), 0);
    probe[3] = 0;
    result("copy_gref_data", copy8(virt_to_mfn(data), (grant_ref_t)ref, 0, 24, 1));
    result("copy_gref_data_arrived", probe[3] == 0x1122334455667788UL);
    result("copy_gref_data_flags", gnttab_flags((grant_ref_t)ref) & (GTF_reading | GTF_writing));
    /* The hole is still a hole: nothing was mapped there. */
    trap_clear();
    (void)probe_load64((volatile void *)hole);
    result_trap("hole_read_trap");
    poweroff();
}
