/* NMIs of a PV guest (VCPUOP_send_nmi, CALLBACKTYPE_nmi, nmi_op, trap-table vector 2) as Xen
 * delivers them (x86_64/entry.S process_nmi, pv/callback.c, pv/iret.c): pending once, bounced
 * to trap_ctxt[2] at the target's next return to the guest (dropped without a handler),
 * NMIs masked from the delivery until the handler's HYPERVISOR_iret, events masked per the
 * entry's flag (always for a registered callback). vCPU 0 sends to itself and to vCPU 1,
 * which waits in SCHEDOP_poll (the NMI's kick ends it) and holds its handler until vCPU 0
 * has sent two more NMIs: they wait, as one, for its iret. Cmdline: vcpus=<n> (default 2).
 * Output: "result <name> <value>" lines, then "nmi: done" and "poweroff". */
#include "hypercall.h"
#include "console.h"
#include "events.h"
#include "lib.h"
#include "mm.h"
#include "sched.h"
#include "time.h"
#include "traps.h"
#include <xen/vcpu.h>
#include <xen/nmi.h>
#include <xen/callback.h>

#define R(name, expr) printk("result %s %ld\n", name, (long)(expr))

static u8 ap_stack[16384] __attribute__((aligned(16)));
static vcpu_guest_context_t ctx;
static evtchn_port_t ap_port;

static struct {
    volatile u64 alive, polling, in_nmi, release, spins_in_nmi, count_at_release, done;
    volatile long poll_rc;
} ap;

static volatile u64 nmi_count[2], nmi_depth[2], nmi_nested[2], nmi_mask_seen[2];

static int on_ap_stack(const struct regs *r)
{
    return (u64)r >= (u64)ap_stack && (u64)r < (u64)(ap_stack + sizeof(ap_stack));
}

static int nmi_handler(struct regs *r)
{
    int me = on_ap_stack(r);
    if (++nmi_depth[me] > 1)
        nmi_nested[me] = 1;
    nmi_count[me]++;
    nmi_mask_seen[me] = HYPERVISOR_shared_info->vcpu_info[me].evtchn_upcall_mask;
    if (me == 1 && nmi_count[1] == 1) {
        /* Hold the first NMI until vCPU 0 has sent more: they must wait for our iret. */
        ap.in_nmi = 1;
        while (!ap.release)
            ap.spins_in_nmi++;
        ap.count_at_release = nmi_count[1];
    }
    nmi_depth[me]--;
    return 1;                      /* trap_common returns with HYPERVISOR_iret */
}

static long send_nmi(unsigned vcpu) { return HYPERVISOR_vcpu_op(VCPUOP_send_nmi, vcpu, NULL); }

static long cb_register_nmi(void)
{
    struct callback_register cb = { .type = CALLBACKTYPE_nmi, .flags = 0,
                                    .address = (unsigned long)trap_nmi };
    return HYPERVISOR_callback_op(CALLBACKOP_register, &cb);
}

static long cb_unregister(u16 type)
{
    struct callback_unregister cb = { .type = type };
    return HYPERVISOR_callback_op(CALLBACKOP_unregister, &cb);
}

static long nmi_op(unsigned cmd, void *arg) { return _hypercall2(__HYPERVISOR_nmi_op, cmd, arg); }

noreturn void ap_main(void);
noreturn void ap_main(void)
{
    ap.alive = 1;
    ap.polling = 1;
    /* No timeout: only the NMI's kick (vcpu_unblock) ends this poll. */
    ap.poll_rc = evtchn_poll(ap_port, 0);
    u64 t0 = monotonic_ns();
    while (nmi_count[1] < 2 && monotonic_ns() - t0 < 10000000000UL)
        ;
    ap.done = 1;
    HYPERVISOR_vcpu_op(VCPUOP_down, 1, NULL);
    for (;;)
        sched_yield();
}

