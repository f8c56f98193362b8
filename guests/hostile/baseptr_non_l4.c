/* Attack: load a kernel (and user) page-table root that is not an L4:
 * a data frame mapped writable, a live L1, the L2, and a foreign frame.
 * Xen: each is refused (-EINVAL, or -EBUSY for the type conflict; ABI §6.3
 * NEW_BASEPTR "validated as L4", §6.6 rules 1-2); CR3 is unchanged and the
 * domain keeps running. If one were accepted the next instruction fetch
 * would fault and the domain would die, hence the "about to" lines. */
#include "hostile.h"

static void attack(const char *key, unsigned cmd, unsigned long mfn)
{
    printk("about to %s\n", key);
    mmuext1_result(key, cmd, mfn);
}

void app_main(void)
{
    hostile_traps_init();
    struct walk w;
    if (pt_walk((unsigned long)_text, &w)) panic("code not mapped");
    void *data = alloc_page();

    attack("baseptr_data", MMUEXT_NEW_BASEPTR, virt_to_mfn(data));
    attack("baseptr_l1", MMUEXT_NEW_BASEPTR, w.mfn[1]);
    attack("baseptr_l2", MMUEXT_NEW_BASEPTR, w.mfn[2]);
    attack("baseptr_foreign", MMUEXT_NEW_BASEPTR, foreign_mfn());
    attack("user_baseptr_data", MMUEXT_NEW_USER_BASEPTR, virt_to_mfn(data));
    attack("user_baseptr_l1", MMUEXT_NEW_USER_BASEPTR, w.mfn[1]);
    attack("user_baseptr_foreign", MMUEXT_NEW_USER_BASEPTR, foreign_mfn());
    /* Control: reloading the current L4 is legal. */
    attack("baseptr_same_l4", MMUEXT_NEW_BASEPTR, w.mfn[4]);
    *(volatile u64 *)data = 3;
    result("data_writable", *(volatile u64 *)data == 3);
    poweroff();
}
