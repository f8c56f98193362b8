/* Check across a save/restore: the upper halves of the ymm registers, where the PV CPUID
 * offers XSAVE and AVX (kvm-pvm). The guest enables AVX (CR4.OSXSAVE, XSETBV 7), puts a
 * pattern in all 256 bits of ymm3, prints `ymm: ready`, and serves a suspend request
 * (guests/kernel/suspend.c; nothing on the way touches vector registers). After the resume
 * in the new domain it prints `result ymm_low_ok` and `result ymm_high_ok`. Xen carries the
 * whole XSAVE area in the X86_PV_VCPU_XSAVE record: both 1. Without the offer (Unicorn):
 * `result offered 0` and the xmm half only. */
#include "hostile.h"
#include "suspend.h"
#include "time.h"

static u64 pattern[4] __attribute__((aligned(32))) = {
    0x0123456789abcdefUL, 0xfedcba9876543210UL, 0x1111222233334444UL, 0x5555666677778888UL };
static u64 back[4] __attribute__((aligned(32)));

void app_main(void)
{
    int avx = enable_avx();
    result("offered", avx);
    if (avx) {
        __asm__ volatile("vmovdqa %0, %%ymm3" :: "m"(pattern));
    } else {
        __asm__ volatile("movdqa %0, %%xmm3" :: "m"(pattern));
    }
    suspend_init(NULL);
    printk("ymm: ready\n");
    for (;;) {
        int rc = suspend_check(monotonic_ns() + 20000000UL);
        if (rc == 0)
            break;
    }
    if (avx)
        __asm__ volatile("vmovdqa %%ymm3, %0" : "=m"(back));
    else
        __asm__ volatile("movdqa %%xmm3, %0" : "=m"(back));
    result("ymm_low_ok", back[0] == pattern[0] && back[1] == pattern[1]);
    if (avx)
        result("ymm_high_ok", back[2] == pattern[2] && back[3] == pattern[3]);
    poweroff();
}
