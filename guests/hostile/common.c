/* Shared helpers for the hostile guests (see hostile.h). Not a guest itself. */
#include "hostile.h"
#include "time.h"
#include "user.h"

void result(const char *key, long value) { printk("result %s %ld\n", key, value); }
void result_str(const char *key, const char *value) { printk("result %s %s\n", key, value); }

void result_done(const char *key, long rc, unsigned done)
{
    printk("result %s %ld\n", key, rc);
    printk("result %s_done %u\n", key, done);
}

const char *cmdline(void) { return (const char *)start_info->cmd_line; }

/* ---- frames ---- */
static unsigned long max_mfn_cache, min_mfn_cache = ~0UL, end_pfn_cache;

unsigned long own_pfn_of(unsigned long mfn)
{
    const unsigned long *p2m = (const unsigned long *)start_info->mfn_list;
    for (unsigned long pfn = 0; pfn < start_info->nr_pages; pfn++)
        if (p2m[pfn] == mfn) return pfn;
    return ~0UL;
}

static void scan_mfns(void)
{
    const unsigned long *p2m = (const unsigned long *)start_info->mfn_list;
    for (unsigned long pfn = 0; pfn < start_info->nr_pages; pfn++) {
        if (p2m[pfn] == ~0UL) continue;
        if (p2m[pfn] > max_mfn_cache) max_mfn_cache = p2m[pfn];
        if (p2m[pfn] < min_mfn_cache) min_mfn_cache = p2m[pfn];
    }
}

unsigned long own_max_mfn(void) { if (!max_mfn_cache) scan_mfns(); return max_mfn_cache; }
unsigned long own_min_mfn(void) { if (!max_mfn_cache) scan_mfns(); return min_mfn_cache; }

unsigned long l4_mfn(void) { return virt_to_mfn((void *)start_info->pt_base); }

/* The bootstrap tables are inside the bootstrap region, so the PFN of a table
 * frame gives its kernel VA directly. */
static const u64 *table_va(unsigned long mfn)
{
    unsigned long pfn = own_pfn_of(mfn);
    if (pfn == ~0UL) return NULL;
    if (end_pfn_cache && pfn >= end_pfn_cache) return NULL;
    return (const u64 *)pfn_to_virt(pfn);
}

u64 read_entry(unsigned long table_mfn, unsigned idx)
{
    const u64 *t = table_va(table_mfn);
    return t ? ((const volatile u64 *)t)[idx] : 0;
}

int pt_walk(unsigned long va, struct walk *w)
{
    memset(w, 0, sizeof(*w));
    static const unsigned shift[5] = { 0, 12, 21, 30, 39 };
    unsigned long mfn = l4_mfn();
    for (int lvl = 4; lvl >= 1; lvl--) {
        unsigned idx = (va >> shift[lvl]) & 511;
        w->mfn[lvl] = mfn;
        w->ma[lvl] = entry_ma(mfn, idx);
        w->e[lvl] = read_entry(mfn, idx);
        if (lvl == 1) break;
        if (!(w->e[lvl] & PTE_P)) return lvl;
        mfn = (w->e[lvl] & PTE_ADDR_MASK) >> PAGE_SHIFT;
    }
    return 0;
}

unsigned long kernel_l2_mfn(void)
{
    struct walk w;
    pt_walk(VIRT_BASE, &w);
    return w.mfn[2];
}

unsigned long mapped_end_pfn(void)
{
    if (end_pfn_cache) return end_pfn_cache;
    unsigned long l2 = kernel_l2_mfn();
    unsigned i = L2_IDX(VIRT_BASE);
    while (i < 512 && (read_entry(l2, i) & PTE_P)) i++;
    end_pfn_cache = (unsigned long)(i - L2_IDX(VIRT_BASE)) * 512;
    return end_pfn_cache;
}

void *mfn_virt(unsigned long mfn)
{
    unsigned long pfn = own_pfn_of(mfn);
    if (pfn == ~0UL || pfn >= mapped_end_pfn()) return NULL;
    return pfn_to_virt(pfn);
}

/* The user program's code frame: the page of the bootstrap region holding the copy of the
 * program that user_setup() mapped at USER_CODE_VA (not the kernel image's own copy), or
 * NULL. A test overwrites it to run code of its own in user mode. */
extern char user_prog_start[], user_prog_end[];
u8 *user_code_frame(void)
{
    unsigned long len = user_prog_end - user_prog_start;
    u8 *own = (u8 *)((unsigned long)user_prog_start & PAGE_MASK);
    for (unsigned long pfn = 0; pfn < mapped_end_pfn(); pfn++) {
        u8 *p = pfn_to_virt(pfn);
        if (p != own && !memcmp(p, user_prog_start, len))
            return p;
    }
    return 0;
}

