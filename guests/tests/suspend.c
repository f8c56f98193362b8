/* Save/restore test guest: an uptime counter (timer ticks) and a memory
 * pattern whose checksum must carry across a suspend, into a new domain or a
 * cancelled one. Fills `pages=<n>` (default 64) pages with a pattern seeded
 * by the tick count at boot, then loops: on every `every=<n>` ticks (default
 * 10) it prints the uptime and the checksum; it serves suspend requests.
 * Stops after `ticks=<n>` ticks (default 0: never) with poweroff.
 * `bad_si=<mfn>`: answer a suspend request with that MFN as start_info (a
 * hostile guest: the hypervisor must refuse it) and carry on.
 * `refuse=1`: acknowledge a suspend request (clear control/shutdown) and then not
 * suspend, as Linux does when its freezer gives up; prints "suspend: acknowledged,
 * refused" and carries on.
 * `dirty=<n>`: rewrite n pages of the pattern on every tick (a busy guest for
 * live migration; the checksum then changes as it goes).
 * `balloon=<n>` (n <= 16): give back n pages (XENMEM_decrease_reservation), each
 * unmapped first so that it is freed at once, before the pattern is made:
 *   balloon: gave back mfn=<hex> pfn=<hex> rc=<n>
 * `refill=1` (with balloon): populate each pfn again (XENMEM_populate_physmap, as
 * Linux's balloon does on the way up), map its new frame where the old one was and
 * enter it in the guest's P2M; these pages are the first of the pattern:
 *   balloon: refilled pfn=<hex> mfn=<hex> rc=<n>
 * `smp=1`: vCPU 0 brings up vCPU 1 (VCPUOP_initialise + up), which counts for
 * ever in a general register (r12) and an SSE register (xmm3) at once and
 * stores the count: registers a save lost would show as a count below the
 * one in memory or two counts that differ (`bad`). Other vCPUs the domain has stay
 * down. The uptime line then ends with " ap=<count> bad=<n>".
 * `smp=2`: the same count, but vCPU 1 starts in user mode (VCPUOP_initialise
 * without VGCF_in_kernel, a user page-table root of its own) and never leaves
 * it: its count and bad count live in a user page vCPU 0 reads.
 * `smp=3`: as smp=2, but vCPU 1 starts in compatibility mode (user_regs.cs
 * FLAT_USER_CS32, as a 32-bit process runs) and stays there: its loop runs 48 ff c0,
 * `dec %eax; inc %eax` there but `inc %rax` in 64-bit mode, and adds the difference to
 * its bad count (a save or restore that loses the mode shows as bad > 0).
 *
 * `ymm=1`: where the (enlightened) CPUID offers XSAVE with AVX, the kernel enables it as
 * Linux does (CR4.OSXSAVE, XSETBV with leaf 0xd's components) and keeps a pattern in ymm7,
 * both halves, for ever (the kernel's C code uses no vector register); the uptime line
 * then ends with " ymm=<1 if ymm7 still holds it, else 0>", and at start:
 *   ymm: xcr0=<hex>     or     ymm: not offered
 * With smp=1, vCPU 1 enables XSAVE too and keeps another pattern in its ymm6; the line
 * is then "uptime: ticks=<n> sum=<hex> ymm=<0|1> ap=<count> bad=<n> ap_ymm=<0|1>".
 *
 *   suspend: ready pages=<n> sum=<hex>
 *   uptime: ticks=<n> sum=<hex>     (n = every, 2*every, ...: each milestone once)
 *   suspend: resumed rc=<0|1>
 */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "events.h"
#include "suspend.h"
#include "xenbus.h"
#include "time.h"
#include "mm.h"
#include "lib.h"
#include "traps.h"
#include <xen/memory.h>
#include <xen/vcpu.h>

static volatile u64 ticks;
static long timer_port = -1;
static u64 *pages[256];
static unsigned npages;

/* vCPU 1 (smp=1): r12 and xmm3 count together; every 2^16 rounds it stores the
 * count and yields (a hypercall clobbers only rax, rcx and r11). */
