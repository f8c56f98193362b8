/* Attack: an mmuext_op batch of 3 whose middle op is bad: PIN_L1 of a fresh
 * read-only page (ok), PIN_L1 of a foreign frame (bad), PIN_L1 of another
 * fresh page. Xen stops at the first failure: -EINVAL, *done_out += 1, the
 * first page pinned, the third not (ABI §1.5, §6.3). */
#include "hostile.h"

void app_main(void)
{
    hostile_traps_init();
    void *t1 = alloc_page(), *t2 = alloc_page();
    long rc;
    if ((rc = make_readonly(t1)) || (rc = make_readonly(t2))) panic("make_readonly: %ld", rc);
    unsigned long m1 = virt_to_mfn(t1), m2 = virt_to_mfn(t2);

    struct mmuext_op ops[3];
    memset(ops, 0, sizeof(ops));
    ops[0].cmd = MMUEXT_PIN_L1_TABLE; ops[0].arg1.mfn = m1;
    ops[1].cmd = MMUEXT_PIN_L1_TABLE; ops[1].arg1.mfn = foreign_mfn();
    ops[2].cmd = MMUEXT_PIN_L1_TABLE; ops[2].arg1.mfn = m2;
    unsigned done = 0;
    rc = HYPERVISOR_mmuext_op(ops, 3, &done, DOMID_SELF);
    result("mmuext_batch", rc);
    result("mmuext_batch_done", done);
    /* Pinned -> pinning again fails and unpinning works; not pinned -> unpin fails. */
    result("first_pinned_again", mmuext1(MMUEXT_PIN_L1_TABLE, m1, 0, NULL));
    result("third_unpin", mmuext1(MMUEXT_UNPIN_TABLE, m2, 0, NULL));
    result("first_unpin", mmuext1(MMUEXT_UNPIN_TABLE, m1, 0, NULL));

    /* Unknown command in the middle: -ENOSYS, done += 1. */
    ops[1].cmd = 14;
    done = 5;
    rc = HYPERVISOR_mmuext_op(ops, 3, &done, DOMID_SELF);
    result("mmuext_batch_enosys", rc);
    result("mmuext_batch_enosys_done", done);
    mmuext1(MMUEXT_UNPIN_TABLE, m1, 0, NULL);
    result("third_unpin_after_enosys", mmuext1(MMUEXT_UNPIN_TABLE, m2, 0, NULL));
    poweroff();
}
