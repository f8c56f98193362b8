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

#endif
