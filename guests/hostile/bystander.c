/* Not an attacker: the victim the attackers run next to. It maps 4 MiB of its
 * memory beyond the bootstrap region (its own L1 tables, as Mini-OS does),
 * fills it with a known pattern, prints `bystander: ready checksum=0x..`,
 * stops its periodic timer and blocks forever with no event channel bound.
 * Whenever an event wakes it, it re-verifies the memory and prints
 * `bystander: ok` (or `bystander: CORRUPTED ...` and panics).
 * cmdline: `recheck_ms=<n>` re-verify every n ms (binds VIRQ_TIMER; default 0
 * = never), `exit_after=<n>` power off after n wake-ups (default 0 = never). */
#include "hostile.h"
#include "time.h"

#define AREA_PAGES 1024UL                        /* 4 MiB */

static u64 *area;
static volatile unsigned long wakeups;
static u64 recheck_ns;

static u64 pattern(u64 i) { return (i * 0x9E3779B97F4A7C15UL) ^ 0xB7574D0A5E3C21F9UL; }

static u64 checksum(void)
{
    u64 h = 0xcbf29ce484222325UL;
    for (u64 i = 0; i < AREA_PAGES * 512; i++) {
        h ^= area[i];
        h *= 0x100000001b3UL;
    }
    return h;
}

static void map_area(void)
{
    unsigned long start = mapped_end_pfn();
    if (start + AREA_PAGES > start_info->nr_pages)
        panic("bystander needs %lu pages beyond pfn %lu (has %lu)", AREA_PAGES, start,
              start_info->nr_pages);
    unsigned long l2 = kernel_l2_mfn();
    for (unsigned t = 0; t < AREA_PAGES / 512; t++) {
        u64 *l1 = alloc_page();
        for (unsigned i = 0; i < 512; i++)
            l1[i] = ((u64)pfn_to_mfn(start + t * 512 + i) << PAGE_SHIFT) | PTE_KERNEL_RW;
        long rc = make_readonly(l1);
        if (rc) panic("make_readonly(L1): %ld", rc);
        unsigned slot = L2_IDX((unsigned long)pfn_to_virt(start + t * 512));
        rc = mmu1(entry_ma(l2, slot), ((u64)virt_to_mfn(l1) << PAGE_SHIFT) | PTE_TABLE, NULL);
        if (rc) panic("mmu_update(L2 slot %u): %ld", slot, rc);
    }
    area = pfn_to_virt(start);
}

static void on_event(evtchn_port_t port, struct regs *r)
{
    wakeups++;
    if (recheck_ns)
        HYPERVISOR_set_timer_op(monotonic_ns() + recheck_ns);
}

static void quiet(evtchn_port_t port, struct regs *r)
{
    mask_evtchn(port);          /* e.g. a console/xenstore port nobody serves */
    wakeups++;
}

void app_main(void)
{
    hostile_traps_init();
    irq_disable();
    for (unsigned p = 0; p < NR_EVTCHN_HANDLED; p++)
        set_evtchn_handler(p, quiet);
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);

    map_area();
    for (u64 i = 0; i < AREA_PAGES * 512; i++)
        area[i] = pattern(i);
    u64 sum = checksum();
    printk("bystander: ready checksum=0x%016lx\n", sum);

    recheck_ns = cmdline_u64(cmdline(), "recheck_ms", 0) * 1000000UL;
    u64 exit_after = cmdline_u64(cmdline(), "exit_after", 0);
    if (recheck_ns) {
        long port = bind_virq(VIRQ_TIMER, 0, on_event);
        if (port < 0) panic("bind_virq: %ld", port);
        unmask_evtchn(port);
        HYPERVISOR_set_timer_op(monotonic_ns() + recheck_ns);
    }

    for (;;) {
        unsigned long seen = wakeups;
        irq_disable();
        while (wakeups == seen) {
            sched_block();              /* unmasks events atomically with blocking */
            irq_disable();
        }
        u64 now = checksum();
        if (now != sum) {
            printk("bystander: CORRUPTED checksum=0x%016lx (expected 0x%016lx)\n", now, sum);
            panic("bystander memory changed");
        }
        printk("bystander: ok\n");
        if (exit_after && wakeups >= exit_after)
            poweroff();
    }
}
