/* Hypercalls a Linux PV kernel uses, answered as Xen answers a domU: vcpu_op
 * (runstate/time areas, vcpu_info relocation, timers, up/down), xen_version
 * sub-ops and features, XENMEM_memory_map, grant set_version/get_status_frames,
 * and a multicall whose entry is an iret (RAX must be the one the iret set).
 * Ends with VCPUOP_down of the only vCPU, which powers the domain off. */
#include "../hostile/hostile.h"
#include "time.h"
#include <xen/grant_table.h>

struct runstate { int state; u32 pad; u64 entry; u64 time[4]; };
struct time_info { u32 version, pad0; u64 tsc_timestamp, system_time; u32 mul; s8 shift; u8 flags; u8 pad[2]; };
struct e820 { u64 addr, size; u32 type; } __attribute__((packed));

static long vop(int cmd, unsigned vcpu, void *arg) { return HYPERVISOR_vcpu_op(cmd, vcpu, arg); }

static struct runstate rs __attribute__((aligned(64)));
static volatile unsigned ticks;
static void on_timer(evtchn_port_t port, struct regs *r) { (void)port; (void)r; ticks++; }
static struct time_info ti __attribute__((aligned(64)));

/* A multicall with one entry: HYPERVISOR_iret with a context on the stack that
 * resumes at 1: with RAX = 0x1234abcd. Returns the RAX seen there. */
static u64 multicall_iret(void)
{
    static multicall_entry_t mc[1];
    mc[0].op = __HYPERVISOR_iret;
    multicall_entry_t *list = mc;
    u64 rax;
    __asm__ volatile(
        "mov %%rsp, %%r9\n"
        "sub $80, %%rsp\n"
        "and $-16, %%rsp\n"
        "movq $0x1234abcd, 0(%%rsp)\n"      /* rax */
        "movq $0, 8(%%rsp)\n"               /* r11 */
        "movq $0, 16(%%rsp)\n"              /* rcx */
        "movq $0, 24(%%rsp)\n"              /* flags */
        "lea 1f(%%rip), %%rax\n"
        "mov %%rax, 32(%%rsp)\n"            /* rip */
        "movq $0xe030, 40(%%rsp)\n"         /* cs: kernel (RPL 0 in a frame) */
        "pushfq\n popq %%rax\n"
        "mov %%rax, 48(%%rsp)\n"            /* rflags */
        "mov %%r9, 56(%%rsp)\n"             /* rsp */
        "movq $0xe02b, 64(%%rsp)\n"         /* ss */
        "mov $1, %%esi\n"
        "mov %[nr], %%eax\n"
        "syscall\n"
        "ud2\n"
        "1:\n"
        : "=&a"(rax), "+D"(list)
        : [nr] "i"(__HYPERVISOR_multicall)
        : "rsi", "rcx", "r11", "r9", "memory");
    return rax;
}

