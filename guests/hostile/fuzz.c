/* Attack: random hypercalls. A seeded xorshift64* PRNG (cmdline `seed=<n>`,
 * default 1; `calls=<n>` default 10000; `verbose=1` prints every call) picks
 * hypercall numbers 0..63 and arguments from classes: 0, small ints, random
 * 64-bit values, pointers into a scratch buffer of garbage (between unmapped
 * guard pages), bad pointers (unmapped, non-canonical, Xen's area), read-only
 * kernel VAs (its bootstrap page tables) and interesting constants.
 *
 * So that it keeps its handlers and does not simply kill itself, it never
 * calls: set_trap_table (0), set_callbacks (4), iret (23), callback_op (30),
 * nmi_op (28); sched_op (29) / sched_op_compat (6) with block, shutdown, poll
 * or watchdog; vcpu_op down of vCPU 0 or send_nmi; console_io writes are
 * made with count 0. Batch/pointer hypercalls (mmu_update, mmuext_op,
 * multicall, memory_op, set_gdt, grant_table_op, ...) only get the scratch
 * buffer or bad pointers, and every scratch word that names one of its own
 * frames (as an MFN or a machine address) gets bit 62 set; update_va_mapping
 * targets in the kernel half are folded into the (unmapped) user half. So no
 * call can legally modify its own memory or mappings: any change is a bug.
 *
 * Prints `fuzz: <n>` every 1000 calls, then `result fuzz_calls <n>`,
 * `result fuzz_hash 0x<FNV-1a of all return values>`, counts per return
 * class, and powers off. Being crashed by the hypervisor is allowed. */
#include "hostile.h"

#define SCRATCH_PAGES 2
#define SCRATCH_WORDS (SCRATCH_PAGES * PAGE_SIZE / 8)

/* guard | scratch | guard */
static u64 region[(SCRATCH_PAGES + 2) * PAGE_SIZE / 8]
    __attribute__((aligned(PAGE_SIZE), section(".bss.page_aligned")));
#define scratch (region + PAGE_SIZE / 8)

static u64 rs;
static u64 rnd(void)
{
    rs ^= rs >> 12; rs ^= rs << 25; rs ^= rs >> 27;
    return rs * 0x2545F4914F6CDD1DUL;
}

static unsigned long own_lo, own_hi, foreign;

static u64 sanitize(u64 w)
{
    if ((w >= own_lo && w <= own_hi) || ((w >> 12) >= own_lo && (w >> 12) <= own_hi))
        w |= 1UL << 62;
    return w;
}

static u64 scratch_ptr(void) { return (u64)&scratch[rnd() % (SCRATCH_WORDS - 8)]; }

static u64 bad_ptr(void)
{
    static const u64 bad[] = { 0x1000, 0x8000000000000000UL, XEN_PRIV_VA, M2P_VA,
                               ~0UL, 0x400000, 0x00007ffffffff000UL, XEN_DMAP_VA };
    return bad[rnd() % ARRAY_SIZE(bad)];
}

static u64 ro_kernel_ptr(void)
{
    return start_info->pt_base + (rnd() % (start_info->nr_pt_frames * PAGE_SIZE) & ~7UL);
}

static u64 interesting(void)
{
    u64 v[] = { DOMID_SELF, foreign, foreign << PAGE_SHIFT | PTE_KERNEL_RW, 0x7fffffff,
                0xffffffff, 1UL << 63, ~0UL, 1, DOMID_XEN, 0x7ff1, 512, 4096 };
    return v[rnd() % ARRAY_SIZE(v)];
}

enum { A_ZERO, A_SMALL, A_RANDOM, A_SCRATCH, A_BAD, A_CONST, A_RO_KERNEL, A_NCLASS };

static u64 arg(int allow_ro)
{
    for (;;) {
        switch (rnd() % A_NCLASS) {
        case A_ZERO: return 0;
        case A_SMALL: return rnd() % 64;
        case A_RANDOM: return rnd();
        case A_SCRATCH: return scratch_ptr();
        case A_BAD: return bad_ptr();
        case A_CONST: return interesting();
        case A_RO_KERNEL: if (allow_ro) return ro_kernel_ptr(); break;
        }
    }
}

