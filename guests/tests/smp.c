/* A second CPU: vCPU 0 brings up vCPU 1 with VCPUOP_initialise + VCPUOP_up, both run
 * at once and exchange IPIs (EVTCHNOP_bind_ipi); per-vCPU timers, multi-vCPU TLB flushes,
 * and the hostile cases (bad contexts, up of an uninitialised vCPU, ids out of range)
 * with Xen's error codes. Cmdline: vcpus=<n> (what the domain was given, default 2).
 *
 * vCPU 1 never prints (the console is vCPU 0's) and never takes an upcall (events stay
 * masked in its vcpu_info; it waits with SCHEDOP_poll): it reports through `ap`.
 * Output: "result <name> <value>" lines, then "smp: done" and "poweroff". */
#include "hypercall.h"
#include "console.h"
#include "events.h"
#include "lib.h"
#include "mm.h"
#include "sched.h"
#include "time.h"
#include "traps.h"
#include <xen/vcpu.h>

#define R(name, expr) printk("result %s %ld\n", name, (long)(expr))
#define NONCANON 0x8000000000000000UL
#define XEN_VA   0xFFFF800000001000UL      /* inside Xen's range */
#define ROUNDS   50
#define COOKIE   0x5eed0000cafe1234UL

_Static_assert(sizeof(vcpu_guest_context_t) == 5168, "x86_64 vcpu_guest_context layout");

static struct {
    volatile u64 alive;         /* rdi as vCPU 1 found it */
    volatile u64 fs_word;       /* %fs:0 (fs_base from the context) */
    volatile u64 r15;           /* r15 from the context */
    volatile u64 spins;         /* vCPU 1's busy loop progress */
    volatile u64 stop_spin;
    volatile u64 pongs;         /* IPIs vCPU 1 received and answered */
    volatile long poll_rc;
    volatile u64 sel_after_ipi; /* its vcpu_info pending_sel after the first IPI */
    volatile long timer_rc;     /* its own singleshot timer + VIRQ_TIMER */
    volatile u64 timer_ns;
    volatile u64 patch_ready, patched;
    volatile long patch_before, patch_after;   /* what patch_fn returned to vCPU 1 */
    volatile u64 ipi_patch_ready;
    volatile long ipi_patch_before, ipi_patch_after, ipi_patch_rc;   /* ipi_patch_fn, vCPU 1 */
    volatile u64 done;
} ap;

/* mov $1, %eax; ret -- vCPU 0 makes it mov $2, %eax after both vCPUs ran it. */
static u8 patch_code[16] __attribute__((aligned(16))) = { 0xb8, 1, 0, 0, 0, 0xc3 };

static long patch_fn(void)
{
    __asm__ volatile("" ::: "memory");
    return ((int (*)(void))(void *)patch_code)();
}

/* mov $1, %eax; ret -- only vCPU 1 runs it; vCPU 0 makes it mov $3, %eax, then sends an IPI. */
static u8 ipi_patch_code[16] __attribute__((aligned(16))) = { 0xb8, 1, 0, 0, 0, 0xc3 };

static long ipi_patch_fn(void)
{
    __asm__ volatile("" ::: "memory");
    return ((int (*)(void))(void *)ipi_patch_code)();
}

static evtchn_port_t ipi_to0, ipi_to1, timer1;
static u8 ap_stack[16384] __attribute__((aligned(16)));
static u64 fs_area[2] = { 0x0123456789abcdefUL, 0 };
static vcpu_guest_context_t ctx;

