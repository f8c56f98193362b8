/* Vector-register state of a PV guest across exits and across its own context switches.
 *
 * 1. `regs_survive_exits`: xmm0-15 (ymm0-15 where this guest's CPL-3 code can use them)
 *    hold a pattern while the vCPU takes hypercalls, events and slice ends (timer kicks on
 *    the KVM engine); the hypervisor must hand every bit back unchanged.
 * 2. `switch_intact`: what Linux does when it switches between two of its processes. The
 *    kernel saves "task A"'s registers with the mechanism its (enlightened) CPUID tells it
 *    about: XSAVE over the XCR0 it set with xsetbv, or FXSAVE when XSAVE is not offered. Task
 *    B then loads its own values, the kernel restores A, and A must read back exactly what
 *    it had. Whatever CPL-3 code can use (native CPUID and XGETBV: on kvm-pvm the host's AVX
 *    is usable, whatever the guest kernel was told) must be state the kernel can save;
 *    otherwise the upper halves of ymm registers leak from one guest process into another
 *    (Linux's console lines with 16 bytes of another process's data: issue 11).
 * Prints `result <key> <value>`; tests/test_xstate.py checks them on both engines. */
#include "console.h"
#include "sched.h"
#include "time.h"

#define CR4_OSXSAVE (1UL << 18)
#define NREGS 16

static u8 pat_a[NREGS * 32], pat_b[NREGS * 32], out[NREGS * 32];
static u8 area[4096] __attribute__((aligned(64)));
static int kernel_xsave;
static u64 kernel_xcr0 = 3;              /* x87 | SSE: what FXSAVE covers */