/* A pointer for hypercalls that read structures (or write counts) through it. */
static u64 safe_ptr(void)
{
    switch (rnd() % 4) {
    case 0: return 0;
    case 1: return bad_ptr();
    default: return scratch_ptr();
    }
}

static void fill_scratch(void)
{
    for (unsigned i = 0; i < SCRATCH_WORDS; i++) {
        u64 w;
        switch (rnd() % 8) {
        case 0: case 1: case 2: w = rnd(); break;
        case 3: case 4: w = rnd() % 64; break;
        case 5: w = interesting(); break;
        case 6: w = scratch_ptr(); break;
        default: w = 0; break;
        }
        scratch[i] = sanitize(w);
    }
}

static int in_scratch(u64 p)
{
    return p >= (u64)scratch && p < (u64)(scratch + SCRATCH_WORDS);
}

/* mmuext_op: mostly real command numbers in each 24-byte op. */
static void shape_mmuext(u64 p)
{
    for (u64 *w = (u64 *)p; w + 3 <= scratch + SCRATCH_WORDS; w += 3)
        if (rnd() % 4)
            *w = (*w & ~0xffffffffUL) | (rnd() % 22);
}

/* multicall: every reachable entry gets a harmless op. */
static void shape_multicall(u64 p)
{
    static const u64 ops[] = { 17, 11, 57, 15, 9, 13, 38, 127 };
    for (u64 *w = (u64 *)p; w + 8 <= scratch + SCRATCH_WORDS; w += 8)
        w[0] = (rnd() % 4) ? ops[rnd() % ARRAY_SIZE(ops)] : rnd() | (1UL << 40);
}

static unsigned long db_traps;
static int db_handler(struct regs *r) { db_traps++; return 1; }   /* trap: rip is past */

static u64 hash = 0xcbf29ce484222325UL;
static unsigned long n_zero, n_pos, n_einval, n_efault, n_enosys, n_eperm, n_esrch,
    n_eacces, n_ebusy, n_other, redraws;

static void account(long ret)
{
    u64 v = (u64)ret;
    for (int i = 0; i < 8; i++) {
        hash ^= (v >> (8 * i)) & 0xff;
        hash *= 0x100000001b3UL;
    }
    if (ret == 0) n_zero++;
    else if (ret > 0) n_pos++;
    else if (ret == -22) n_einval++;
    else if (ret == -14) n_efault++;
    else if (ret == -38) n_enosys++;
    else if (ret == -1) n_eperm++;
    else if (ret == -3) n_esrch++;
    else if (ret == -13) n_eacces++;
    else if (ret == -16) n_ebusy++;
    else n_other++;
}

/* Returns 0 if (nr, a) must not be issued. */
static int shape(unsigned nr, u64 a[5])
{
    unsigned cmd = (unsigned)a[0];
    switch (nr) {
    case 0: case 4: case 23: case 28: case 30:
        return 0;
    case 6: case 29:                    /* block, shutdown, poll, watchdog */
        if (cmd == 1 || cmd == 2 || cmd == 3 || cmd == 6) return 0;
        if (nr == 29) a[1] = safe_ptr();
        return 1;
    case 24:                            /* vcpu_op: down(0), send_nmi */
        if ((cmd == VCPUOP_down && (unsigned)a[1] == 0) || cmd == VCPUOP_send_nmi) return 0;
        a[2] = safe_ptr();
        return 1;
    case 18:                            /* console_io: no garbage on the console */
        if (cmd == CONSOLEIO_write) a[1] = 0;
        return 1;
    case 1:                             /* mmu_update(reqs, count, done, dom) */
        a[0] = safe_ptr(); a[2] = safe_ptr();
        return 1;
    case 26:                            /* mmuext_op(ops, count, done, dom) */
        a[0] = safe_ptr(); a[2] = safe_ptr();
        if (in_scratch(a[0])) shape_mmuext(a[0]);
        return 1;
    case 13:                            /* multicall(list, n) */
        a[0] = safe_ptr();
        if (in_scratch(a[0])) shape_multicall(a[0]);
        return 1;
    case 14: case 22:                   /* update_va_mapping(va, pte, flags[, dom]) */
        if (a[0] >= VIRT_BASE) a[0] &= 0x00007fffffffffffUL;
        a[1] = sanitize(a[1]);
        return 1;
    case 10:                            /* update_descriptor(maddr, desc) */
        a[0] = sanitize(a[0]);
        return 1;
    case 2:                             /* set_gdt(frames, entries) */
        a[0] = safe_ptr();
        return 1;
    case 12: case 16: case 19: case 20: case 21: case 25: case 27: case 31:
    case 33: case 34: case 35: case 36: case 37: case 39: case 40: case 41: case 42:
        /* pointer in arg 1 (or 0 for the single-pointer calls) */
        if (nr == 16 || nr == 19 || nr == 27 || nr == 35 || nr == 36) a[0] = safe_ptr();
        else a[1] = safe_ptr();
        if (nr == 20) a[2] = a[2] % 8;      /* grant_table_op count */
        return 1;
    default:
        return 1;
    }
}