noreturn void ap_main(u64 cookie);
noreturn void ap_main(u64 cookie)
{
    u64 fsw, r15;
    __asm__ volatile("mov %%fs:0, %0" : "=r"(fsw));
    __asm__ volatile("mov %%r15, %0" : "=r"(r15));
    ap.fs_word = fsw;
    ap.r15 = r15;
    ap.alive = cookie;
    /* Run while vCPU 0 runs too: the scheduler interleaves both (neither blocks). */
    while (!ap.stop_spin)
        ap.spins++;
    /* Ping-pong: wait for vCPU 0's IPI, answer with one to vCPU 0. */
    for (int i = 0; i < ROUNDS; i++) {
        long rc = evtchn_poll(ipi_to1, 0);
        if (rc) { ap.poll_rc = rc; break; }
        if (i == 0)
            ap.sel_after_ipi = ACCESS_ONCE(HYPERVISOR_shared_info->vcpu_info[1].evtchn_pending_sel);
        clear_evtchn(ipi_to1);
        ap.pongs++;
        evtchn_send(ipi_to0);
    }
    /* Its own timer: singleshot 2 ms ahead, VIRQ_TIMER bound to vCPU 1. */
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 1, NULL);   /* Xen's default 10 ms */
    clear_evtchn(timer1);
    u64 t0 = monotonic_ns();
    struct vcpu_set_singleshot_timer st = { .timeout_abs_ns = t0 + 2000000, .flags = 0 };
    long rc = HYPERVISOR_vcpu_op(VCPUOP_set_singleshot_timer, 1, &st);
    if (!rc)
        rc = evtchn_poll(timer1, t0 + 1000000000UL);
    ap.timer_rc = rc ? rc : !evtchn_is_pending(timer1);
    ap.timer_ns = monotonic_ns() - t0;
    /* Code vCPU 0 rewrites after both ran it (cross-vCPU stale translations). */
    ap.patch_before = patch_fn();
    ap.patch_ready = 1;
    while (!ap.patched)
        sched_yield();
    ap.patch_after = patch_fn();
    /* Code only this vCPU ran, rewritten by vCPU 0, which then sends an IPI (as an SMP
     * kernel does after text patching): after the IPI this vCPU runs the new code. */
    clear_evtchn(ipi_to1);
    ap.ipi_patch_before = ipi_patch_fn();
    ap.ipi_patch_ready = 1;
    ap.ipi_patch_rc = evtchn_poll(ipi_to1, monotonic_ns() + 60000000000UL);
    clear_evtchn(ipi_to1);
    ap.ipi_patch_after = ipi_patch_fn();
    ap.done = 1;
    HYPERVISOR_vcpu_op(VCPUOP_down, 1, NULL);
    for (;;)
        sched_yield();
}

/* What vCPU 1 finds at its first instruction, before anything clobbers it: rax, rcx and
 * rdx from the context, and the FPU state of its fpu_ctxt (VGCF_i387_valid). */
u64 ap_rax, ap_rcx, ap_rdx, ap_xmm1;
u32 ap_mxcsr;
u16 ap_fcw;

/* The stack switch is in C: vCPU 1 enters at ap_entry with rsp = top of ap_stack. */
extern char ap_entry[];
__asm__(".text\n"
        "ap_entry:\n"
        "    mov %rax, ap_rax(%rip)\n"
        "    mov %rcx, ap_rcx(%rip)\n"
        "    mov %rdx, ap_rdx(%rip)\n"
        "    stmxcsr ap_mxcsr(%rip)\n"
        "    fnstcw ap_fcw(%rip)\n"
        "    movq %xmm1, ap_xmm1(%rip)\n"
        "    and $-16, %rsp\n"
        "    call ap_main\n"
        "    ud2\n");

static void good_context(vcpu_guest_context_t *c)
{
    memset(c, 0, sizeof(*c));
    c->flags = VGCF_in_kernel;
    c->user_regs.rip = (unsigned long)ap_entry;
    c->user_regs.rsp = (unsigned long)(ap_stack + sizeof(ap_stack));
    c->user_regs.rdi = COOKIE;
    c->user_regs.r15 = ~COOKIE;
    c->user_regs.rax = COOKIE ^ 1;
    c->user_regs.rcx = COOKIE ^ 2;
    c->user_regs.rdx = COOKIE ^ 3;
    c->flags |= VGCF_i387_valid;
    u8 *fx = (u8 *)c->fpu_ctxt.x;                     /* an FXSAVE image */
    *(u16 *)(fx + 0) = 0x27f;                        /* FCW: 53-bit precision */
    *(u32 *)(fx + 24) = 0x7f80;                      /* MXCSR: round toward zero */
    *(u32 *)(fx + 28) = 0xffff;                      /* MXCSR_MASK */
    *(u64 *)(fx + 160 + 16) = COOKIE;                /* XMM1 */
    c->user_regs.cs = FLAT_KERNEL_CS;
    c->user_regs.ss = FLAT_KERNEL_SS;
    c->user_regs.rflags = 0x1000;                    /* IOPL 1, as Linux passes */
    c->kernel_ss = FLAT_KERNEL_SS;
    c->kernel_sp = (unsigned long)(ap_stack + sizeof(ap_stack));
    c->ctrlreg[3] = virt_to_mfn((void *)start_info->pt_base) << PAGE_SHIFT;
    c->fs_base = (unsigned long)fs_area;
}

