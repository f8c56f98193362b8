/* Attack: read another domain's vector registers. Where AVX is offered (kvm-pvm) two of these
 * run at once on one host loop thread: `role=writer` fills ymm0-ymm15 (all 256 bits) with a
 * pattern, `role=reader` clears them (vzeroall); both then yield (SCHEDOP_yield, so the other
 * domain runs in between) for `secs=` seconds and compare every ymm register with what they
 * put there after each yield. Xen switches each vCPU's whole XSAVE state: the reader never
 * sees the writer's pattern, neither sees its own registers change. Output:
 * `result offered`, `result rounds <n>`, `result changed <rounds where a register differed>`,
 * `result foreign <rounds where the reader saw the writer's pattern>`. Without the offer
 * (Unicorn) the same with the xmm registers. */
#include "hostile.h"
#include "time.h"

#define PAT 0x5a5a0000c3c3ffffUL

static u64 regs[16][4] __attribute__((aligned(32)));

#define EACH16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define LOADY(i) __asm__ volatile("vmovdqa %0, %%ymm" #i :: "m"(regs[i]));
#define STOREY(i) __asm__ volatile("vmovdqa %%ymm" #i ", %0" : "=m"(regs[i]));
#define LOADX(i) __asm__ volatile("movdqa %0, %%xmm" #i :: "m"(regs[i]));
#define STOREX(i) __asm__ volatile("movdqa %%xmm" #i ", %0" : "=m"(regs[i]));

void app_main(void)
{
    char role[16] = "";
    cmdline_str(cmdline(), "role", role, sizeof role);
    int writer = !strcmp(role, "writer");
    u64 secs = cmdline_u64(cmdline(), "secs", 3);
    int avx = enable_avx();
    result("offered", avx);
    u64 want = writer ? PAT : 0;
    unsigned words = avx ? 4 : 2;
    for (unsigned i = 0; i < 16; i++)
        for (unsigned j = 0; j < 4; j++)
            regs[i][j] = want;
    if (avx) { EACH16(LOADY) } else { EACH16(LOADX) }
    printk("ymm_spy: %s ready\n", role);
    u64 end = monotonic_ns() + secs * 1000000000UL;
    long rounds = 0, changed = 0, foreign = 0;
    while (monotonic_ns() < end) {
        HYPERVISOR_sched_op(SCHEDOP_yield, NULL);
        if (avx) { EACH16(STOREY) } else { EACH16(STOREX) }
        int ch = 0, fo = 0;
        for (unsigned i = 0; i < 16; i++)
            for (unsigned j = 0; j < words; j++) {
                ch |= regs[i][j] != want;
                fo |= !writer && regs[i][j] == PAT;
                regs[i][j] = want;
            }
        if (ch) { if (avx) { EACH16(LOADY) } else { EACH16(LOADX) } }
        changed += ch;
        foreign += fo;
        rounds++;
    }
    result("rounds", rounds);
    result("changed", changed);
    result("foreign", foreign);
    poweroff();
}
