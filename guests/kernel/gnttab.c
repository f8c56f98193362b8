#include "gnttab.h"
#include "mm.h"
#include "lib.h"
#include "sched.h"
#include "console.h"

/* The table lives in Xen-owned frames we map over these placeholder VAs. */
static char gnttab_area[GNTTAB_NR_FRAMES * PAGE_SIZE]
    __attribute__((aligned(PAGE_SIZE), section(".bss.page_aligned")));
static grant_entry_v1_t *gnttab_table;

/* Free refs: a stack of ref numbers (refs 0-7 are reserved). */
static grant_ref_t free_refs[GNTTAB_NR_ENTRIES];
static unsigned nr_free_refs;

/* What each live grant names, by PFN: the table's frames are Xen's, not part
 * of a saved image, and MFNs change across a migration, so a resume in a new
 * domain rebuilds every entry from here (Linux's frontends re-grant instead). */
static struct { u32 pfn; u16 domid; u16 flags; } shadow[GNTTAB_NR_ENTRIES];

static long map_table(void)
{
    xen_pfn_t frames[GNTTAB_NR_FRAMES];
    struct gnttab_setup_table setup = { .dom = DOMID_SELF, .nr_frames = GNTTAB_NR_FRAMES };
    set_xen_guest_handle(setup.frame_list, frames);
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_setup_table, &setup, 1);
    if (rc) return rc;
    if (setup.status) return setup.status;
    for (unsigned i = 0; i < GNTTAB_NR_FRAMES; i++) {
        rc = map_frame((unsigned long)gnttab_area + i * PAGE_SIZE, frames[i], PTE_KERNEL_RW);
        if (rc) return rc;
    }
    return 0;
}

long gnttab_init(void)
{
    long rc = map_table();
    if (rc) return rc;
    gnttab_table = (grant_entry_v1_t *)gnttab_area;
    memset(shadow, 0, sizeof(shadow));
    nr_free_refs = 0;
    for (grant_ref_t r = GNTTAB_NR_ENTRIES - 1; r >= GNTTAB_NR_RESERVED_ENTRIES; r--)
        free_refs[nr_free_refs++] = r;          /* lowest ref on top */
    return 0;
}

long gnttab_grant_access(domid_t domid, unsigned long mfn, int readonly)
{
    if (!gnttab_table) panic("gnttab: not initialised");
    if (!nr_free_refs) return -1;
    grant_ref_t ref = free_refs[--nr_free_refs];
    grant_entry_v1_t *e = &gnttab_table[ref];
    shadow[ref].pfn = (u32)mfn_to_pfn(mfn);
    shadow[ref].domid = domid;
    shadow[ref].flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
    e->domid = domid;
    e->frame = (u32)mfn;
    wmb();                                      /* frame and domid before flags */
    ACCESS_ONCE(e->flags) = GTF_permit_access | (readonly ? GTF_readonly : 0);
    return ref;
}

u16 gnttab_flags(grant_ref_t ref)
{
    return ACCESS_ONCE(gnttab_table[ref].flags);
}

grant_entry_v1_t *gnttab_entry(grant_ref_t ref)
{
    return &gnttab_table[ref];
}

int gnttab_end_access(grant_ref_t ref)
{
    if (ref < GNTTAB_NR_RESERVED_ENTRIES || ref >= GNTTAB_NR_ENTRIES)
        return 0;
    u16 *pflags = &gnttab_table[ref].flags;
    u16 flags = ACCESS_ONCE(*pflags);
    do {
        if (flags & (GTF_reading | GTF_writing))
            return 0;                           /* still in use by the grantee */
    } while (!__atomic_compare_exchange_n(pflags, &flags, 0, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    shadow[ref].flags = 0;
    free_refs[nr_free_refs++] = ref;
    return 1;
}

int gnttab_suspend(void)
{
    if (!gnttab_table) return 0;
    for (unsigned i = 0; i < GNTTAB_NR_FRAMES; i++) {
        long rc = unmap_page((unsigned long)gnttab_area + i * PAGE_SIZE);
        if (rc) return (int)rc;
    }
    return 0;
}

int gnttab_resume(int new_domain)
{
    if (!gnttab_table) return 0;
    long rc = map_table();
    if (rc || !new_domain) return (int)rc;
    for (grant_ref_t r = GNTTAB_NR_RESERVED_ENTRIES; r < GNTTAB_NR_ENTRIES; r++) {
        grant_entry_v1_t *e = &gnttab_table[r];
        if (!shadow[r].flags) continue;
        e->domid = shadow[r].domid;
        e->frame = (u32)pfn_to_mfn(shadow[r].pfn);
        wmb();
        ACCESS_ONCE(e->flags) = shadow[r].flags;
    }
    return 0;
}

int gnttab_map(domid_t domid, grant_ref_t ref, unsigned long va, int readonly,
               grant_handle_t *handle)
{
    struct gnttab_map_grant_ref op = {
        .host_addr = va,
        .flags = GNTMAP_host_map | (readonly ? GNTMAP_readonly : 0),
        .ref = ref,
        .dom = domid,
    };
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_map_grant_ref, &op, 1);
    if (rc) return (int)rc;
    if (op.status == GNTST_okay && handle)
        *handle = op.handle;
    return op.status;
}

int gnttab_unmap(unsigned long va, grant_handle_t handle)
{
    struct gnttab_unmap_grant_ref op = { .host_addr = va, .handle = handle };
    long rc = HYPERVISOR_grant_table_op(GNTTABOP_unmap_grant_ref, &op, 1);
    if (rc) return (int)rc;
    return op.status;
}
