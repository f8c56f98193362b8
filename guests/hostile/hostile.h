/* Shared helpers for the hostile guests (guests/hostile/): result printing,
 * page-table walking over the bootstrap tables, one-entry MMU hypercalls, a
 * trap recorder that skips probe instructions, and store/read probes. */
#ifndef AIOVMM_HOSTILE_H
#define AIOVMM_HOSTILE_H

#include "os.h"
#include "hypercall.h"
#include "console.h"
#include "lib.h"
#include "sched.h"
#include "traps.h"
#include "events.h"
#include "mm.h"
#include "gnttab.h"
#include <xen/memory.h>

#define L4_IDX(va) (((va) >> 39) & 511)
#define L3_IDX(va) (((va) >> 30) & 511)
#define L2_IDX(va) (((va) >> 21) & 511)
#define L1_IDX(va) (((va) >> 12) & 511)

#define PTE_PSE       0x080UL
#define PTE_ADDR_MASK 0x000FFFFFFFFFF000UL

#define M2P_VA        0xFFFF800000000000UL   /* read-only M2P (L4 slot 256) */
#define XEN_PRIV_VA   0xFFFF828000000000UL   /* Xen text/data (L4 slot 261) */
#define XEN_DMAP_VA   0xFFFF830000000000UL   /* Xen direct map (slot 262) */

#define EINVAL_RC (-22L)

/* `result <key> <signed decimal>` */
void result(const char *key, long value);
void result_str(const char *key, const char *value);
/* `result <key> <rc>` and `result <key>_done <done>` */
void result_done(const char *key, long rc, unsigned done);
/* Runs `call` (which may pass &done), then prints both lines. Arguments of
 * one function call are unsequenced, so never write result_done(k, f(&done), done). */
#define RESULT_DONE(key, call) do {                                          \
        unsigned done = 0;                                                   \
        long rc_ = (call);                                                   \
        result_done((key), rc_, done);                                       \
    } while (0)

/* ---- frames ---- */
/* PFN of an own MFN (scan of the P2M), or ~0UL if the domain does not own it. */
unsigned long own_pfn_of(unsigned long mfn);
static inline int own_mfn(unsigned long mfn) { return own_pfn_of(mfn) != ~0UL; }
unsigned long own_max_mfn(void);
unsigned long own_min_mfn(void);
/* A frame that is not ours (max own MFN + 0x100). */
static inline unsigned long foreign_mfn(void) { return own_max_mfn() + 0x100; }
/* First PFN not mapped by the bootstrap region (end of the kernel's L2 run). */
unsigned long mapped_end_pfn(void);
/* Kernel VA of an own frame inside the bootstrap region, or NULL. */
void *mfn_virt(unsigned long mfn);
/* The user program's code frame after user_setup() (see common.c), or NULL. */
u8 *user_code_frame(void);
/* user_setup(), then `prog` over the user program's frame; `result found` (powers off if
 * not found). Returns the frame. */
u8 *user_install(const u8 *prog, unsigned long len);
/* CALLBACKOP_register of callback `type` (CALLBACKTYPE_*) at `address`, no flags. */
long register_callback(unsigned type, unsigned long address);

/* ---- page-table walk (current kernel root = start_info->pt_base) ---- */
struct walk {
    u64 mfn[5];     /* mfn[4] = L4 frame, mfn[3] = L3, mfn[2] = L2, mfn[1] = L1 */
    u64 ma[5];      /* machine address of the entry used at each level */
    u64 e[5];       /* the entry value at each level */
};
/* Returns 0 if va is mapped by an L1 entry (w->e[1] may still be non-present),
 * or the level (4..2) whose entry is not present. */
