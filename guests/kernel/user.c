#include "user.h"
#include "mm.h"
#include "hypercall.h"
#include "traps.h"
#include "console.h"
#include "sched.h"
#include "events.h"
#include "lib.h"

#define SYS_write 1
#define SYS_exit  60

extern char user_prog_start[], user_prog_end[];
extern char user_entry_stack_top[];

static void *code_page, *stack_page;   /* kernel VAs of the user frames */
static struct user_ctx kctx;

#define L4_IDX(va) (((va) >> 39) & 511)
#define L3_IDX(va) (((va) >> 30) & 511)
#define L2_IDX(va) (((va) >> 21) & 511)
#define L1_IDX(va) (((va) >> 12) & 511)

static u64 maddr_of_entry(void *table, unsigned idx)
{
    return ((u64)virt_to_mfn(table) << PAGE_SHIFT) + idx * 8;
}

void user_setup(void)
{
    void *l4 = alloc_page(), *l3 = alloc_page(), *l2 = alloc_page(), *l1 = alloc_page();
    long rc;

    code_page = alloc_page();
    stack_page = alloc_page();
    memcpy(code_page, user_prog_start, user_prog_end - user_prog_start);

    /* Page-table frames must not be mapped writable anywhere. */
    void *tables[] = { l4, l3, l2, l1 };
    for (unsigned i = 0; i < 4; i++)
        if ((rc = make_readonly(tables[i])))
            panic("user: make_readonly failed: %ld", rc);

    mmu_update_t req[] = {
        { maddr_of_entry(l1, L1_IDX(USER_CODE_VA)) | MMU_NORMAL_PT_UPDATE,
          ((u64)virt_to_mfn(code_page) << PAGE_SHIFT) | PTE_P | PTE_US | PTE_A },
        { maddr_of_entry(l1, L1_IDX(USER_STACK_VA)) | MMU_NORMAL_PT_UPDATE,
          ((u64)virt_to_mfn(stack_page) << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D },
        { maddr_of_entry(l2, L2_IDX(USER_CODE_VA)) | MMU_NORMAL_PT_UPDATE,
          ((u64)virt_to_mfn(l1) << PAGE_SHIFT) | PTE_TABLE },
        { maddr_of_entry(l3, L3_IDX(USER_CODE_VA)) | MMU_NORMAL_PT_UPDATE,
          ((u64)virt_to_mfn(l2) << PAGE_SHIFT) | PTE_TABLE },
        { maddr_of_entry(l4, L4_IDX(USER_CODE_VA)) | MMU_NORMAL_PT_UPDATE,
          ((u64)virt_to_mfn(l3) << PAGE_SHIFT) | PTE_TABLE },
    };
    unsigned done = 0;
    rc = HYPERVISOR_mmu_update(req, ARRAY_SIZE(req), &done, DOMID_SELF);
    if (rc || done != ARRAY_SIZE(req))
        panic("user: mmu_update failed: %ld (done %u)", rc, done);

    struct mmuext_op ops[2] = { 0 };
    ops[0].cmd = MMUEXT_PIN_L4_TABLE;
    ops[0].arg1.mfn = virt_to_mfn(l4);
    ops[1].cmd = MMUEXT_NEW_USER_BASEPTR;
    ops[1].arg1.mfn = virt_to_mfn(l4);
    done = 0;
    rc = HYPERVISOR_mmuext_op(ops, 2, &done, DOMID_SELF);
    if (rc || done != 2)
        panic("user: mmuext_op failed: %ld (done %u)", rc, done);

    rc = HYPERVISOR_stack_switch(FLAT_KERNEL_SS, (unsigned long)user_entry_stack_top);
    if (rc)
        panic("user: stack_switch failed: %ld", rc);
}

/* Translate a user buffer to the kernel's view of the same frame. The kernel
 * page tables do not map user VAs, so only [code, stack] pages qualify. */
static const char *user_buffer(u64 va, u64 len)
{
    if (len > PAGE_SIZE) return NULL;
    if (va >= USER_CODE_VA && va + len <= USER_CODE_VA + PAGE_SIZE && va + len >= va)
        return (const char *)code_page + (va - USER_CODE_VA);
    if (va >= USER_STACK_VA && va + len <= USER_STACK_TOP && va + len >= va)
        return (const char *)stack_page + (va - USER_STACK_VA);
    return NULL;
}

static void syscall_handler(struct regs *r)
{
    switch (r->rax) {
    case SYS_write: {
        const char *p = user_buffer(r->rdi, r->rsi);
        if (!p) {
            printk("syscall: write with bad buffer 0x%lx len %lu\n", r->rdi, r->rsi);
            r->rax = (u64)-14;
            return;
        }
        char buf[256];
        unsigned n = r->rsi < sizeof(buf) - 1 ? (unsigned)r->rsi : sizeof(buf) - 1;
        memcpy(buf, p, n);
        buf[n] = 0;
        printk("user: %s\n", buf);
        r->rax = r->rsi;
        return;
    }
    case SYS_exit:
        printk("syscall: exit status=%lu\n", r->rdi);
        user_resume(&kctx, (long)r->rdi);
    default:
        printk("syscall: unknown %lu\n", r->rax);
        r->rax = (u64)-38;
        return;
    }
}

long user_run(void)
{
    int mask = irq_save();
    set_syscall_handler(syscall_handler);
    long status = user_enter(&kctx, USER_CODE_VA, USER_STACK_TOP);
    irq_restore(mask);
    return status;
}