extern char ap_entry[];
__asm__(".text\n"
        "ap_entry:\n"
        "    and $-16, %rsp\n"
        "    call ap_main\n"
        "    ud2\n");

static void wait_for(volatile u64 *flag, const char *what)
{
    u64 t0 = monotonic_ns();
    while (!*flag)
        if (monotonic_ns() - t0 > 60000000000UL)
            panic("vCPU 1 never %s", what);
}

static long runstate_of(unsigned vcpu)
{
    struct vcpu_runstate_info info;
    long rc = HYPERVISOR_vcpu_op(VCPUOP_get_runstate_info, vcpu, &info);
    return rc ? rc : info.state;
}

void app_main(void)
{
    traps_init();
    set_trap_handler(2, nmi_handler);
    unsigned nr = (unsigned)cmdline_u64((const char *)start_info->cmd_line, "vcpus", 2);
    u64 dummy = 0;

    /* Refused: a non-NULL argument (Xen: -EINVAL), no such vCPU (-ENOENT). */
    R("arg_self", HYPERVISOR_vcpu_op(VCPUOP_send_nmi, 0, &dummy));
    R("arg_other", HYPERVISOR_vcpu_op(VCPUOP_send_nmi, 1, &dummy));
    R("nr", send_nmi(nr));
    /* No handler: the NMI is dropped at this hypercall's return, not kept. */
    R("self_none", send_nmi(0));
    R("cb_register", cb_register_nmi());
    R("none_count", nmi_count[0]);
    /* A registered callback: delivered at this hypercall's return, events masked. */
    HYPERVISOR_shared_info->vcpu_info[0].evtchn_upcall_mask = 0;
    R("self", send_nmi(0));
    R("self_count", nmi_count[0]);
    R("self_events_masked", nmi_mask_seen[0]);
    R("self_mask_restored", HYPERVISOR_shared_info->vcpu_info[0].evtchn_upcall_mask);
    /* Two in one multicall: one NMI, at the multicall's return, every entry run. */
    multicall_entry_t mc[3] = {
        { .op = __HYPERVISOR_vcpu_op, .args = { VCPUOP_send_nmi, 0, 0 } },
        { .op = __HYPERVISOR_xen_version, .args = { XENVER_version, 0 } },
        { .op = __HYPERVISOR_vcpu_op, .args = { VCPUOP_send_nmi, 0, 0 } },
    };
    R("mc", HYPERVISOR_multicall(mc, 3));
    R("mc_results", mc[0].result == 0 && mc[2].result == 0 && (long)mc[1].result > 0);
    R("mc_count", nmi_count[0]);
    R("cb_unregister", cb_unregister(CALLBACKTYPE_nmi));
    send_nmi(0);
    R("unregistered_count", nmi_count[0]);
    /* nmi_op: the same handler. */
    struct xennmi_callback ncb = { .handler_address = (unsigned long)trap_nmi };
    R("nmi_op_register", nmi_op(XENNMI_register_callback, &ncb));
    send_nmi(0);
    R("nmi_op_count", nmi_count[0]);
    R("nmi_op_unregister", nmi_op(XENNMI_unregister_callback, NULL));
    send_nmi(0);
    R("nmi_op_unregistered_count", nmi_count[0]);
    R("nmi_op_bad_cmd", nmi_op(7, NULL));
    R("nmi_op_efault", nmi_op(XENNMI_register_callback, (void *)0x1000));
    /* Vector 2 of the trap table is the same entry; its flags decide the event mask
     * (none here: events stay unmasked in the handler). */
    static const trap_info_t t2[] = {
        { 2, 0, FLAT_KERNEL_CS, (unsigned long)trap_nmi }, { 0, 0, 0, 0 } };
    R("trap_table", HYPERVISOR_set_trap_table(t2));
    send_nmi(0);
    R("tt_count", nmi_count[0]);
    R("tt_events_masked", nmi_mask_seen[0]);
    /* CALLBACKOP_unregister clears vector 2 whoever set it. */
    R("tt_unregister", cb_unregister(CALLBACKTYPE_nmi));
    send_nmi(0);
    R("tt_unregistered_count", nmi_count[0]);
    R("unregister_event", cb_unregister(CALLBACKTYPE_event));
    R("unregister_unknown", cb_unregister(99));
    R("self_nested", nmi_nested[0]);

    /* vCPU 1: vector 2 in its initial context (events masked by the entry's flag). */
    long p = 0;
    {
        struct evtchn_bind_ipi op = { .vcpu = 1 };
        p = HYPERVISOR_event_channel_op(EVTCHNOP_bind_ipi, &op);
        if (p == 0) p = op.port; else panic("bind_ipi: %ld", p);
    }
    ap_port = p;
    mask_evtchn(ap_port);
    memset(&ctx, 0, sizeof(ctx));
    ctx.flags = VGCF_in_kernel;
    ctx.user_regs.rip = (unsigned long)ap_entry;
    ctx.user_regs.rsp = (unsigned long)(ap_stack + sizeof(ap_stack));
    ctx.user_regs.cs = FLAT_KERNEL_CS;
    ctx.user_regs.ss = FLAT_KERNEL_SS;
    ctx.user_regs.rflags = 0x1000;
    ctx.kernel_ss = FLAT_KERNEL_SS;
    ctx.kernel_sp = (unsigned long)(ap_stack + sizeof(ap_stack));
    ctx.ctrlreg[3] = virt_to_mfn((void *)start_info->pt_base) << PAGE_SHIFT;
    ctx.trap_ctxt[2] = (trap_info_t){ 2, 4, FLAT_KERNEL_CS, (unsigned long)trap_nmi };
    HYPERVISOR_shared_info->vcpu_info[1].evtchn_upcall_mask = 1;
    R("init_1", HYPERVISOR_vcpu_op(VCPUOP_initialise, 1, &ctx));
    R("up_1", HYPERVISOR_vcpu_op(VCPUOP_up, 1, NULL));
    wait_for(&ap.polling, "reached its poll");
    u64 t0 = monotonic_ns();
    while (runstate_of(1) != RUNSTATE_blocked && monotonic_ns() - t0 < 10000000000UL)
        sched_yield();
    R("ap_blocked", runstate_of(1) == RUNSTATE_blocked);
    R("ap_before", nmi_count[1]);
    R("send_ap", send_nmi(1));
    wait_for(&ap.in_nmi, "took the NMI");
    /* Two more while vCPU 1 is in its handler: both 0, both pending as one. */
    R("send_ap_masked", send_nmi(1));
    R("send_ap_masked_again", send_nmi(1));
    /* vCPU 1 returns to the guest many times meanwhile (slices): no NMI reaches it. */
    u64 seen = ap.spins_in_nmi, moved = 0;
    t0 = monotonic_ns();
    while (moved < 5 && monotonic_ns() - t0 < 10000000000UL) {
        u64 now = ap.spins_in_nmi;
        if (now != seen) { moved++; seen = now; }
    }
    R("ap_ran_masked", moved >= 5);
    R("ap_masked_count", nmi_count[1]);
    ap.release = 1;
    wait_for(&ap.done, "finished");
    R("ap_count_at_release", ap.count_at_release);
    R("ap_count", nmi_count[1]);
    R("ap_nested", nmi_nested[1]);
    R("ap_events_masked", nmi_mask_seen[1]);
    R("ap_poll_rc", ap.poll_rc);
    R("self_count_after", nmi_count[0]);
    t0 = monotonic_ns();
    while (HYPERVISOR_vcpu_op(VCPUOP_is_up, 1, NULL) == 1 && monotonic_ns() - t0 < 10000000000UL)
        sched_yield();
    R("send_down", send_nmi(1));
    printk("nmi: done\n");
    poweroff();
}
