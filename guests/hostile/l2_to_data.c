/* Attack: make an L2 entry point at a plain data page that is mapped writable
 * (it would become an L1 table the guest can write), at the L2 itself
 * writable (a linear self-map), and at its L4 (wrong level).
 * Xen: -EINVAL or -EBUSY (ABI §6.6 rules 1, 2, 7); nothing is stored. */
#include "hostile.h"

static void attack(const char *key, unsigned long l2, unsigned slot, unsigned long mfn)
{
    unsigned done = 0;
    long rc = mmu1(entry_ma(l2, slot), (mfn << PAGE_SHIFT) | PTE_TABLE, &done);
    result_done(key, rc, done);
    if (rc == 0)        /* accepted: undo so later attacks start clean */
        mmu1(entry_ma(l2, slot), 0, NULL);
}

void app_main(void)
{
    hostile_traps_init();
    unsigned long l2 = kernel_l2_mfn();
    unsigned slot = free_l2_slot();
    void *data = alloc_page();         /* zeroed: would be a valid empty L1 */
    attack("l2_to_data", l2, slot, virt_to_mfn(data));
    attack("l2_self_rw", l2, slot, l2);
    attack("l2_to_l4", l2, slot, l4_mfn());
    result("l2_slot_still_empty", !(read_entry(l2, slot) & PTE_P));
    /* The data page must still be writable. */
    *(volatile u64 *)data = 0x1234;
    result("data_writable", *(volatile u64 *)data == 0x1234);
    poweroff();
}