volatile u64 ap_count, ap_bad;
static u8 ap_stack[8192] __attribute__((aligned(16)));
/* The counting loop of both modes: r12 and xmm3 count together, a mismatch or a count
 * below the one in memory (COUNT) increments BAD; the count is stored every 65536. */
#define AP_COUNT_LOOP(COUNT, BAD)                                           \
        "    xor %r12d, %r12d\n"                                            \
        "    pxor %xmm3, %xmm3\n"                                           \
        "    mov $1, %eax\n"                                                \
        "    movq %rax, %xmm4\n"                                            \
        "1:  inc %r12\n"                                                    \
        "    paddq %xmm4, %xmm3\n"                                          \
        "    movq %xmm3, %rax\n"                                            \
        "    cmp %rax, %r12\n"                                              \
        "    je 2f\n"                                                       \
        "    incq " BAD "\n"                                                \
        "    movq %r12, %xmm3\n"                                            \
        "2:  test $0xffff, %r12w\n"                                         \
        "    jnz 1b\n"                                                      \
        "    cmp " COUNT ", %r12\n"                                         \
        "    jae 3f\n"                                                      \
        "    incq " BAD "\n"                                                \
        "3:  mov %r12, " COUNT "\n"
/* smp=1 ymm=1: vCPU 1 enables XSAVE itself (XCR0 is per vCPU, as Linux sets it on each
 * CPU) and keeps ap_ymm_pattern in ymm6, storing it to ap_ymm_out before each yield. */
volatile u32 ap_ymm;
volatile u64 ap_xcr0;
u64 ap_ymm_pattern[4] __attribute__((aligned(32))) = {
    0xa5a5a5a5deadbeefUL, 0x0f0f0f0f12345678UL, 0x5a5a5a5acafef00dUL, 0xf0f0f0f087654321UL };
volatile u64 ap_ymm_out[4] __attribute__((aligned(32)));
extern char ap_entry[];
__asm__(".text\n"
        "ap_entry:\n"
        "    cmpl $0, ap_ymm(%rip)\n"
        "    je 0f\n"
        "    mov %cr4, %rax\n"
        "    or $0x40000, %rax\n"                 /* CR4.OSXSAVE */
        "    mov %rax, %cr4\n"
        "    mov ap_xcr0(%rip), %eax\n"
        "    mov ap_xcr0+4(%rip), %edx\n"
        "    xor %ecx, %ecx\n"
        "    xsetbv\n"
        "    vmovdqu ap_ymm_pattern(%rip), %ymm6\n"
        "0:\n"
        AP_COUNT_LOOP("ap_count(%rip)", "ap_bad(%rip)")
        "    cmpl $0, ap_ymm(%rip)\n"
        "    je 4f\n"
        "    vmovdqu %ymm6, ap_ymm_out(%rip)\n"
        "4:  xor %edi, %edi\n"                  /* SCHEDOP_yield */
        "    xor %esi, %esi\n"
        "    call hypercall_page + 29 * 32\n"   /* __HYPERVISOR_sched_op */
        "    jmp 1b\n");

/* smp=2: the same loop as user code at AP_USER_VA, its data in a user page. */
#define AP_USER_VA   0x400000UL
#define AP_DATA_VA   0x401000UL
extern char ap_user_start[], ap_user_end[];
__asm__(".section .rodata.ap_user, \"a\"\n"
        "ap_user_start:\n"
        AP_COUNT_LOOP("0x401000", "0x401008")   /* AP_DATA_VA: count, bad */
        "    jmp 1b\n"
        "ap_user_end:\n"
        ".text\n");