void app_main(void)
{
    traps_init();
    if (bind_virq(VIRQ_TIMER, 0, on_timer) < 0)
        panic("bind_virq");

    /* ---- vcpu_op ---- */
    result("is_up", vop(VCPUOP_is_up, 0, NULL));
    result("is_up_vcpu1", vop(VCPUOP_is_up, 1, NULL));
    result("get_physid", vop(VCPUOP_get_physid, 0, &rs));
    result("initialise", vop(VCPUOP_initialise, 0, &rs));
    struct vcpu_register_runstate_memory_area ra = { .addr.v = (void *)&rs };
    result("runstate_register", vop(VCPUOP_register_runstate_memory_area, 0, &ra));
    result("runstate_state", rs.state);
    u64 run0 = rs.time[0];
    ra.addr.v = (void *)0xffff800000000000UL;
    result("runstate_register_xen", vop(VCPUOP_register_runstate_memory_area, 0, &ra));
    ra.addr.v = (void *)&rs;
    vop(VCPUOP_register_runstate_memory_area, 0, &ra);
    /* Sleep in SCHEDOP_block until a 30 ms timer fires. The area must account for all
     * the time: sum(time[]) + (now - state_entry_time) advances exactly with the clock,
     * and the blocked part grows. A host too busy to run this vCPU for the whole timeout
     * lets the timer fire before SCHEDOP_block (which then returns at once, nothing
     * blocked): then again with twice the timeout, at most 6 times (30 ms .. 960 ms). */
    u64 n0, tot0, b0;
    u64 wait_ns = 30000000UL;
    vop(VCPUOP_stop_periodic_timer, 0, NULL);
    for (int tries = 0; ; tries++, wait_ns *= 2) {
        n0 = monotonic_ns();
        tot0 = rs.time[0] + rs.time[1] + rs.time[2] + rs.time[3] + (n0 - rs.entry);
        b0 = rs.time[2];
        unsigned ticks0 = ticks;
        struct vcpu_set_singleshot_timer st = { .timeout_abs_ns = monotonic_ns() + wait_ns };
        vop(VCPUOP_set_singleshot_timer, 0, &st);
        while (ticks == ticks0)
            sched_block();
        if (rs.time[2] > b0 || tries == 5)
            break;
    }
    u64 n1 = monotonic_ns();
    u64 tot1 = rs.time[0] + rs.time[1] + rs.time[2] + rs.time[3] + (n1 - rs.entry);
    long drift = (long)(tot1 - tot0) - (long)(n1 - n0);
    result("runstate_accounts_all_time", drift > -1000000 && drift < 1000000);
    result("runstate_blocked_grew", rs.time[2] > b0);
    result("runstate_running_after", rs.state);
    struct vcpu_runstate_info info;
    result("get_runstate_info", vop(VCPUOP_get_runstate_info, 0, &info));
    result("runstate_info_consistent", info.time[2] >= rs.time[2] && info.time[0] >= run0);

    struct vcpu_register_time_memory_area ta = { .addr.v = (void *)&ti };
    result("time_area_register", vop(13 /* VCPUOP_register_vcpu_time_memory_area */, 0, &ta));
    result("time_area_mul", ti.mul);
    result("time_area_shift", ti.shift);
    result("time_area_version_even", (ti.version & 1) == 0 && ti.version != 0);

    /* ---- the singleshot timer (periodic stopped above: every tick is its event) ----
     * common_vcpu_op: VCPU_SSHOTTMR_future is ignored (Xen >= 4.18); a deadline already
     * passed, or >= 2^63 (a negative s_time_t expiry), sends the event before the call
     * returns (its upcall has run by the next line); a far deadline is kept as it is (no
     * 100 ms clamp: that is set_timer_op's, whose 2^50 ns-ahead timeout fires in ~100 ms). */
    struct vcpu_set_singleshot_timer ss = { .timeout_abs_ns = monotonic_ns() - 1000, .flags = 1 };
    unsigned t0 = ticks;
    result("sshot_past_future_flag", vop(VCPUOP_set_singleshot_timer, 0, &ss));
    result("sshot_past_fired_at_once", ticks - t0);
    ss.timeout_abs_ns = 1UL << 63;
    ss.flags = 0;
    t0 = ticks;
    result("sshot_huge", vop(VCPUOP_set_singleshot_timer, 0, &ss));
    result("sshot_huge_fired_at_once", ticks - t0);
    result("sshot_other_vcpu", vop(VCPUOP_set_singleshot_timer, 1, &ss));
    result("sshot_bad_pointer", vop(VCPUOP_set_singleshot_timer, 0, (void *)0x1000));
    result("sshot_stop_other_vcpu", vop(VCPUOP_stop_singleshot_timer, 1, NULL));
    ss.timeout_abs_ns = monotonic_ns() + (1UL << 52);
    t0 = ticks;
    result("sshot_far", vop(VCPUOP_set_singleshot_timer, 0, &ss));
    for (u64 end = monotonic_ns() + 300000000UL; monotonic_ns() < end; )
        ;
    result("sshot_far_quiet_300ms", ticks == t0);
    /* A timer armed, then stopped: nothing fires. */
    ss.timeout_abs_ns = monotonic_ns() + 20000000UL;
    vop(VCPUOP_set_singleshot_timer, 0, &ss);
    result("sshot_stop", vop(VCPUOP_stop_singleshot_timer, 0, NULL));
    t0 = ticks;
    for (u64 end = monotonic_ns() + 150000000UL; monotonic_ns() < end; )
        ;
    result("sshot_stopped_quiet", ticks == t0);
    /* set_timer_op 2^51 ns ahead (>= 2^50): Linux's jiffy wrap, an event ~100 ms later instead. */
    t0 = ticks;
    u64 s0 = monotonic_ns();
    result("timer_op_huge", HYPERVISOR_set_timer_op(s0 + (1UL << 51)));
    while (ticks == t0 && monotonic_ns() - s0 < 5000000000UL)
        ;
    u64 waited = monotonic_ns() - s0;
    result("timer_op_huge_fired_after_100ms", ticks != t0 && waited >= 99000000UL && waited < 5000000000UL);
    HYPERVISOR_set_timer_op(0);

    /* ---- xen_version ---- */
    result("build_id", HYPERVISOR_xen_version(10, NULL));
    result("extraversion2_len", HYPERVISOR_xen_version(11, NULL));
    struct { u32 len; char buf[4]; } small = { .len = 2 };
    result("extraversion2_small", HYPERVISOR_xen_version(11, &small));
    result("commandline2", HYPERVISOR_xen_version(14, NULL));
    xen_feature_info_t fi = { .submap_idx = 0 };
    result("get_features", HYPERVISOR_xen_version(XENVER_get_features, &fi));
    printk("result features 0x%x\n", fi.submap);

    /* ---- memory map ---- */
    struct e820 map[4];
    struct xen_memory_map mm = { .nr_entries = 4 };
    set_xen_guest_handle(mm.buffer, map);
    result("memory_map", HYPERVISOR_memory_op(XENMEM_memory_map, &mm));
    result("memory_map_entries", mm.nr_entries);
    result("memory_map_ram", map[0].addr == 0 && map[0].type == 1 &&
                             map[0].size == start_info->nr_pages * PAGE_SIZE);

    /* ---- grant table versions ---- */
    struct gnttab_set_version sv = { .version = 2 };
    result("gnttab_set_v2", HYPERVISOR_grant_table_op(GNTTABOP_set_version, &sv, 1));
    result("gnttab_set_v2_version", sv.version);
    sv.version = 3;
    result("gnttab_set_v3", HYPERVISOR_grant_table_op(GNTTABOP_set_version, &sv, 1));
    sv.version = 1;
    result("gnttab_set_v1", HYPERVISOR_grant_table_op(GNTTABOP_set_version, &sv, 1));
    u64 frames[2];
    struct gnttab_get_status_frames gs = { .nr_frames = 1, .dom = DOMID_SELF };
    set_xen_guest_handle(gs.frame_list, frames);
    result("status_frames", HYPERVISOR_grant_table_op(GNTTABOP_get_status_frames, &gs, 1));
    result("status_frames_status", gs.status);
    gs.nr_frames = 0;
    HYPERVISOR_grant_table_op(GNTTABOP_get_status_frames, &gs, 1);
    result("status_frames_zero_status", gs.status);
    gs.dom = 0x1234;
    HYPERVISOR_grant_table_op(GNTTABOP_get_status_frames, &gs, 1);
    result("status_frames_bad_dom", gs.status);
    result("status_frames_count2", HYPERVISOR_grant_table_op(GNTTABOP_get_status_frames, &gs, 2));

    /* ---- multicall + iret ---- */
    printk("result multicall_iret_rax 0x%lx\n", multicall_iret());

    /* ---- vcpu_info relocation (last: this kernel's handlers read the legacy slot) ---- */
    u8 *page = alloc_page();
    struct vcpu_register_vcpu_info vi = { .mfn = virt_to_mfn(page), .offset = PAGE_SIZE - 32 };
    result("vcpu_info_cross_page", vop(VCPUOP_register_vcpu_info, 0, &vi));
    vi.offset = 68;
    result("vcpu_info_misaligned", vop(VCPUOP_register_vcpu_info, 0, &vi));
    vi.offset = PAGE_SIZE;
    result("vcpu_info_offset_page", vop(VCPUOP_register_vcpu_info, 0, &vi));
    vi.mfn = foreign_mfn(); vi.offset = 0;
    result("vcpu_info_foreign", vop(VCPUOP_register_vcpu_info, 0, &vi));
    vi.mfn = l4_mfn();
    result("vcpu_info_pagetable", vop(VCPUOP_register_vcpu_info, 0, &vi));
    vi.mfn = virt_to_mfn(page); vi.offset = 128;
    /* Events stay masked from here on: this kernel's upcall handler only knows the
     * legacy slot, and the new one starts with everything pending. */
    HYPERVISOR_shared_info->vcpu_info[0].evtchn_upcall_mask = 1;
    u8 mask = HYPERVISOR_shared_info->vcpu_info[0].evtchn_upcall_mask;
    result("vcpu_info_ok", vop(VCPUOP_register_vcpu_info, 0, &vi));
    struct vcpu_info *nv = (struct vcpu_info *)(page + 128);
    result("vcpu_info_mask_copied", nv->evtchn_upcall_mask == mask);
    result("vcpu_info_pending_set", nv->evtchn_upcall_pending);
    result("vcpu_info_time_mul", nv->time.tsc_to_system_mul);
    result("vcpu_info_again", vop(VCPUOP_register_vcpu_info, 0, &vi));

    printk("result about_to_down 1\n");
    vop(VCPUOP_down, 0, NULL);
    printk("result down_returned 1\n");
    poweroff();
}