void app_main(void)
{
    hostile_traps_init();
    set_trap_handler(1, db_handler);
    irq_disable();

    u64 seed = cmdline_u64(cmdline(), "seed", 1);
    u64 calls = cmdline_u64(cmdline(), "calls", 10000);
    int verbose = (int)cmdline_u64(cmdline(), "verbose", 0);
    rs = seed * 0x9E3779B97F4A7C15UL + 0x632BE59BD9B4E019UL;
    if (!rs) rs = 1;
    own_lo = own_min_mfn();
    own_hi = own_max_mfn();
    foreign = foreign_mfn();
    long rc;
    if ((rc = unmap_page((unsigned long)region)) ||
        (rc = unmap_page((unsigned long)(scratch + SCRATCH_WORDS))))
        panic("unmapping guard pages: %ld", rc);
    printk("fuzz: seed=%lu calls=%lu own_mfns=0x%lx-0x%lx\n", seed, calls, own_lo, own_hi);

    for (u64 i = 0; i < calls; i++) {
        unsigned nr;
        u64 a[5];
        for (;;) {
            nr = rnd() % 64;
            int ro = nr == 17 || nr == 18 || nr == 32;
            for (int k = 0; k < 5; k++) a[k] = arg(ro);
            fill_scratch();
            if (shape(nr, a)) break;
            redraws++;
        }
        if (verbose)
            printk("fuzz: #%lu nr=%u a=0x%lx 0x%lx 0x%lx 0x%lx 0x%lx\n",
                   i, nr, a[0], a[1], a[2], a[3], a[4]);
        long ret;
        switch (nr) {
#define C(n) case n: ret = _hypercall5(n, a[0], a[1], a[2], a[3], a[4]); break;
        C(0) C(1) C(2) C(3) C(4) C(5) C(6) C(7) C(8) C(9) C(10) C(11) C(12) C(13) C(14) C(15)
        C(16) C(17) C(18) C(19) C(20) C(21) C(22) C(23) C(24) C(25) C(26) C(27) C(28) C(29)
        C(30) C(31) C(32) C(33) C(34) C(35) C(36) C(37) C(38) C(39) C(40) C(41) C(42) C(43)
        C(44) C(45) C(46) C(47) C(48) C(49) C(50) C(51) C(52) C(53) C(54) C(55) C(56) C(57)
        C(58) C(59) C(60) C(61) C(62) C(63)
#undef C
        default: ret = 0; break;
        }
        if (verbose)
            printk("fuzz: #%lu -> %ld\n", i, ret);
        account(ret);
        irq_disable();                  /* whatever the call did, stay masked */
        if ((i + 1) % 1000 == 0)
            printk("fuzz: %lu\n", i + 1);
    }
    _hypercall2(__HYPERVISOR_set_debugreg, 7, 0);

    result("fuzz_calls", (long)calls);
    printk("result fuzz_hash 0x%016lx\n", hash);
    result("fuzz_redraws", redraws);
    result("fuzz_ret_zero", n_zero);
    result("fuzz_ret_positive", n_pos);
    result("fuzz_ret_einval", n_einval);
    result("fuzz_ret_efault", n_efault);
    result("fuzz_ret_enosys", n_enosys);
    result("fuzz_ret_eperm", n_eperm);
    result("fuzz_ret_esrch", n_esrch);
    result("fuzz_ret_eacces", n_eacces);
    result("fuzz_ret_ebusy", n_ebusy);
    result("fuzz_ret_other", n_other);
    result("fuzz_db_traps", db_traps);
    poweroff();
}