static void cpuid_forced(u32 leaf, u32 sub, u32 *r)
{
    __asm__ volatile("ud2; .ascii \"xen\"; cpuid"
                     : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void cpuid_native(u32 leaf, u32 sub, u32 *r)
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static u64 xgetbv0(void)
{
    u32 lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((u64)hi << 32) | lo;
}

#define REGS16(op, base) \
    __asm__ volatile(op " 0(%0), %%xmm0\n" op " 16(%0), %%xmm1\n" op " 32(%0), %%xmm2\n" \
                     op " 48(%0), %%xmm3\n" op " 64(%0), %%xmm4\n" op " 80(%0), %%xmm5\n"  \
                     op " 96(%0), %%xmm6\n" op " 112(%0), %%xmm7\n" op " 128(%0), %%xmm8\n" \
                     op " 144(%0), %%xmm9\n" op " 160(%0), %%xmm10\n" op " 176(%0), %%xmm11\n" \
                     op " 192(%0), %%xmm12\n" op " 208(%0), %%xmm13\n" op " 224(%0), %%xmm14\n" \
                     op " 240(%0), %%xmm15\n" :: "r"(base) : "memory")
#define REGS32(op, base) \
    __asm__ volatile(op " 0(%0), %%ymm0\n" op " 32(%0), %%ymm1\n" op " 64(%0), %%ymm2\n" \
                     op " 96(%0), %%ymm3\n" op " 128(%0), %%ymm4\n" op " 160(%0), %%ymm5\n" \
                     op " 192(%0), %%ymm6\n" op " 224(%0), %%ymm7\n" op " 256(%0), %%ymm8\n" \
                     op " 288(%0), %%ymm9\n" op " 320(%0), %%ymm10\n" op " 352(%0), %%ymm11\n" \
                     op " 384(%0), %%ymm12\n" op " 416(%0), %%ymm13\n" op " 448(%0), %%ymm14\n" \
                     op " 480(%0), %%ymm15\n" :: "r"(base) : "memory")
#define STORE16(base) \
    __asm__ volatile("movdqu %%xmm0, 0(%0)\nmovdqu %%xmm1, 16(%0)\nmovdqu %%xmm2, 32(%0)\n" \
                     "movdqu %%xmm3, 48(%0)\nmovdqu %%xmm4, 64(%0)\nmovdqu %%xmm5, 80(%0)\n" \
                     "movdqu %%xmm6, 96(%0)\nmovdqu %%xmm7, 112(%0)\nmovdqu %%xmm8, 128(%0)\n" \
                     "movdqu %%xmm9, 144(%0)\nmovdqu %%xmm10, 160(%0)\nmovdqu %%xmm11, 176(%0)\n" \
                     "movdqu %%xmm12, 192(%0)\nmovdqu %%xmm13, 208(%0)\nmovdqu %%xmm14, 224(%0)\n" \
                     "movdqu %%xmm15, 240(%0)\n" :: "r"(base) : "memory")
#define STORE32(base) \
    __asm__ volatile("vmovdqu %%ymm0, 0(%0)\nvmovdqu %%ymm1, 32(%0)\nvmovdqu %%ymm2, 64(%0)\n" \
                     "vmovdqu %%ymm3, 96(%0)\nvmovdqu %%ymm4, 128(%0)\nvmovdqu %%ymm5, 160(%0)\n" \
                     "vmovdqu %%ymm6, 192(%0)\nvmovdqu %%ymm7, 224(%0)\nvmovdqu %%ymm8, 256(%0)\n" \
                     "vmovdqu %%ymm9, 288(%0)\nvmovdqu %%ymm10, 320(%0)\nvmovdqu %%ymm11, 352(%0)\n" \
                     "vmovdqu %%ymm12, 384(%0)\nvmovdqu %%ymm13, 416(%0)\nvmovdqu %%ymm14, 448(%0)\n" \
                     "vmovdqu %%ymm15, 480(%0)\n" :: "r"(base) : "memory")

static void load_regs(const u8 *p, int ymm)
{
    if (ymm)
        REGS32("vmovdqu", p);
    else
        REGS16("movdqu", p);
}

static void store_regs(u8 *p, int ymm)
{
    if (ymm)
        STORE32(p);
    else
        STORE16(p);
}

/* The guest kernel's context save/restore, as Linux picks it from its CPUID. */
static void save_ctx(void)
{
    if (kernel_xsave)
        __asm__ volatile("xsave64 (%0)" :: "r"(area), "a"((u32)kernel_xcr0),
                         "d"((u32)(kernel_xcr0 >> 32)) : "memory");
    else
        __asm__ volatile("fxsave64 (%0)" :: "r"(area) : "memory");
}

static void restore_ctx(void)
{
    if (kernel_xsave)
        __asm__ volatile("xrstor64 (%0)" :: "r"(area), "a"((u32)kernel_xcr0),
                         "d"((u32)(kernel_xcr0 >> 32)) : "memory");
    else
        __asm__ volatile("fxrstor64 (%0)" :: "r"(area) : "memory");
}

/* Exits of every kind for `ms` milliseconds and at least `rounds` rounds: hypercalls (a
 * yield every 64 rounds), and slices that end while the vCPU computes (timer kicks on KVM).
 * No SSE register is touched (-mgeneral-regs-only). */
static unsigned busy(unsigned ms, unsigned rounds)
{
    u64 end = monotonic_ns() + (u64)ms * 1000000;
    unsigned n = 0;
    while (n < rounds || monotonic_ns() < end) {
        if (n++ % 64 == 0)
            sched_yield();
        for (volatile unsigned i = 0; i < 20000; i++)
            ;
    }
    return n;
}

static int same(const u8 *a, const u8 *b, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        if (a[i] != b[i]) {
            printk("result first_diff %u\n", i);
            return 0;
        }
    return 1;
}

static u64 read_cr4(void)
{
    u64 v;
    __asm__ volatile("mov %%cr4, %0" : "=r"(v));
    return v;
}

static void write_cr4(u64 v)
{
    __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory");
}

void app_main(void)
{
    u32 r[4];
    for (unsigned i = 0; i < sizeof(pat_a); i++) {
        pat_a[i] = (u8)(0x41 + i % 26);          /* "console text" */
        pat_b[i] = (u8)(i * 7 + 1) & 0x1f;       /* another process's binary data */
    }
    cpuid_forced(1, 0, r);
    kernel_xsave = r[2] >> 26 & 1;
    /* Linux's PV start (xen_check_xsave) keeps XSAVE only if OSXSAVE shows with it before
     * the kernel set CR4.OSXSAVE (Xen's leak into the enlightened view). */
    printk("result kernel_osxsave_early %u\n", r[2] >> 27 & 1);
    cpuid_native(1, 0, r);
    int native_osxsave = r[2] >> 27 & 1, native_avx = r[2] >> 28 & 1;
    u64 hw_xcr0 = native_osxsave ? xgetbv0() : 3;
    int ymm = native_avx && (hw_xcr0 & 6) == 6;
    if (kernel_xsave) {                      /* what Linux's fpu__init_cpu_xstate does */
        cpuid_forced(0xd, 0, r);
        kernel_xcr0 = r[0] | (u64)r[3] << 32;
        write_cr4(read_cr4() | CR4_OSXSAVE);
        __asm__ volatile("xsetbv" :: "c"(0), "a"((u32)kernel_xcr0), "d"((u32)(kernel_xcr0 >> 32)));
        cpuid_forced(0xd, 0, r);
        printk("result xsave_size %u\n", r[1]);
    }
    printk("result kernel_xsave %d\n", kernel_xsave);
    printk("result kernel_xcr0 0x%lx\n", (unsigned long)kernel_xcr0);
    printk("result ymm_usable %d\n", ymm);
    unsigned width = ymm ? 32 : 16;

    load_regs(pat_a, ymm);
    unsigned n = busy(40, 200);
    store_regs(out, ymm);
    printk("result busy_rounds %u\n", n);
    printk("result regs_survive_exits %d\n", same(out, pat_a, NREGS * width));

    int intact = 1;
    for (int round = 0; round < 4 && intact; round++) {
        load_regs(pat_a, ymm);              /* task A */
        save_ctx();                          /* switch A -> B */
        load_regs(pat_b, ymm);              /* task B runs */
        busy(5, 65);
        restore_ctx();                       /* switch B -> A */
        store_regs(out, ymm);
        intact = same(out, pat_a, NREGS * width);
    }
    printk("result switch_intact %d\n", intact);
    poweroff();
}
