/* Writable page-table stores in the forms Linux's page-table code uses, each checked
 * through the mapping it changes. fork's ptep_set_wrprotect is `lock andb $~2` on the
 * parent's (pinned, read-only) L1 entry, set_bit a `lock orb`, ptep_get_and_clear an
 * xchg, cmpxchg for the pte_update loops: only the plain mov and xchg are emulated without
 * stepping, so every other form runs as one single-stepped instruction in the hypervisor.
 *
 * The L1 entry of a hole VA `w` is rewritten `n` times. After each store and a local TLB
 * flush (as a guest must flush on Xen), the mapping must behave as the entry now says:
 *   result bounced <n>    stores into the L1 that reached our #PF handler (0: a bounce is
 *                         what made Linux Oops in copy_page_range during fork)
 *   result stale_rw <n>   writes that went through after the entry was write-protected
 *                         (or that faulted after it was made writable again)
 *   result stale_map <n>  reads through `w` that gave the frame it mapped before
 *   result dirty_lost <n> writes after the dirty bit was cleared that did not set it again
 *   result bad_entry <n>  entries whose value is not what the store should have left
 *   result rw_faults <n>  the expected faults (a write to the write-protected page)
 *
 * spins=<k> spin_ms=<ms>: instead, k times: one stepped store, a local flush (the next
 * KVM_RUN first runs the KVM engine's invalidation stub), then spin_ms of computing with no
 * exit at all (only the slice timer ends such a slice); "result spins <k>". */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "traps.h"
#include "lib.h"
#include "mm.h"
#include "time.h"

#define PTE_FRAME 0x000FFFFFFFFFF000UL
#define PAT_A 0xA0A0A0A0A0A0A0A0UL
#define PAT_B 0xB0B0B0B0B0B0B0B0UL

static volatile u64 nfaults, last_cr2, last_err;

static int on_fault(struct regs *r)
{
    if (!fixup_skip(r))
        return 0;
    nfaults++;
    last_err = r->error;
    last_cr2 = vcpu0()->arch.cr2;
    return 1;
}

/* Each one skippable instruction (a fault is recorded and execution resumes after it). */
void pt_wrprotect(volatile u64 *e);                 /* lock andb $~_PAGE_RW */
void pt_mkwrite(volatile u64 *e);                   /* lock orb $_PAGE_RW */
void pt_mkclean(volatile u64 *e);                   /* lock andb $~_PAGE_DIRTY */
u64 pt_cmpxchg(volatile u64 *e, u64 old, u64 new);  /* lock cmpxchgq: the value it found */
void data_store(volatile u64 *p, u64 v);
u64 data_load(volatile u64 *p);

__asm__(
    "    .text\n"
    "    .globl pt_wrprotect\n"
    "pt_wrprotect:\n"
    "    .pushsection .probes, \"a\"\n    .quad 8f, 9f\n    .popsection\n"
    "8:  lock andb $0xfd, (%rdi)\n"
    "9:  ret\n"
    "    .globl pt_mkwrite\n"
    "pt_mkwrite:\n"
    "    .pushsection .probes, \"a\"\n    .quad 8f, 9f\n    .popsection\n"
    "8:  lock orb $0x02, (%rdi)\n"
    "9:  ret\n"
    "    .globl pt_mkclean\n"
    "pt_mkclean:\n"
    "    .pushsection .probes, \"a\"\n    .quad 8f, 9f\n    .popsection\n"
    "8:  lock andb $0xbf, (%rdi)\n"
    "9:  ret\n"
    "    .globl pt_cmpxchg\n"
    "pt_cmpxchg:\n"
    "    mov %rsi, %rax\n"
    "    .pushsection .probes, \"a\"\n    .quad 8f, 9f\n    .popsection\n"
    "8:  lock cmpxchgq %rdx, (%rdi)\n"
    "9:  ret\n"
    "    .globl data_store\n"
    "data_store:\n"
    "    .pushsection .probes, \"a\"\n    .quad 8f, 9f\n    .popsection\n"
    "8:  movq %rsi, (%rdi)\n"
    "9:  ret\n"
    "    .globl data_load\n"
    "data_load:\n"
    "    mov $-1, %rax\n"
    "    .pushsection .probes, \"a\"\n    .quad 8f, 9f\n    .popsection\n"
    "8:  movq (%rdi), %rax\n"
    "9:  ret\n");

static void flush_local(unsigned long va)
{
    struct mmuext_op op = { .cmd = MMUEXT_INVLPG_LOCAL };
    op.arg1.linear_addr = va;
    unsigned done = 0;
    long rc = HYPERVISOR_mmuext_op(&op, 1, &done, DOMID_SELF);
    if (rc)
        panic("invlpg failed: %ld", rc);
}

