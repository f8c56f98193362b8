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

static unsigned long nr_free_listed;

unsigned long free_pages_left(void)
{
    return (limit_pfn > next_pfn ? limit_pfn - next_pfn : 0) + nr_free_listed;
}

/* Freed pages form a stack linked through their first word. */
static void *free_list;

void *alloc_page_raw(void)
{
    if (free_list) {
        void *p = free_list;
        free_list = *(void **)p;
        nr_free_listed--;
        return p;
    }
    if (next_pfn >= limit_pfn)
        panic("out of free pages (next pfn %lu, limit %lu)", next_pfn, limit_pfn);
    return pfn_to_virt(next_pfn++);
}

void *alloc_page(void)
{
    void *p = alloc_page_raw();
    memset(p, 0, PAGE_SIZE);
    return p;
}

void free_page(void *va)
{
    *(void **)va = free_list;
    free_list = va;
    nr_free_listed++;
}

unsigned long alloc_va_hole(void)
{
    unsigned long va = (unsigned long)alloc_page_raw();
    long rc = unmap_page(va);
    if (rc)
        panic("alloc_va_hole: unmap failed: %ld", rc);
    return va;
}

#define PTE_FRAME 0x000FFFFFFFFFF000UL

/* Kernel VA of a page-table frame given its MFN (tables are in the linear map). */
static const u64 *table_va(u64 entry)
{
    return pfn_to_virt(mfn_to_pfn((entry & PTE_FRAME) >> PAGE_SHIFT));
}

u64 kernel_pte_maddr(unsigned long va)
{
    const u64 *l4 = (const u64 *)start_info->pt_base;
    u64 e = l4[(va >> 39) & 511];
    if (!(e & PTE_P)) return 0;
    e = table_va(e)[(va >> 30) & 511];
    if (!(e & PTE_P)) return 0;
    e = table_va(e)[(va >> 21) & 511];
    if (!(e & PTE_P)) return 0;
    return (e & PTE_FRAME) + ((va >> 12) & 511) * 8;
}

void mm_map_all(void)
{
    static int done;
    if (done) return;
    done = 1;
    unsigned long nr = start_info->nr_pages;
    if (nr > 512 * 512) nr = 512 * 512;     /* one L2 table (1 GiB) */
    const u64 *l4 = (const u64 *)start_info->pt_base;
    u64 l3e = table_va(l4[(VIRT_BASE >> 39) & 511])[(VIRT_BASE >> 30) & 511];
    const u64 *l2 = table_va(l3e);
    u64 l2_maddr = l3e & PTE_FRAME;
    for (unsigned long base = 0; base < nr; base += 512) {
        unsigned idx = (unsigned)(((VIRT_BASE >> 21) & 511) + base / 512);
        if (l2[idx] & PTE_P)
            continue;
        u64 *l1 = alloc_page();
        for (unsigned long j = 0; j < 512 && base + j < nr; j++)
            l1[j] = ((u64)pfn_to_mfn(base + j) << PAGE_SHIFT) | PTE_KERNEL_RW;
        long rc = make_readonly(l1);
        if (rc) panic("mm_map_all: make_readonly failed: %ld", rc);
        mmu_update_t req = { (l2_maddr + idx * 8) | MMU_NORMAL_PT_UPDATE,
                             ((u64)virt_to_mfn(l1) << PAGE_SHIFT) | PTE_TABLE };
        unsigned cnt = 0;
        rc = HYPERVISOR_mmu_update(&req, 1, &cnt, DOMID_SELF);
        if (rc) panic("mm_map_all: L2 update failed: %ld", rc);
    }
    limit_pfn = nr;
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