static long init1(void) { return HYPERVISOR_vcpu_op(VCPUOP_initialise, 1, &ctx); }

static long bind_ipi(unsigned vcpu)
{
    struct evtchn_bind_ipi op = { .vcpu = vcpu };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_ipi, &op);
    return rc < 0 ? rc : (long)op.port;
}

static long flush(unsigned cmd, void *mask)
{
    struct mmuext_op op = { .cmd = cmd };
    op.arg1.linear_addr = (unsigned long)&ap;
    set_xen_guest_handle(op.arg2.vcpumask, mask);
    return HYPERVISOR_mmuext_op(&op, 1, NULL, DOMID_SELF);
}

static void wait_for(volatile u64 *flag, const char *what)
{
    u64 t0 = monotonic_ns();
    while (!*flag) {
        if (monotonic_ns() - t0 > 60000000000UL)
            panic("vCPU 1 never %s", what);
    }
}

void app_main(void)
{
    traps_init();
    unsigned nr = (unsigned)cmdline_u64((const char *)start_info->cmd_line, "vcpus", 2);

    /* Out of range and not yet initialised. */
    R("is_up_0", HYPERVISOR_vcpu_op(VCPUOP_is_up, 0, NULL));
    R("is_up_1", HYPERVISOR_vcpu_op(VCPUOP_is_up, 1, NULL));
    R("is_up_nr", HYPERVISOR_vcpu_op(VCPUOP_is_up, nr, NULL));
    R("is_up_huge", HYPERVISOR_vcpu_op(VCPUOP_is_up, 0xffffffffU, NULL));
    R("up_uninit", HYPERVISOR_vcpu_op(VCPUOP_up, 1, NULL));
    good_context(&ctx);
    R("init_nr", HYPERVISOR_vcpu_op(VCPUOP_initialise, nr, &ctx));
    R("init_0", HYPERVISOR_vcpu_op(VCPUOP_initialise, 0, &ctx));
    R("init_efault", HYPERVISOR_vcpu_op(VCPUOP_initialise, 1, (void *)0x1000));
    R("bind_ipi_nr", bind_ipi(nr));
    struct vcpu_set_singleshot_timer st0 = { .timeout_abs_ns = 1 };
    R("singleshot_other", HYPERVISOR_vcpu_op(VCPUOP_set_singleshot_timer, 1, &st0));

    /* Bad contexts: each one field wrong, all -EINVAL, vCPU 1 stays down. */
    good_context(&ctx); ctx.user_regs.rip = NONCANON;          R("ctx_rip", init1());
    good_context(&ctx); ctx.user_regs.rsp = NONCANON;          R("ctx_rsp", init1());
    good_context(&ctx); ctx.kernel_sp = NONCANON;              R("ctx_kernel_sp", init1());
    good_context(&ctx); ctx.fs_base = NONCANON;                R("ctx_fs_base", init1());
    good_context(&ctx); ctx.gs_base_user = NONCANON;           R("ctx_gs_base_user", init1());
    good_context(&ctx); ctx.event_callback_eip = NONCANON;     R("ctx_event_cb", init1());
    good_context(&ctx); ctx.failsafe_callback_eip = NONCANON;  R("ctx_failsafe_cb", init1());
    good_context(&ctx); ctx.trap_ctxt[200].address = NONCANON; R("ctx_trap", init1());
    good_context(&ctx); ctx.ldt_ents = 1; ctx.ldt_base = 0x1234000UL | 8; R("ctx_ldt_align", init1());
    good_context(&ctx); ctx.ldt_ents = 8193; ctx.ldt_base = 0x1000000UL; R("ctx_ldt_ents", init1());
    good_context(&ctx); ctx.ldt_base = XEN_VA;                 R("ctx_ldt_xen", init1());
    good_context(&ctx); ctx.gdt_ents = 16 * 512 + 1;           R("ctx_gdt_ents", init1());
    good_context(&ctx); ctx.debugreg[7] = 1UL << 32;           R("ctx_dr7", init1());
    good_context(&ctx); ctx.debugreg[0] = XEN_VA;              R("ctx_dr0", init1());
    good_context(&ctx); ctx.flags = 0;                         R("ctx_user_no_cr1", init1());
    good_context(&ctx); ctx.ctrlreg[3] = 0xfffffffff000UL;     R("ctx_cr3_range", init1());
    /* CR3 naming an L1 table of the kernel (a type conflict), one naming a frame of Xen's
     * (shared_info: writable, never a page table), and CR3 0. */
    good_context(&ctx);
    ctx.ctrlreg[3] = virt_to_mfn((void *)(start_info->pt_base + PAGE_SIZE * (start_info->nr_pt_frames - 1))) << PAGE_SHIFT;
    R("ctx_cr3_l1", init1());
    good_context(&ctx); ctx.ctrlreg[3] = start_info->shared_info & PAGE_MASK; R("ctx_cr3_shinfo", init1());
    good_context(&ctx); ctx.ctrlreg[3] = 0;                    R("ctx_cr3_zero", init1());
    /* A GDT frame the guest still maps writable: refused (Xen's pv_set_gdt). */
    void *gdt = alloc_page();
    good_context(&ctx); ctx.gdt_frames[0] = virt_to_mfn(gdt); ctx.gdt_ents = 16;
    R("ctx_gdt_writable", init1());
    /* A good GDT with a bad CR3: refused, and the GDT frame's reference is dropped again
     * (it can be made writable afterwards). */
    R("gdt_readonly", make_readonly(gdt));
    good_context(&ctx); ctx.gdt_frames[0] = virt_to_mfn(gdt); ctx.gdt_ents = 16;
    ctx.ctrlreg[3] = 0xfffffffff000UL;
    R("ctx_gdt_then_cr3", init1());
    R("gdt_writable_again", map_frame((unsigned long)gdt, virt_to_mfn(gdt), PTE_KERNEL_RW));
    R("is_up_1_after_bad", HYPERVISOR_vcpu_op(VCPUOP_is_up, 1, NULL));

    /* Event channels first (vCPU 1 waits on them as soon as it runs), all masked. */
    long p0 = bind_ipi(0), p1 = bind_ipi(1);
    long t1 = bind_virq(VIRQ_TIMER, 1, NULL);
    R("bind_ipi_0_ok", p0 > 0);
    R("bind_ipi_1_ok", p1 > 0);
    R("bind_virq_timer_1_ok", t1 > 0);
    if (p0 <= 0 || p1 <= 0 || t1 <= 0)
        panic("bind failed");
    ipi_to0 = p0; ipi_to1 = p1; timer1 = t1;
    mask_evtchn(ipi_to0); mask_evtchn(timer1);
    /* ipi_to1 stays unmasked: its event marks vCPU 1's vcpu_info (its mask is set, so no
     * upcall), which vCPU 1 checks. */
    R("unmask_ipi_1", unmask_evtchn(ipi_to1));

    /* The real bring-up. */
    make_readonly(gdt);
    good_context(&ctx); ctx.gdt_frames[0] = virt_to_mfn(gdt); ctx.gdt_ents = 16;
    R("init_1", init1());
    R("init_1_again", init1());
    R("is_up_1_initialised", HYPERVISOR_vcpu_op(VCPUOP_is_up, 1, NULL));
    R("up_1", HYPERVISOR_vcpu_op(VCPUOP_up, 1, NULL));
    R("is_up_1_up", HYPERVISOR_vcpu_op(VCPUOP_is_up, 1, NULL));
    wait_for(&ap.alive, "started");
    R("ap_cookie", ap.alive == COOKIE);
    R("ap_fs_word", ap.fs_word == fs_area[0]);
    R("ap_r15", ap.r15 == ~COOKIE);
    R("ap_rax_rcx_rdx", ap_rax == (COOKIE ^ 1) && ap_rcx == (COOKIE ^ 2) && ap_rdx == (COOKIE ^ 3));
    R("ap_fcw", ap_fcw);
    R("ap_mxcsr", ap_mxcsr);
    R("ap_xmm1", ap_xmm1 == COOKIE);

    /* Both run: vCPU 0 spins without blocking and watches vCPU 1's counter move. */
    u64 seen = ap.spins, moved = 0, t0 = monotonic_ns();
    /* Until vCPU 1 moved 3 times (5 s at most): slices are bounded by wall time, so on a
     * loaded host a fixed window saw too few of its turns ("early stall"). */
    while (moved < 3 && monotonic_ns() - t0 < 5000000000UL) {
        u64 now = ap.spins;
        if (now != seen) { moved++; seen = now; }
    }
    ap.stop_spin = 1;
    R("both_ran", moved >= 3);

    /* Multi-vCPU TLB flushes. */
    unsigned long mask = 3, *bad = (unsigned long *)0x1000;
    R("flush_multi", flush(MMUEXT_TLB_FLUSH_MULTI, &mask));
    R("invlpg_multi", flush(MMUEXT_INVLPG_MULTI, &mask));
    R("flush_all", flush(MMUEXT_TLB_FLUSH_ALL, NULL));
    R("invlpg_all", flush(MMUEXT_INVLPG_ALL, NULL));
    R("flush_multi_badmask", flush(MMUEXT_TLB_FLUSH_MULTI, bad));
    /* update_va_mapping with a vcpumask pointer in flags: read after the update; an
     * unreadable one is -EFAULT. */
    void *pg = alloc_page();
    u64 pte = (virt_to_mfn(pg) << PAGE_SHIFT) | PTE_KERNEL_RW;
    R("uvm_mask", HYPERVISOR_update_va_mapping((unsigned long)pg, pte, UVMF_INVLPG | (unsigned long)&mask));
    R("uvm_badmask", HYPERVISOR_update_va_mapping((unsigned long)pg, pte, UVMF_TLB_FLUSH | (unsigned long)bad));
    R("uvm_all", HYPERVISOR_update_va_mapping((unsigned long)pg, pte, UVMF_TLB_FLUSH | UVMF_ALL));

    /* IPI ping-pong. */
    u64 ping0 = monotonic_ns();
    long bad_rc = 0;
    for (int i = 0; i < ROUNDS; i++) {
        evtchn_send(ipi_to1);
        long rc = evtchn_poll(ipi_to0, ping0 + 60000000000UL);
        if (rc || !evtchn_is_pending(ipi_to0)) { bad_rc = rc ? rc : -1; break; }
        clear_evtchn(ipi_to0);
    }
    u64 ping_ns = monotonic_ns() - ping0;
    R("ipi_rc", bad_rc);
    /* vCPU 0 rewrites code that both vCPUs ran: vCPU 1 must run the new code. */
    long mine = patch_fn();
    wait_for(&ap.patch_ready, "ran the code to patch");
    /* idle_patch=1: vCPU 0 first sleeps 2.5 s (past the hypervisor's idle release of
     * translator memory, vcpu.py _sleep) while vCPU 1 keeps its translation of the code. */
    if (cmdline_u64((const char *)start_info->cmd_line, "idle_patch", 0))
        evtchn_poll(ipi_to0, monotonic_ns() + 2500000000UL);
    ACCESS_ONCE(patch_code[1]) = 2;
    long mine_after = patch_fn();
    ap.patched = 1;
    wait_for(&ap.ipi_patch_ready, "ran the code only it runs");
    /* Past the hypervisor's bound on how often an IPI drops translations (vcpu.py
     * CODE_SYNC_S, 1 s): the IPI below must make vCPU 1 see the new code at once. */
    evtchn_poll(ipi_to0, monotonic_ns() + 1250000000UL);
    ACCESS_ONCE(ipi_patch_code[1]) = 3;
    evtchn_send(ipi_to1);
    wait_for(&ap.done, "finished");
    R("smc_self", mine == 1 && mine_after == 2);
    R("smc_other_before", ap.patch_before);
    R("smc_other_after", ap.patch_after);
    R("smc_ipi_rc", ap.ipi_patch_rc);
    R("smc_ipi_before", ap.ipi_patch_before);
    R("smc_ipi_after", ap.ipi_patch_after);
    R("ap_pongs", ap.pongs);
    R("ap_poll_rc", ap.poll_rc);
    R("ap_sel_has_ipi_word", (ap.sel_after_ipi >> (ipi_to1 / 64)) & 1);
    R("ap_timer_rc", ap.timer_rc);
    R("ap_timer_ok", ap.timer_ns >= 2000000 && ap.timer_ns < 1000000000UL);
    printk("smp: %u ipi round trips in %lu ns\n", ROUNDS, (unsigned long)ping_ns);

    /* vCPU 1 took itself down. */
    u64 w0 = monotonic_ns();
    while (HYPERVISOR_vcpu_op(VCPUOP_is_up, 1, NULL) == 1 && monotonic_ns() - w0 < 10000000000UL)
        sched_yield();
    R("is_up_1_down", HYPERVISOR_vcpu_op(VCPUOP_is_up, 1, NULL));
    printk("smp: done\n");
    /* hold=1: stay up (blocked) so a toolstack can read the console before destroying it;
     * a domain that has powered off is gone from the daemon with its console. */
    if (cmdline_u64((const char *)start_info->cmd_line, "hold", 0))
        for (;;)
            sched_block();
    poweroff();
}
