#include "mm.h"
#include "hypercall.h"
#include "sched.h"
#include "lib.h"

/* Page-aligned placeholder VA for shared_info (its original frame is simply
 * unmapped from here when shared_info is mapped over it). */
static char shared_info_page[PAGE_SIZE]
    __attribute__((aligned(PAGE_SIZE), section(".bss.page_aligned")));

static unsigned long next_pfn, limit_pfn;

static inline unsigned long max_ul(unsigned long a, unsigned long b) { return a > b ? a : b; }

void mm_init(void)
{
    /* Free frames start after everything the builder placed: the image,
     * start_info, the P2M list, the bootstrap page tables and the boot stack.
     * The mapped region extends at least 512 KiB past the boot stack. */
    unsigned long pfn = virt_to_pfn(_end + PAGE_SIZE - 1);
    pfn = max_ul(pfn, virt_to_pfn((void *)start_info) + 1);
    pfn = max_ul(pfn, virt_to_pfn((void *)(start_info->mfn_list +
                      start_info->nr_pages * 8 + PAGE_SIZE - 1)));
    pfn = max_ul(pfn, virt_to_pfn((void *)start_info->pt_base) + start_info->nr_pt_frames);
    pfn = max_ul(pfn, virt_to_pfn((void *)(entry_rsp + PAGE_SIZE - 1)));
    next_pfn = pfn;
    limit_pfn = virt_to_pfn((void *)(entry_rsp - 1)) + 1 + 128;
    if (limit_pfn > start_info->nr_pages) limit_pfn = start_info->nr_pages;
}

unsigned long free_pages_left(void)
{
    return limit_pfn > next_pfn ? limit_pfn - next_pfn : 0;
}

void *alloc_page(void)
{
    if (next_pfn >= limit_pfn)
        panic("out of free pages (next pfn %lu, limit %lu)", next_pfn, limit_pfn);
    void *p = pfn_to_virt(next_pfn++);
    memset(p, 0, PAGE_SIZE);
    return p;
}

long map_frame(unsigned long va, unsigned long mfn, unsigned long flags)
{
    return HYPERVISOR_update_va_mapping(va, (mfn << PAGE_SHIFT) | flags, UVMF_INVLPG);
}

long unmap_page(unsigned long va)
{
    return HYPERVISOR_update_va_mapping(va, 0, UVMF_INVLPG);
}

long make_readonly(void *va)
{
    return map_frame((unsigned long)va, virt_to_mfn(va), PTE_KERNEL_RO);
}

void map_shared_info(void)
{
    unsigned long va = (unsigned long)shared_info_page;
    long rc = HYPERVISOR_update_va_mapping(va, start_info->shared_info | 7, UVMF_INVLPG);
    if (rc)
        panic("mapping shared_info failed: %ld", rc);
    HYPERVISOR_shared_info = (shared_info_t *)va;
}
