/* Grant tables v1 (Mini-OS-sized): our own table (grant / end access) and
 * mapping other domains' grants. */
#ifndef AIOVMM_GNTTAB_H
#define AIOVMM_GNTTAB_H

#include "os.h"
#include <xen/grant_table.h>
#include "hypercall.h"

#define GNTTAB_NR_FRAMES   4
#define GNTTAB_NR_ENTRIES  (GNTTAB_NR_FRAMES * PAGE_SIZE / sizeof(grant_entry_v1_t))

/* GNTTABOP_setup_table for 4 frames, mapped writable at reserved VAs.
 * Returns 0 or the (negative) hypercall error / GNTST status. */
long gnttab_init(void);
/* Grant `domid` access to frame `mfn`; returns the ref (>= 8), or -1 if
 * the table is full. */
long gnttab_grant_access(domid_t domid, unsigned long mfn, int readonly);
/* Revoke an unused grant: 1 if revoked (ref freed), 0 if the grantee still
 * has it mapped (GTF_reading/GTF_writing set). */
int gnttab_end_access(grant_ref_t ref);
/* Current flags of one of our entries. */
u16 gnttab_flags(grant_ref_t ref);
/* The entry itself (tests that race the host on its flags). */
grant_entry_v1_t *gnttab_entry(grant_ref_t ref);

/* Suspend: unmap the table's frames (they are Xen's: a saved image must not
 * map them). Resume: map them again; in a new domain (resumed after a save
 * or migration) rewrite every live entry with the frame's new MFN. 0 or the
 * hypercall error; both do nothing before gnttab_init(). */
int gnttab_suspend(void);
int gnttab_resume(int new_domain);

/* Map grant `ref` of `domid` at `va` (an L1 table must exist and the VA be
 * unmapped, e.g. alloc_va_hole()). Returns the GNTST status; *handle set on
 * success. */
int gnttab_map(domid_t domid, grant_ref_t ref, unsigned long va, int readonly,
               grant_handle_t *handle);
/* Unmap by handle (and VA); returns the GNTST status. */
int gnttab_unmap(unsigned long va, grant_handle_t handle);

#endif
