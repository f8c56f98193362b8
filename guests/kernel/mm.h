/* Memory: P2M lookups, a bump allocator of free frames, mapping helpers. */
#ifndef AIOVMM_MM_H
#define AIOVMM_MM_H

#include "os.h"

/* L1 entry flags */
#define PTE_P    0x001UL
#define PTE_RW   0x002UL
#define PTE_US   0x004UL
#define PTE_A    0x020UL
#define PTE_D    0x040UL
#define PTE_KERNEL_RW  (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D)
#define PTE_KERNEL_RO  (PTE_P | PTE_US | PTE_A)
#define PTE_TABLE      (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D)

static inline unsigned long virt_to_pfn(const void *va)
{ return ((unsigned long)va - VIRT_BASE) >> PAGE_SHIFT; }
static inline void *pfn_to_virt(unsigned long pfn)
{ return (void *)(VIRT_BASE + (pfn << PAGE_SHIFT)); }
static inline unsigned long pfn_to_mfn(unsigned long pfn)
{ return ((unsigned long *)start_info->mfn_list)[pfn]; }
static inline unsigned long virt_to_mfn(const void *va)
{ return pfn_to_mfn(virt_to_pfn(va)); }

void mm_init(void);
/* A zeroed free frame, mapped RW in the bootstrap region (panics if none). */
void *alloc_page(void);
unsigned long free_pages_left(void);
/* update_va_mapping(va, mfn<<12 | flags, UVMF_INVLPG). */
long map_frame(unsigned long va, unsigned long mfn, unsigned long flags);
long unmap_page(unsigned long va);
/* Remap a page of the bootstrap region read-only. */
long make_readonly(void *va);
void map_shared_info(void);

/* Machine address of the PTE mapping `va` in the kernel's page tables (walks
 * the current tables read-only through the kernel mapping; 0 if none). */
u64 kernel_pte_maddr(unsigned long va);
/* Extend the kernel's linear mapping VIRT_BASE + pfn<<12 to every frame of
 * the domain (new L1 tables hooked into the bootstrap L2), so alloc_page()
 * can hand out all free memory. Idempotent. */
void mm_map_all(void);
/* Like alloc_page() but not zeroed. */
void *alloc_page_raw(void);
/* Return a page to the allocator; it must be mapped writable again. */
void free_page(void *va);
/* A kernel VA with an L1 table but no mapping (its frame is given up):
 * a place to map grant frames, foreign grants or shared rings. */
unsigned long alloc_va_hole(void);
/* MFN -> PFN through Xen's read-only M2P table. */
static inline unsigned long mfn_to_pfn(unsigned long mfn)
{ return ((const unsigned long *)HYPERVISOR_VIRT_START)[mfn]; }

#endif