int pt_walk(unsigned long va, struct walk *w);
static inline u64 entry_ma(unsigned long table_mfn, unsigned idx)
{ return (table_mfn << PAGE_SHIFT) + 8UL * idx; }
/* Reads entry `idx` of an own table frame through its bootstrap mapping. */
u64 read_entry(unsigned long table_mfn, unsigned idx);
unsigned long l4_mfn(void);
/* The L2 that maps VIRT_BASE and an L2 slot in it that is free (counting down from 511). */
unsigned long kernel_l2_mfn(void);
unsigned free_l2_slot(void);

/* ---- one-shot MMU hypercalls ---- */
long mmu1(u64 ptr, u64 val, unsigned *done);
long mmuext1(unsigned cmd, u64 arg1, u64 arg2, unsigned *done);
/* One mmuext_op on `mfn`, reported as `result <key> <rc>` and `result <key>_done <n>`. */
void mmuext1_result(const char *key, unsigned cmd, unsigned long mfn);
long memory_op(unsigned long cmd, void *arg);
static inline long tlb_flush_local(void) { return mmuext1(MMUEXT_TLB_FLUSH_LOCAL, 0, 0, NULL); }

/* ---- traps ---- */
/* traps_init() plus a recorder on every vector: the faulting probe is
 * skipped, the vector/error/cr2 recorded. A fault outside a probe panics. */
void hostile_traps_init(void);
void trap_clear(void);
extern volatile long trap_vec;       /* -1: none since trap_clear() */
extern volatile u64 trap_err, trap_cr2, trap_rip;
extern volatile unsigned long trap_count;
/* Prints `result <key> <vector>` or `result <key> none`. */
void result_trap(const char *key);

/* Probes (one instruction each, skippable by the recorder). */
void probe_store64(volatile void *p, u64 v);
u64 probe_load64(const volatile void *p);      /* ~0 if skipped */

/* ---- misc ---- */
const char *cmdline(void);
/* The first occurrence of `key` in the command line `s` (anywhere, not only at a word's
 * start), or NULL. */
const char *cmdline_find(const char *s, const char *key);

/* ---- grant pairs (one guest image run twice: role=granter, role=mapper) ---- */
/* Polls the flags of our grant `ref` for up to 20 s until some bit of `mask` is set
 * (set != 0) or all are clear (set == 0): 1 if seen, 0 on timeout. With `yield` the vCPU
 * yields between polls; without, it spins so that the caller acts the moment the peer's
 * map or unmap shows (the race an attack needs). */
int grant_wait_flags(grant_ref_t ref, u16 mask, int set, int yield);
/* The granter's offer: gnttab_init, then a fresh page F filled with pattern + 2 * i
 * (bit 0 clear: a valid, empty L1's contents), read-only in our own tables, granted
 * read-write to `peer` and offered as `result offer ref=<r>`. Returns F; *ref its ref. */
u64 *grant_offer_l1_page(domid_t peer, u64 pattern, long *ref);
/* app_main of a grant pair: mapper(cmdline) for role=mapper, else granter(cmdline). */
void grant_pair_main(void (*granter)(const char *), void (*mapper)(const char *));
static inline u64 rol64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

/* ---- XSAVE/AVX (offered by the PV CPUID on kvm-pvm only) ---- */
#define CR4_OSXSAVE (1UL << 18)
/* CPUID through Xen's forced-emulation prefix: the PV policy, not the host's. */
static inline void cpuid_pv(u32 leaf, u32 sub, u32 *r)
{
    __asm__ volatile("ud2; .ascii \"xen\"; cpuid"
                     : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}
/* Where the PV CPUID offers XSAVE and AVX: CR4.OSXSAVE on and XCR0 = x87|SSE|AVX. Returns
 * whether it was offered. */
static inline int enable_avx(void)
{
    u32 r[4];
    cpuid_pv(1, 0, r);
    if (!((r[2] >> 26 & 1) && (r[2] >> 28 & 1)))
        return 0;
    u64 cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" :: "r"(cr4 | CR4_OSXSAVE));
    __asm__ volatile("xsetbv" :: "c"(0), "a"(7), "d"(0));
    return 1;
}

#endif
