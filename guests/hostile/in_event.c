/* Attack: port INs the KVM engine's host answers (not its C loop: the port is allowed by the
 * guest's I/O bitmap, not its IOPL), each completed by KVM at the next entry, while a 1 ms
 * periodic timer raises events with events unmasked. The loop makes no hypercall, so the
 * events are bounced at slice starts, after a slice that ended at such an exit. Xen completes
 * the IN before it makes the event's frame. If the hypervisor left the IN for KVM to finish
 * after the bounce, KVM put RIP back after the IN: the frame pushed, the upcall mask set,
 * the handler never run, so events stay masked and the ticks stop.
 * For `insb` (mode 0) and `in %dx,%al` (mode 1), `ms` milliseconds each:
 *   `<mode>_ticks <n>` (the handler's count: the events are bounced at slice starts, so
 *   fewer than one a millisecond), `<mode>_mask_after 0` (events unmasked at the end),
 *   `<mode>_ff 1` (the INs read all ones). */
#include "hostile.h"
#include <xen/physdev.h>
#include <xen/vcpu.h>
#include "time.h"

static volatile unsigned long ticks;
static u8 bitmap[16];                    /* ports 0-127 allowed (clear bits) */
static u8 buf[8];

static void on_tick(evtchn_port_t port, struct regs *r)
{
    (void)port; (void)r;
    ticks++;
}

static long physdev(int cmd, void *arg) { return _hypercall2(__HYPERVISOR_physdev_op, cmd, arg); }

static void poll(const char *name, int mode, u64 ms)
{
    char key[48];
    struct vcpu_set_periodic_timer p = { .period_ns = 1000000UL };
    unsigned long ff = 1;
    ticks = 0;
    HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, 0, &p);
    irq_enable();
    u64 end = monotonic_ns() + ms * 1000000UL;
    while (monotonic_ns() < end) {
        for (unsigned i = 0; i < 32; i++) {
            u8 al = 0;
            if (mode == 0) {
                u8 *d = buf;
                buf[0] = 0;
                __asm__ volatile("insb" : "+D"(d) : "d"(0x42) : "memory");
                al = buf[0];
            } else {
                __asm__ volatile("inb %%dx, %%al" : "+a"(al) : "d"(0x42));
            }
            ff &= al == 0xff;
        }
    }
    u8 mask = vcpu0()->evtchn_upcall_mask;
    irq_disable();
    HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL);
    snprintf(key, sizeof key, "%s_ticks", name);
    result(key, ticks);
    snprintf(key, sizeof key, "%s_mask_after", name);
    result(key, mask);
    snprintf(key, sizeof key, "%s_ff", name);
    result(key, ff);
}

void app_main(void)
{
    hostile_traps_init();
    irq_disable();
    struct physdev_set_iobitmap bm = { .nr_ports = 128 };
    set_xen_guest_handle(bm.bitmap, bitmap);
    result("set_iobitmap", physdev(PHYSDEVOP_set_iobitmap, &bm));
    long port = bind_virq(VIRQ_TIMER, 0, on_tick);
    if (port < 0)
        panic("bind_virq: %ld", port);
    unmask_evtchn(port);
    u64 ms = cmdline_u64(cmdline(), "ms", 300);
    poll("insb", 0, ms);
    poll("in", 1, ms);
    result("alive", 1);
    poweroff();
}
