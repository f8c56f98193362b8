/* MMU micro-benchmarks: single and batched mmu_update, writable page-table
 * stores (trapped and emulated), and the fork workload. */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "traps.h"
#include "time.h"
#include "lib.h"
#include "mm.h"
#include "fork.h"

static mmu_update_t batch[512];

static void clear_table(u64 base)
{
    unsigned done = 0;
    for (unsigned i = 0; i < 512; i++) {
        batch[i].ptr = (base + i * 8) | MMU_NORMAL_PT_UPDATE;
        batch[i].val = 0;
    }
    long rc = HYPERVISOR_mmu_update(batch, 512, &done, DOMID_SELF);
    if (rc) panic("clearing the scratch L1 failed: %ld", rc);
}

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    u64 n = cmdline_u64(cmd, "n", 10000);
    u64 forks = cmdline_u64(cmd, "forks", 3);
    traps_init();
    mm_map_all();

    /* A scratch L1 table of our own, read-only in the kernel mapping and
     * pinned, and a data frame for its entries to map. */
    u64 *l1 = alloc_page();
    void *target = alloc_page();
    long rc = make_readonly(l1);
    if (rc) panic("make_readonly failed: %ld", rc);
    struct mmuext_op op = { .cmd = MMUEXT_PIN_L1_TABLE };
    op.arg1.mfn = virt_to_mfn(l1);
    unsigned done = 0;
    rc = HYPERVISOR_mmuext_op(&op, 1, &done, DOMID_SELF);
    if (rc) panic("pin L1 failed: %ld", rc);
    u64 base = (u64)virt_to_mfn(l1) << PAGE_SHIFT;
    u64 pte = ((u64)virt_to_mfn(target) << PAGE_SHIFT) | PTE_KERNEL_RW;
    /* Update i writes entry i%512: mapped on even passes over the table,
     * cleared on odd ones, so every update changes the entry. */
#define VAL(i) ((((i) / 512) & 1) ? 0 : pte)

    u64 t0 = monotonic_ns();
    for (u64 i = 0; i < n; i++) {
        mmu_update_t req = { (base + (i % 512) * 8) | MMU_NORMAL_PT_UPDATE, VAL(i) };
        rc = HYPERVISOR_mmu_update(&req, 1, &done, DOMID_SELF);
        if (rc) panic("single mmu_update %lu failed: %ld", i, rc);
    }
    u64 t1 = monotonic_ns();
    printk("mmu: single n=%lu ns=%lu\n", n, t1 - t0);

    clear_table(base);                       /* the batched run starts from empty */
    t0 = monotonic_ns();
    for (u64 i = 0; i < n; ) {
        unsigned cnt = n - i < 512 ? (unsigned)(n - i) : 512;
        for (unsigned k = 0; k < cnt; k++) {
            u64 j = i + k;
            batch[k].ptr = (base + (j % 512) * 8) | MMU_NORMAL_PT_UPDATE;
            batch[k].val = VAL(j);
        }
        done = 0;
        rc = HYPERVISOR_mmu_update(batch, cnt, &done, DOMID_SELF);
        if (rc || done != cnt) panic("batched mmu_update failed: %ld (done %u)", rc, done);
        i += cnt;
    }
    t1 = monotonic_ns();
    printk("mmu: batched n=%lu ns=%lu\n", n, t1 - t0);

    /* Writable page tables: plain stores to the read-only L1. */
    u64 np = n / 10;
    volatile u64 *vl1 = l1;
    t0 = monotonic_ns();
    for (u64 i = 0; i < np; i++) {
        unsigned idx = i % 512;
        vl1[idx] = vl1[idx] ? 0 : pte;
    }
    t1 = monotonic_ns();
    printk("mmu: ptwr n=%lu ns=%lu\n", np, t1 - t0);
    /* Check the last pass landed: every touched entry is consistent. */
    for (unsigned i = 0; i < 512; i++)
        if (l1[i] && (l1[i] & 0x000FFFFFFFFFF000UL) != (pte & 0x000FFFFFFFFFF000UL))
            panic("ptwr: entry %u = 0x%lx", i, l1[i]);

    clear_table(base);
    op.cmd = MMUEXT_UNPIN_TABLE;
    rc = HYPERVISOR_mmuext_op(&op, 1, &done, DOMID_SELF);
    if (rc) panic("unpin failed: %ld", rc);

    u64 errors = 0;
    t0 = monotonic_ns();
    for (u64 i = 0; i < forks; i++)
        errors += fork_once(1000);
    t1 = monotonic_ns();
    if (errors) panic("fork workload: %lu errors", errors);
    printk("mmu: fork n=%lu ns=%lu\n", forks, t1 - t0);
    poweroff();
}
