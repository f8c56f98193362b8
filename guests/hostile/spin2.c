/* Attack: two vCPUs that never leave guest code. vCPU 0 brings up vCPU 1 (VCPUOP_initialise
 * + VCPUOP_up) into a loop with no exit (`mode=0`: a counting loop; `mode=1`: rep movsq of
 * 1 MiB inside its own scratch buffer, again and again), then runs the same loop itself for
 * `secs=` seconds (default 3), reading the time from the pvclock only (no exit), and powers
 * off (which stops vCPU 1 too). Expected: slices end both vCPUs at their deadlines, the host
 * loop stays responsive and a neighbour's timer ticks arrive on time (Xen's credit
 * scheduler preempts a vCPU that never yields). Output: `result up 0`, `result rounds <n>`
 * (vCPU 0's loop rounds), `result ap_rounds_moved 1`. */
#include "hostile.h"
#include "time.h"
#include <xen/vcpu.h>

static u8 ap_stack[16384] __attribute__((aligned(16)));
static vcpu_guest_context_t ctx;
static volatile u64 ap_rounds;
static int mode;
static u8 scratch[1 << 20] __attribute__((aligned(4096)));

static void one_round(void)
{
    if (mode == 1) {
        /* 1 MiB of its own scratch onto itself, 8 bytes further on. */
        unsigned long n = sizeof scratch / 8 - 1;
        void *src = scratch, *dst = scratch + 8;
        __asm__ volatile("rep movsq" : "+S"(src), "+D"(dst), "+c"(n) :: "memory");
    } else {
        for (volatile int i = 0; i < 100000; i++)
            ;
    }
}

noreturn void spin2_ap(void);
noreturn void spin2_ap(void)
{
    for (;;) {
        one_round();
        ap_rounds++;
    }
}

extern char spin2_entry[];
__asm__(".text\nspin2_entry:\n    and $-16, %rsp\n    call spin2_ap\n    ud2\n");

void app_main(void)
{
    u64 secs = cmdline_u64(cmdline(), "secs", 3);
    mode = (int)cmdline_u64(cmdline(), "mode", 0);
    memset(&ctx, 0, sizeof ctx);
    ctx.flags = VGCF_in_kernel;
    ctx.user_regs.rip = (unsigned long)spin2_entry;
    ctx.user_regs.rsp = (unsigned long)(ap_stack + sizeof ap_stack);
    ctx.user_regs.cs = FLAT_KERNEL_CS;
    ctx.user_regs.ss = FLAT_KERNEL_SS;
    ctx.user_regs.rflags = 0x1000;
    ctx.kernel_ss = FLAT_KERNEL_SS;
    ctx.kernel_sp = (unsigned long)(ap_stack + sizeof ap_stack);
    ctx.ctrlreg[3] = virt_to_mfn((void *)start_info->pt_base) << PAGE_SHIFT;
    long rc = HYPERVISOR_vcpu_op(VCPUOP_initialise, 1, &ctx);
    if (!rc)
        rc = HYPERVISOR_vcpu_op(VCPUOP_up, 1, NULL);
    result("up", rc);
    printk("spin2: spinning\n");
    u64 end = monotonic_ns() + secs * 1000000000UL, rounds = 0, ap0 = ap_rounds;
    while (monotonic_ns() < end) {
        one_round();
        rounds++;
    }
    result("rounds", (long)rounds);
    result("ap_rounds_moved", ap_rounds != ap0);
    result("alive", 1);
    poweroff();
}