static u64 bounced, stale_rw, stale_map, dirty_lost, bad_entry, rw_faults;

/* One page-table store through the read-only mapping of the L1 (a #PF there is a bounce). */
#define PT_STORE(call) do { nfaults = 0; call; if (nfaults) bounced++; } while (0)

void app_main(void)
{
    const char *cmd = (const char *)start_info->cmd_line;
    u64 n = cmdline_u64(cmd, "n", 200);
    traps_init();
    set_trap_handler(14, on_fault);

    u64 *a = alloc_page(), *b = alloc_page();
    a[0] = PAT_A;
    b[0] = PAT_B;
    unsigned long w = alloc_va_hole();
    u64 ma = kernel_pte_maddr(w);
    if (!ma)
        panic("no L1 entry for the hole");
    /* The L1 is one of the bootstrap tables: mapped read-only in the kernel's linear map. */
    volatile u64 *e = (volatile u64 *)((char *)pfn_to_virt(mfn_to_pfn(ma >> PAGE_SHIFT))
                                       + (ma & (PAGE_SIZE - 1)));
    const u64 ea = ((u64)virt_to_mfn(a) << PAGE_SHIFT) | PTE_KERNEL_RW;
    const u64 eb = ((u64)virt_to_mfn(b) << PAGE_SHIFT) | PTE_KERNEL_RW;
    long rc = map_frame(w, virt_to_mfn(a), PTE_KERNEL_RW);
    if (rc)
        panic("map_frame failed: %ld", rc);
    volatile u64 *wp = (volatile u64 *)w;

    u64 spins = cmdline_u64(cmd, "spins", 0);
    if (spins) {
        u64 spin_ns = cmdline_u64(cmd, "spin_ms", 1000) * 1000000UL;
        for (u64 k = 0; k < spins; k++) {
            PT_STORE(k & 1 ? pt_mkwrite(e) : pt_wrprotect(e));
            flush_local(w);
            u64 end = monotonic_ns() + spin_ns;
            while (monotonic_ns() < end)
                ;
        }
        printk("result bounced %lu\n", bounced);
        printk("result spins %lu\n", spins);
        poweroff();
    }

    for (u64 i = 0; i < n; i++) {
        u64 next = (i & 1) ? ea : eb;
        u64 next_pat = (i & 1) ? PAT_A : PAT_B;
        /* Use the mapping, writable: the translation is cached from here on. */
        nfaults = 0;
        data_store(wp + 1, i);
        if (nfaults)
            bad_entry++;

        /* fork's write protection of the parent's PTE. */
        PT_STORE(pt_wrprotect(e));
        if (*e & PTE_RW)
            bad_entry++;
        flush_local(w);
        nfaults = 0;
        data_store(wp + 1, ~i);
        if (!nfaults)
            stale_rw++;
        else if (last_cr2 == w + 8 && (last_err & 3) == 3)
            rw_faults++;

        /* Writable again (set_bit), then clean (clear_bit of the dirty bit): the next
         * write must mark the entry dirty again, or the guest loses track of the page. */
        PT_STORE(pt_mkwrite(e));
        flush_local(w);
        nfaults = 0;
        data_store(wp + 1, i);              /* cached writable (and dirty) again */
        if (nfaults)
            stale_rw++;
        PT_STORE(pt_mkclean(e));
        if ((*e & (PTE_D | PTE_RW)) != PTE_RW)
            bad_entry++;
        flush_local(w);
        nfaults = 0;
        data_store(wp + 1, i);
        if (nfaults)
            bad_entry++;
        if (!(*e & PTE_D))
            dirty_lost++;

        /* Retarget to the other frame (the pte_update cmpxchg loop). */
        u64 seen = *e;
        u64 found;
        PT_STORE(found = pt_cmpxchg(e, seen, next));
        if (found != seen || (*e & ~(PTE_A | PTE_D)) != (next & ~(PTE_A | PTE_D)))
            bad_entry++;
        flush_local(w);
        nfaults = 0;
        u64 got = data_load(wp);
        if (nfaults)
            bad_entry++;
        else if (got != next_pat)
            stale_map++;
    }
    printk("result bounced %lu\n", bounced);
    printk("result stale_rw %lu\n", stale_rw);
    printk("result stale_map %lu\n", stale_map);
    printk("result dirty_lost %lu\n", dirty_lost);
    printk("result bad_entry %lu\n", bad_entry);
    printk("result rw_faults %lu\n", rw_faults);
    printk("result iterations %lu\n", n);
    poweroff();
}
