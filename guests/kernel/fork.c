#include "fork.h"
#include "mm.h"
#include "hypercall.h"
#include "sched.h"
#include "traps.h"
#include "events.h"
#include "lib.h"
#include "user.h"
#include "console.h"

/* The user routine, copied to FORK_CODE_VA: writes its VA into the first
 * word of each of fp_count pages from fp_base, then exit(pages written). */
__asm__(
    "    .pushsection .rodata.fork_prog, \"a\"\n"
    "    .p2align 3\n"
    "fork_prog_start:\n"
    "    mov     fp_base(%rip), %rdi\n"
    "    mov     fp_count(%rip), %rcx\n"
    "    xor     %edx, %edx\n"
    "    test    %rcx, %rcx\n"
    "    jz      2f\n"
    "1:  mov     %rdi, (%rdi)\n"
    "    add     $4096, %rdi\n"
    "    inc     %rdx\n"
    "    cmp     %rcx, %rdx\n"
    "    jb      1b\n"
    "2:  mov     $60, %eax\n"
    "    mov     %rdx, %rdi\n"
    "    syscall\n"
    "3:  pause\n"
    "    jmp     3b\n"
    "    .p2align 3\n"
    "fp_base:  .quad 0\n"
    "fp_count: .quad 0\n"
    "fork_prog_end:\n"
    "    .popsection\n");
extern char fork_prog_start[], fork_prog_end[], fp_base[], fp_count[];
extern char user_entry_stack_top[];

#define NR_L1 (2 + FORK_MAX_PAGES / 512)

static void *data[FORK_MAX_PAGES];
static struct user_ctx fctx;

static void fork_syscall(struct regs *r)
{
    if (r->rax == 60)
        user_resume(&fctx, (long)r->rdi);
    r->rax = (u64)-38;
}

static u64 maddr(void *table, unsigned idx)
{
    return ((u64)virt_to_mfn(table) << PAGE_SHIFT) + idx * 8;
}

static void must_mmu(mmu_update_t *req, unsigned n, const char *what)
{
    for (unsigned off = 0; off < n; off += 512) {
        unsigned cnt = n - off < 512 ? n - off : 512, done = 0;
        long rc = HYPERVISOR_mmu_update(req + off, cnt, &done, DOMID_SELF);
        if (rc || done != cnt)
            panic("fork: mmu_update (%s) failed: %ld (done %u of %u)", what, rc, done, cnt);
    }
}

static void must_ext(struct mmuext_op *ops, unsigned n, const char *what)
{
    unsigned done = 0;
    long rc = HYPERVISOR_mmuext_op(ops, n, &done, DOMID_SELF);
    if (rc || done != n)
        panic("fork: mmuext_op (%s) failed: %ld (done %u of %u)", what, rc, done, n);
}

static mmu_update_t reqs[FORK_MAX_PAGES + 64];

