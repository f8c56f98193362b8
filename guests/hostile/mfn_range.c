/* Attack: entries naming machine frames beyond any machine memory.
 *  - update_va_mapping / mmu_update of an L1 entry with MFN 1<<38, and with
 *    the largest MFN the entry format can hold (2^40 - 1)
 *  - an L2 entry pointing at MFN 1<<38
 *  - mmu_update whose *table address* is beyond memory (ptr = 1<<50) or
 *    not 52-bit (0xFFFFFFFFFFFFF000)
 * Xen: refused. For L1 entries upstream Xen treats a non-RAM MFN as MMIO and
 * returns -EPERM (no I/O privilege); the brief and ABI sheet say -EINVAL
 * (§6.6 rule 6). Table entries / table addresses -> -EINVAL (§6.2). */
#include "hostile.h"

void app_main(void)
{
    hostile_traps_init();
    void *scratch = alloc_page();
    unsigned long va = (unsigned long)scratch;
    struct walk w;
    pt_walk(va, &w);
    const u64 huge = 1UL << 38, maxf = (1UL << 40) - 1;

    result("uvm_mfn_huge", HYPERVISOR_update_va_mapping(va, (huge << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG));
    result("uvm_mfn_max", HYPERVISOR_update_va_mapping(va, (maxf << PAGE_SHIFT) | PTE_KERNEL_RO, UVMF_INVLPG));
    RESULT_DONE("mmu_l1_mfn_huge", mmu1(w.ma[1], (huge << PAGE_SHIFT) | PTE_KERNEL_RW, &done));
    RESULT_DONE("mmu_l1_mfn_max", mmu1(w.ma[1], (maxf << PAGE_SHIFT) | PTE_KERNEL_RO, &done));
    unsigned s2 = free_l2_slot();
    RESULT_DONE("mmu_l2_mfn_huge", mmu1(entry_ma(w.mfn[2], s2), (huge << PAGE_SHIFT) | PTE_TABLE, &done));
    RESULT_DONE("mmu_ptr_huge", mmu1(1UL << 50, 0, &done));
    RESULT_DONE("mmu_ptr_top", mmu1(0xFFFFFFFFFFFFF000UL, 0, &done));
    RESULT_DONE("mmuext_pin_huge", mmuext1(MMUEXT_PIN_L1_TABLE, huge, 0, &done));
    RESULT_DONE("mmuext_baseptr_huge", mmuext1(MMUEXT_NEW_BASEPTR, huge, 0, &done));

    *(volatile u64 *)scratch = 5;
    result("scratch_ok", *(volatile u64 *)scratch == 5 &&
                         ((read_entry(w.mfn[1], L1_IDX(va)) & PTE_ADDR_MASK) >> PAGE_SHIFT) == virt_to_mfn(scratch));
    poweroff();
}
