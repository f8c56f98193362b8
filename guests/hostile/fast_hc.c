/* Attack: the hypercalls the KVM engine completes in C (stack_switch, set_segment_base FS
 * and GS_KERNEL, HYPERVISOR_iret back to kernel mode), with hostile values, then in a
 * storm. Xen (xen/arch/x86/pv/misc-hypercalls.c, pv/iret.c): stack_switch takes any
 * value (RPL 3 forced on SS) and returns 0; set_segment_base refuses a non-canonical base
 * with -EINVAL and leaves the old one; iret to kernel mode (CS RPL != 3) takes the frame's
 * RIP/RSP/RFLAGS (never IOPL or VM, always IF) and sets the upcall mask from its IF.
 * Results: `result <key> <rc>`; fs_read/gs_read are what %fs:8 / %gs:8 read after the
 * base was set (the base took effect); iret_* report the state after one iret.
 * cmdline: storm=<n> repeats each of the three calls n times (default 100000). */
#include "hostile.h"

#define SEGBASE_FS 0
#define SEGBASE_GS_KERNEL 2

static u64 cells[4] __attribute__((aligned(16)));
static char stack[4 * PAGE_SIZE] __attribute__((aligned(16)));

static long segbase(unsigned which, u64 base)
{
    return _hypercall2(__HYPERVISOR_set_segment_base, which, base);
}

/* HYPERVISOR_iret to the next instruction, in kernel mode (CS RPL 0), with `rflags`, on
 * `rsp`; returns the RFLAGS the guest then runs with (pushf) and the RSP it landed on. */
static u64 iret_here(u64 rflags, u64 rsp, u64 *landed)
{
    u64 out, sp;
    __asm__ volatile(
        "    mov %%rsp, %%r12\n"
        "    pushq $0xe02b\n"                 /* ss */
        "    pushq %[sp]\n"                   /* rsp */
        "    pushq %[fl]\n"                   /* rflags */
        "    pushq $0xe030\n"                 /* cs: RPL 0, stay in kernel mode */
        "    leaq 1f(%%rip), %%rax\n"
        "    pushq %%rax\n"                   /* rip */
        "    pushq $0\n"                      /* flags */
        "    jmp hypercall_page + 23 * 32\n"
        "1:  pushfq\n"
        "    popq %[out]\n"
        "    mov %%rsp, %[lsp]\n"
        "    mov %%r12, %%rsp\n"
        : [out] "=&r"(out), [lsp] "=&r"(sp)
        : [fl] "r"(rflags), [sp] "r"(rsp)
        : "rax", "rcx", "r11", "r12", "memory", "cc");
    *landed = sp;
    return out;
}

void app_main(void)
{
    u64 n = cmdline_u64(cmdline(), "storm", 100000), sp;
    cells[1] = 0x1111222233334444UL;
    cells[3] = 0x5555666677778888UL;
    /* stack_switch: any value is taken (Xen does not check it). */
    result("stack_switch_huge", HYPERVISOR_stack_switch(~0UL, ~0UL));
    result("stack_switch_xen", HYPERVISOR_stack_switch(0, 0xFFFF800000000000UL));
    /* set_segment_base FS and GS_KERNEL: canonical ok and live, non-canonical -EINVAL. */
    result("fs_ok", segbase(SEGBASE_FS, (u64)&cells[0]));
    result("fs_noncanon", segbase(SEGBASE_FS, 0x0000800000000000UL));
    result("fs_top", segbase(SEGBASE_FS, 1UL << 63));
    u64 v;
    __asm__ volatile("mov %%fs:8, %0" : "=r"(v));
    result("fs_read_ok", v == cells[1]);
    result("gs_ok", segbase(SEGBASE_GS_KERNEL, (u64)&cells[2]));
    result("gs_noncanon", segbase(SEGBASE_GS_KERNEL, 0x00FF000000000000UL));
    __asm__ volatile("mov %%gs:8, %0" : "=r"(v));
    result("gs_read_ok", v == cells[3]);
    /* iret: hostile RFLAGS (IOPL 3, VM, NT, AC; IF clear) -> IOPL/VM dropped, IF forced,
     * the upcall mask set from the frame's IF. */
    u64 top = (u64)(stack + sizeof(stack) - 64);
    u64 fl = iret_here(0x3000 | 0x20000 | 0x40000 | 0x4000 | 2, top, &sp);
    int mask_if0 = HYPERVISOR_shared_info->vcpu_info[0].evtchn_upcall_mask;
    result("iret_iopl", (fl >> 12) & 3);
    result("iret_vm", !!(fl & 0x20000));
    result("iret_ac", !!(fl & 0x40000));
    result("iret_sp_ok", sp == top);
    result("iret_mask_if0", mask_if0);
    fl = iret_here(0x202, top, &sp);
    result("iret_mask_if1", HYPERVISOR_shared_info->vcpu_info[0].evtchn_upcall_mask);
    /* The storm: C completes all of it; the host and the bystander must not notice. */
    long bad = 0;
    for (u64 i = 0; i < n; i++) {
        bad |= HYPERVISOR_stack_switch(i, ~i);
        bad |= segbase(SEGBASE_FS, (u64)&cells[0] + 16 * (i & 1));
        bad |= segbase(SEGBASE_FS, 0x0000800000000000UL | i) != EINVAL_RC;
        iret_here(0x202, top, &sp);
        bad |= sp != top;
    }
    __asm__ volatile("mov %%fs:8, %0" : "=r"(v));
    result("storm_bad", bad);
    result("storm_fs_ok", v == cells[1 + 2 * ((n - 1) & 1)]);
    poweroff();
}