u8 *user_install(const u8 *prog, unsigned long len)
{
    user_setup();
    u8 *code = user_code_frame();
    result("found", code != 0);
    if (!code)
        poweroff();
    memcpy(code, prog, len);
    return code;
}

long register_callback(unsigned type, unsigned long address)
{
    struct { u16 type, flags; u32 pad; u64 address; } cb = { (u16)type, 0, 0, address };
    return HYPERVISOR_callback_op(0, &cb);     /* CALLBACKOP_register */
}

unsigned free_l2_slot(void)
{
    unsigned long l2 = kernel_l2_mfn();
    for (unsigned i = 511; i > 0; i--)
        if (!(read_entry(l2, i) & PTE_P)) return i;
    panic("no free L2 slot");
}

/* ---- MMU hypercalls ---- */
long mmu1(u64 ptr, u64 val, unsigned *done)
{
    mmu_update_t req = { .ptr = ptr, .val = val };
    return HYPERVISOR_mmu_update(&req, 1, done, DOMID_SELF);
}

long mmuext1(unsigned cmd, u64 arg1, u64 arg2, unsigned *done)
{
    struct mmuext_op op;
    memset(&op, 0, sizeof(op));
    op.cmd = cmd;
    op.arg1.mfn = arg1;
    op.arg2.src_mfn = arg2;
    return HYPERVISOR_mmuext_op(&op, 1, done, DOMID_SELF);
}

long memory_op(unsigned long cmd, void *arg)
{
    return _hypercall2(__HYPERVISOR_memory_op, cmd, arg);
}

/* ---- traps ---- */
volatile long trap_vec = -1;
volatile u64 trap_err, trap_cr2, trap_rip;
volatile unsigned long trap_count;

static int recorder(struct regs *r)
{
    u64 rip = r->rip;
    if (!fixup_skip(r))
        return 0;
    trap_vec = (long)r->vector;
    trap_err = r->error;
    trap_rip = rip;
    trap_cr2 = r->vector == 14 ? vcpu0()->arch.cr2 : 0;
    trap_count++;
    return 1;
}

void hostile_traps_init(void)
{
    traps_init();
    for (unsigned v = 0; v < 32; v++)
        set_trap_handler(v, recorder);
}

void trap_clear(void)
{
    trap_vec = -1;
    trap_err = trap_cr2 = trap_rip = 0;
}

void result_trap(const char *key)
{
    if (trap_vec < 0)
        result_str(key, "none");
    else
        result(key, trap_vec);
}

/* probe_store64(p, v) / probe_load64(p): one skippable memory access each. */
__asm__(
    "    .text\n"
    "    .globl probe_store64\n"
    "probe_store64:\n"
    "    .pushsection .probes, \"a\"\n"
    "    .quad 8f, 9f\n"
    "    .popsection\n"
    "8:  movq %rsi, (%rdi)\n"
    "9:  ret\n"
    "    .globl probe_load64\n"
    "probe_load64:\n"
    "    .pushsection .probes, \"a\"\n"
    "    .quad 8f, 9f\n"
    "    .popsection\n"
    "    mov $-1, %rax\n"
    "8:  movq (%rdi), %rax\n"
    "9:  ret\n");

void mmuext1_result(const char *key, unsigned cmd, unsigned long mfn)
{
    unsigned done = 0;
    long rc = mmuext1(cmd, mfn, 0, &done);
    result_done(key, rc, done);
}

const char *cmdline_find(const char *s, const char *key)
{
    size_t n = strlen(key);
    for (; *s; s++)
        if (!strncmp(s, key, n)) return s;
    return NULL;
}

int grant_wait_flags(grant_ref_t ref, u16 mask, int set, int yield)
{
    u64 deadline = monotonic_ns() + 20000000000UL;
    while (monotonic_ns() < deadline) {
        u16 f = gnttab_flags(ref);
        if (set ? (f & mask) != 0 : (f & mask) == 0) return 1;
        if (yield) sched_yield();
    }
    return 0;
}

u64 *grant_offer_l1_page(domid_t peer, u64 pattern, long *ref)
{
    if (gnttab_init()) panic("gnttab_init");
    u64 *f = alloc_page();
    for (unsigned i = 0; i < 512; i++) f[i] = pattern + 2 * i;
    if (make_readonly(f)) panic("make_readonly");
    *ref = gnttab_grant_access(peer, virt_to_mfn(f), 0);
    if (*ref < 0) panic("grant_access");
    printk("result offer ref=%ld\n", *ref);
    return f;
}

void grant_pair_main(void (*granter)(const char *), void (*mapper)(const char *))
{
    const char *cmd = cmdline();
    const char *role = cmdline_find(cmd, "role=");
    if (role && !strncmp(role + 5, "mapper", 6))
        mapper(cmd);
    else
        granter(cmd);
}