/* smp=3: the 32-bit loop (every instruction means the same in both modes but 48 ff c0). */
extern char ap_user32_start[], ap_user32_end[];
__asm__(".section .rodata.ap_user, \"a\"\n"
        "ap_user32_start:\n"
        ".code32\n"
        "    mov $0x401000, %ebx\n"          /* AP_DATA_VA: count, bad */
        "1:  xor %eax, %eax\n"
        "    .byte 0x48, 0xff, 0xc0\n"       /* compat: dec/inc %eax; 64-bit: inc %rax */
        "    add %eax, 8(%ebx)\n"
        "    incl (%ebx)\n"
        "    jmp 1b\n"
        ".code64\n"
        "ap_user32_end:\n"
        ".text\n");
static volatile u64 *ap_user_data;       /* kernel view of the user data page */

/* Page tables for vCPU 1's user mode: code (read-only) and data, pinned L4. */
static unsigned long user_root(int compat)
{
    void *l4 = alloc_page(), *l3 = alloc_page(), *l2 = alloc_page(), *l1 = alloc_page();
    void *code = alloc_page(), *data = alloc_page();
    if (compat)
        memcpy(code, ap_user32_start, ap_user32_end - ap_user32_start);
    else
        memcpy(code, ap_user_start, ap_user_end - ap_user_start);
    ap_user_data = data;
    void *tables[] = { l4, l3, l2, l1 };
    for (unsigned i = 0; i < 4; i++)
        if (make_readonly(tables[i])) panic("smp=2: make_readonly failed");
#define ENTRY(t, i) ((((u64)virt_to_mfn(t) << PAGE_SHIFT) + (i) * 8) | MMU_NORMAL_PT_UPDATE)
    mmu_update_t req[] = {
        { ENTRY(l1, (AP_USER_VA >> 12) & 511), ((u64)virt_to_mfn(code) << PAGE_SHIFT) | PTE_P | PTE_US | PTE_A },
        { ENTRY(l1, (AP_DATA_VA >> 12) & 511),
          ((u64)virt_to_mfn(data) << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D },
        { ENTRY(l2, (AP_USER_VA >> 21) & 511), ((u64)virt_to_mfn(l1) << PAGE_SHIFT) | PTE_TABLE },
        { ENTRY(l3, (AP_USER_VA >> 30) & 511), ((u64)virt_to_mfn(l2) << PAGE_SHIFT) | PTE_TABLE },
        { ENTRY(l4, (AP_USER_VA >> 39) & 511), ((u64)virt_to_mfn(l3) << PAGE_SHIFT) | PTE_TABLE },
    };
#undef ENTRY
    unsigned done = 0;
    if (HYPERVISOR_mmu_update(req, ARRAY_SIZE(req), &done, DOMID_SELF) || done != ARRAY_SIZE(req))
        panic("smp=2: mmu_update failed");
    struct mmuext_op pin = { .cmd = MMUEXT_PIN_L4_TABLE };
    pin.arg1.mfn = virt_to_mfn(l4);
    if (HYPERVISOR_mmuext_op(&pin, 1, &done, DOMID_SELF)) panic("smp=2: pin failed");
    return virt_to_mfn(l4);
}

static void start_ap(int user)
{
    static vcpu_guest_context_t c;
    memset(&c, 0, sizeof(c));
    c.flags = VGCF_in_kernel | VGCF_online;
    c.user_regs.rip = (unsigned long)ap_entry;
    c.user_regs.rsp = (unsigned long)(ap_stack + sizeof(ap_stack));
    c.user_regs.cs = FLAT_KERNEL_CS;
    c.user_regs.ss = FLAT_KERNEL_SS;
    c.kernel_ss = FLAT_KERNEL_SS;
    c.kernel_sp = (unsigned long)(ap_stack + sizeof(ap_stack));
    c.ctrlreg[3] = virt_to_mfn((void *)start_info->pt_base) << PAGE_SHIFT;
    /* Data selectors the vCPU keeps (a save and restore must carry them): DS FLAT_USER_DS,
     * ES FLAT_USER_CS32, FS FLAT_USER_CS64, GS FLAT_USER_DS (all load from ring 3). */
    c.user_regs.ds = 0xe02b;
    c.user_regs.es = 0xe023;
    c.user_regs.fs = 0xe033;
    c.user_regs.gs = 0xe02b;
    if (user) {
        c.flags = VGCF_online;
        c.user_regs.rip = AP_USER_VA;
        c.user_regs.rsp = AP_DATA_VA + PAGE_SIZE;
        c.user_regs.cs = user == 2 ? FLAT_USER_CS32 : FLAT_USER_CS;
        c.user_regs.ss = FLAT_USER_SS;
        c.ctrlreg[1] = user_root(user == 2) << PAGE_SHIFT;
    }
    long rc = HYPERVISOR_vcpu_op(VCPUOP_initialise, 1, &c);
    if (rc) panic("VCPUOP_initialise(1): %ld", rc);
}

/* ymm=1: the pattern kept in ymm7 (lower and upper halves differ). */
static u64 ymm_pattern[4] __attribute__((aligned(32))) = {
    0x0123456789abcdefUL, 0x1122334455667788UL, 0xfedcba9876543210UL, 0x8877665544332211UL };
static int ymm_on;

static void ymm_init(void)
{
    u32 a, b, c, d;
    __asm__ volatile("ud2; .ascii \"xen\"; cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!(c >> 26 & 1) || !(c >> 28 & 1)) {          /* XSAVE, AVX */
        printk("ymm: not offered\n");
        return;
    }
    __asm__ volatile("ud2; .ascii \"xen\"; cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0xd), "c"(0));
    u64 xcr0 = a | (u64)d << 32, cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" :: "r"(cr4 | (1UL << 18)) : "memory");   /* OSXSAVE */
    __asm__ volatile("xsetbv" :: "c"(0), "a"((u32)xcr0), "d"((u32)(xcr0 >> 32)));
    __asm__ volatile("vmovdqu %0, %%ymm7" :: "m"(ymm_pattern));
    ymm_on = 1;
    ap_xcr0 = xcr0;
    ap_ymm = 1;
    printk("ymm: xcr0=0x%lx\n", (unsigned long)xcr0);
}

static int ymm_intact(void)
{
    u64 out[4] __attribute__((aligned(32)));
    if (!ymm_on)
        return 0;
    __asm__ volatile("vmovdqu %%ymm7, %0" : "=m"(out));
    return !memcmp(out, ymm_pattern, sizeof(out));
}

static void on_timer(evtchn_port_t port, struct regs *r) { (void)port; (void)r; ticks++; }

static void bind_timer(void)
{
    timer_port = bind_virq(VIRQ_TIMER, 0, on_timer);
    if (timer_port < 0) panic("bind_virq failed: %ld", timer_port);
    struct vcpu_set_periodic_timer p = { .period_ns = 10000000UL };
    if (HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, 0, &p)) panic("set_periodic failed");
    unmask_evtchn(timer_port);
}

static long reservation(unsigned cmd, xen_pfn_t *list)
{
    struct xen_memory_reservation r;
    memset(&r, 0, sizeof(r));
    set_xen_guest_handle(r.extent_start, list);
    r.nr_extents = 1;
    r.domid = DOMID_SELF;
    return HYPERVISOR_memory_op(cmd, &r);
}

/* All n pages are given back first, then refilled in order: the hypervisor hands the
 * last freed frame out first, so a refilled pfn gets another frame than it had. */
static unsigned balloon(unsigned n, int refill)
{
    void *va[16];
    unsigned long pfns[16];
    unsigned kept = 0;
    if (n > 16) n = 16;
    for (unsigned i = 0; i < n; i++) {
        void *p = va[i] = alloc_page();
        unsigned long mfn = virt_to_mfn(p), pfn = pfns[i] = mfn_to_pfn(mfn);
        long rc = unmap_page((unsigned long)p);
        if (rc) panic("balloon: unmap failed: %ld", rc);
        xen_pfn_t list[1] = { mfn };
        rc = reservation(XENMEM_decrease_reservation, list);
        printk("balloon: gave back mfn=0x%lx pfn=0x%lx rc=%ld\n", mfn, pfn, rc);
    }
    for (unsigned i = 0; refill && i < n && kept < npages; i++) {
        xen_pfn_t list[1] = { pfns[i] };
        long rc = reservation(XENMEM_populate_physmap, list);
        printk("balloon: refilled pfn=0x%lx mfn=0x%lx rc=%ld\n", pfns[i], list[0], rc);
        if (rc != 1) panic("balloon: populate failed");
        ((unsigned long *)start_info->mfn_list)[pfns[i]] = list[0];
        if (map_frame((unsigned long)va[i], list[0], PTE_KERNEL_RW)) panic("balloon: map failed");
        pages[kept++] = va[i];
    }
    return kept;
}

static u64 checksum(void)
{
    u64 s = 0;
    for (unsigned i = 0; i < npages; i++)
        for (unsigned j = 0; j < PAGE_SIZE / 8; j++)
            s = (s * 31) ^ pages[i][j];
    return s;
}

void app_main(void)
{
    const char *cl = (const char *)start_info->cmd_line;
    traps_init();
    npages = cmdline_u64(cl, "pages", 64);
    if (npages > 256) npages = 256;
    if (npages > 64) mm_map_all();        /* the boot mapping's spare frames are fewer */
    u64 every = cmdline_u64(cl, "every", 10) ?: 10;
    u64 stop = cmdline_u64(cl, "ticks", 0);
    u64 dirty = cmdline_u64(cl, "dirty", 0);
    bad_start_info = cmdline_u64(cl, "bad_si", 0);
    refuse_suspend = cmdline_u64(cl, "refuse", 0) != 0;
    unsigned refilled = balloon(cmdline_u64(cl, "balloon", 0), cmdline_u64(cl, "refill", 0) != 0);
    u64 smp = cmdline_u64(cl, "smp", 0);
    int ymm = cmdline_u64(cl, "ymm", 0) != 0;
    if (ymm)
        ymm_init();
    u64 seen = 0, k = 0;
    u64 seed = monotonic_ns();
    for (unsigned i = 0; i < npages; i++) {
        if (i >= refilled)
            pages[i] = alloc_page();
        for (unsigned j = 0; j < PAGE_SIZE / 8; j++)
            pages[i][j] = seed ^ ((u64)i << 32) ^ j;
    }
    if (xenbus_init()) panic("xenbus_init failed");
    if (suspend_init(bind_timer)) panic("suspend_init failed");
    printk("suspend: ready pages=%u sum=0x%lx\n", npages, checksum());
    bind_timer();
    irq_enable();
    if (smp)
        start_ap(smp - 1);
    u64 next = every;
    for (;;) {
        suspend_check(monotonic_ns() + 5000000UL);
        irq_disable();
        u64 t = ticks;
        irq_enable();
        for (; dirty && seen < t; seen++)
            for (u64 i = 0; i < dirty && npages; i++, k++)
                for (unsigned j = 0; j < PAGE_SIZE / 8; j++)
                    pages[k % npages][j]++;
        while (t >= next) {              /* every milestone, even if ticks came fast */
            if (ymm && smp == 1)
                printk("uptime: ticks=%lu sum=0x%lx ymm=%d ap=%lu bad=%lu ap_ymm=%d\n", next,
                       checksum(), ymm_intact(), ap_count, ap_bad,
                       ap_ymm && !memcmp((const void *)ap_ymm_out, ap_ymm_pattern, 32));
            else if (ymm)
                printk("uptime: ticks=%lu sum=0x%lx ymm=%d\n", next, checksum(), ymm_intact());
            else if (smp)
                printk("uptime: ticks=%lu sum=0x%lx ap=%lu bad=%lu\n", next, checksum(),
                       smp >= 2 ? ap_user_data[0] : ap_count,
                       smp >= 2 ? ap_user_data[1] : ap_bad);
            else
                printk("uptime: ticks=%lu sum=0x%lx\n", next, checksum());
            next += every;
        }
        if (stop && t >= stop)
            poweroff();
    }
}