unsigned long fork_once(unsigned pages)
{
    static int stack_set;
    unsigned long errors = 0;
    if (pages > FORK_MAX_PAGES) pages = FORK_MAX_PAGES;
    if (!stack_set) {
        long rc = HYPERVISOR_stack_switch(FLAT_KERNEL_SS, (unsigned long)user_entry_stack_top);
        if (rc) panic("fork: stack_switch failed: %ld", rc);
        stack_set = 1;
    }

    /* 1. Frames from free memory, filled while still writable. */
    u64 *l4 = alloc_page(), *l3 = alloc_page(), *l2 = alloc_page();
    unsigned nl1 = 1 + (pages + 511) / 512;
    u64 *l1[NR_L1];
    for (unsigned i = 0; i < nl1; i++)
        l1[i] = alloc_page();
    void *code = alloc_page(), *stack = alloc_page();
    memcpy(code, fork_prog_start, fork_prog_end - fork_prog_start);
    *(u64 *)(code + (fp_base - fork_prog_start)) = FORK_DATA_VA;
    *(u64 *)(code + (fp_count - fork_prog_start)) = pages;
    for (unsigned i = 0; i < pages; i++) {
        data[i] = alloc_page_raw();
        *(u64 *)data[i] = 0;
    }

    const u64 urw = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D;
    l1[0][(FORK_CODE_VA >> 12) & 511] = ((u64)virt_to_mfn(code) << PAGE_SHIFT) | PTE_P | PTE_US | PTE_A;
    l1[0][(FORK_STACK_VA >> 12) & 511] = ((u64)virt_to_mfn(stack) << PAGE_SHIFT) | urw;
    l2[(FORK_CODE_VA >> 21) & 511] = ((u64)virt_to_mfn(l1[0]) << PAGE_SHIFT) | PTE_TABLE;
    for (unsigned i = 0; i < pages; i++) {
        unsigned long va = FORK_DATA_VA + (unsigned long)i * PAGE_SIZE;
        l1[1 + i / 512][(va >> 12) & 511] = ((u64)virt_to_mfn(data[i]) << PAGE_SHIFT) | urw;
    }
    for (unsigned i = 1; i < nl1; i++) {
        unsigned long va = FORK_DATA_VA + (unsigned long)(i - 1) * 512 * PAGE_SIZE;
        l2[(va >> 21) & 511] = ((u64)virt_to_mfn(l1[i]) << PAGE_SHIFT) | PTE_TABLE;
    }
    l3[0] = ((u64)virt_to_mfn(l2) << PAGE_SHIFT) | PTE_TABLE;
    l4[0] = ((u64)virt_to_mfn(l3) << PAGE_SHIFT) | PTE_TABLE;

    /* 2. Table frames read-only in the kernel mapping (one batch). */
    u64 *tables[3 + NR_L1] = { l4, l3, l2 };
    unsigned nt = 3;
    for (unsigned i = 0; i < nl1; i++) tables[nt++] = l1[i];
    for (unsigned i = 0; i < nt; i++) {
        u64 pa = kernel_pte_maddr((unsigned long)tables[i]);
        if (!pa) panic("fork: no kernel PTE for %p", tables[i]);
        reqs[i].ptr = pa | MMU_NORMAL_PT_UPDATE;
        reqs[i].val = ((u64)virt_to_mfn(tables[i]) << PAGE_SHIFT) | PTE_KERNEL_RO;
    }
    must_mmu(reqs, nt, "make tables read-only");

    /* 3. Pin (validates the whole tree) and install as the user root. */
    struct mmuext_op ops[3];
    memset(ops, 0, sizeof(ops));
    ops[0].cmd = MMUEXT_TLB_FLUSH_LOCAL;
    ops[1].cmd = MMUEXT_PIN_L4_TABLE;
    ops[1].arg1.mfn = virt_to_mfn(l4);
    ops[2].cmd = MMUEXT_NEW_USER_BASEPTR;
    ops[2].arg1.mfn = virt_to_mfn(l4);
    must_ext(ops, 3, "pin + user baseptr");

    /* 4. Run the user routine. */
    int mask = irq_save();
    set_syscall_handler(fork_syscall);
    long written = user_enter(&fctx, FORK_CODE_VA, FORK_STACK_VA + PAGE_SIZE);
    irq_restore(mask);
    if (written != (long)pages) {
        printk("fork: user routine wrote %ld of %u pages\n", written, pages);
        errors++;
    }
    for (unsigned i = 0; i < pages; i++)
        if (*(volatile u64 *)data[i] != FORK_DATA_VA + (u64)i * PAGE_SIZE)
            errors++;

    /* 5. Tear down: unmap the data pages (validated L1 updates), drop the
     * user root, unpin (devalidates the tree). */
    for (unsigned i = 0; i < pages; i++) {
        unsigned long va = FORK_DATA_VA + (unsigned long)i * PAGE_SIZE;
        reqs[i].ptr = maddr(l1[1 + i / 512], (va >> 12) & 511) | MMU_NORMAL_PT_UPDATE;
        reqs[i].val = 0;
    }
    must_mmu(reqs, pages, "unmap data pages");
    memset(ops, 0, sizeof(ops));
    ops[0].cmd = MMUEXT_NEW_USER_BASEPTR;
    ops[0].arg1.mfn = 0;
    ops[1].cmd = MMUEXT_UNPIN_TABLE;
    ops[1].arg1.mfn = virt_to_mfn(l4);
    must_ext(ops, 2, "user baseptr 0 + unpin");

    /* 6. The former tables must be mappable writable again. */
    for (unsigned i = 0; i < nt; i++) {
        reqs[i].ptr = kernel_pte_maddr((unsigned long)tables[i]) | MMU_NORMAL_PT_UPDATE;
        reqs[i].val = ((u64)virt_to_mfn(tables[i]) << PAGE_SHIFT) | PTE_KERNEL_RW;
    }
    unsigned done = 0;
    long rc = HYPERVISOR_mmu_update(reqs, nt, &done, DOMID_SELF);
    if (rc || done != nt) {
        printk("fork: remapping %u table frames writable failed: %ld (done %u)\n", nt, rc, done);
        errors += nt - done;
        panic("fork: table frames still typed after teardown");
    }
    memset(ops, 0, sizeof(ops));
    ops[0].cmd = MMUEXT_TLB_FLUSH_LOCAL;
    must_ext(ops, 1, "flush");

    /* 7. Reclaim every frame. */
    for (unsigned i = 0; i < nt; i++) {
        tables[i][0] = 0;                       /* writable: a store works */
        free_page(tables[i]);
    }
    free_page(code);
    free_page(stack);
    for (unsigned i = 0; i < pages; i++)
        free_page(data[i]);
    return errors;
}
