/* Attack: a multicall the hypervisor cannot finish in one go.
 *
 * One page holds 64 multicall entries, each console_io(CONSOLEIO_write) of
 * one '~' (so the host can count exactly how many entries ran). An
 * L1 maps that page 512 times, an L2 maps the L1 512 times and an L3 maps the
 * L2 256 times, hooked into a free L4 slot: 256 GiB of VA in which entry i is
 * always the same page's entry i % 64, so a list of 2^32-1 entries exists
 * using four frames.
 *
 * cmdline `nr=<n>` (default 0xffffffff): entries in the big multicall. With a
 * small n the guest checks the multicall finished: `result mc_rc 0` and
 * `result mc_entry_result 0`, and n '~' were written. With the default it never returns in
 * any reasonable time; the test watches the host and destroys the domain.
 *
 * Before that, two small checks (Xen: xen/common/multicall.c):
 *  - a nested multicall entry is refused: `result mc_nested -22`;
 *  - an mmu_update of 2000 entries inside a multicall preempts itself
 *    (continuation inside the multicall) and still completes:
 *    `result mc_mmu_result 0`, `result mc_mmu_done 2000`. */
#include "hostile.h"

struct mc_entry {
    u64 op, result, args[6];
};

#define MMU_N 2000
static mmu_update_t mmu_reqs[MMU_N] __attribute__((aligned(PAGE_SIZE)));
static struct mc_entry small[2] __attribute__((aligned(64)));

void app_main(void)
{
    hostile_traps_init();

    /* Nested multicall: entry 0 is itself a multicall. */
    small[0].op = __HYPERVISOR_multicall;
    small[0].args[0] = (u64)&small[1];
    small[0].args[1] = 1;
    small[1].op = __HYPERVISOR_xen_version;
    long rc = HYPERVISOR_multicall(small, 1);
    result("mc_nested_rc", rc);
    result("mc_nested", (long)small[0].result);

    /* A self-preempting mmu_update inside a multicall. */
    unsigned long pfn = virt_to_pfn(mmu_reqs);
    for (unsigned i = 0; i < MMU_N; i++) {
        mmu_reqs[i].ptr = ((u64)pfn_to_mfn(pfn) << PAGE_SHIFT) | MMU_MACHPHYS_UPDATE;
        mmu_reqs[i].val = pfn;
    }
    unsigned done = 0;
    memset(small, 0, sizeof(small));
    small[0].op = __HYPERVISOR_mmu_update;
    small[0].args[0] = (u64)mmu_reqs;
    small[0].args[1] = MMU_N;
    small[0].args[2] = (u64)&done;
    small[0].args[3] = DOMID_SELF;
    small[1].op = __HYPERVISOR_xen_version;
    rc = HYPERVISOR_multicall(small, 2);
    result("mc_mmu_rc", rc);
    result("mc_mmu_result", (long)small[0].result);
    result("mc_mmu_done", done);
    result("mc_after_mmu_result", (long)small[1].result);

    /* The aliased list. */
    struct mc_entry *page = alloc_page();
    u64 *l1 = alloc_page(), *l2 = alloc_page(), *l3 = alloc_page();
    static const char tilde = '~';
    for (unsigned i = 0; i < PAGE_SIZE / sizeof(struct mc_entry); i++) {
        page[i].op = __HYPERVISOR_console_io;
        page[i].args[0] = CONSOLEIO_write;
        page[i].args[1] = 1;
        page[i].args[2] = (u64)&tilde;
    }
    for (unsigned i = 0; i < 512; i++) {
        l1[i] = (virt_to_mfn(page) << PAGE_SHIFT) | PTE_KERNEL_RW;
        l2[i] = (virt_to_mfn(l1) << PAGE_SHIFT) | PTE_TABLE;
    }
    for (unsigned i = 0; i < 256; i++)
        l3[i] = (virt_to_mfn(l2) << PAGE_SHIFT) | PTE_TABLE;
    if (make_readonly(l1) || make_readonly(l2) || make_readonly(l3))
        panic("make_readonly failed");
    unsigned slot = 300;
    if (read_entry(l4_mfn(), slot) & PTE_P)
        panic("L4 slot %u in use", slot);
    rc = mmu1(entry_ma(l4_mfn(), slot), (virt_to_mfn(l3) << PAGE_SHIFT) | PTE_TABLE, NULL);
    result("hook_l3", rc);
    if (rc)
        panic("cannot hook the aliased tables");
    struct mc_entry *list = (struct mc_entry *)(0xFFFF000000000000UL | ((u64)slot << 39));
    if (list[12345].op != __HYPERVISOR_console_io)
        panic("aliasing does not work");

    unsigned long nr = cmdline_u64(cmdline(), "nr", 0xffffffffUL);
    printk("about to multicall %lu entries at %p\n", nr, list);
    for (unsigned i = 0; i < PAGE_SIZE / sizeof(struct mc_entry); i++)
        page[i].result = 0x5555;                     /* overwritten by every entry run */
    console_flush();            /* the ring's lines out before console_io's '~' */
    rc = HYPERVISOR_multicall(list, nr);
    printk("\n");
    result("mc_rc", rc);
    result("mc_entry_result", (long)page[(nr - 1) % 64].result);
    result("xen_version", HYPERVISOR_xen_version(0, NULL));
    poweroff();
}
