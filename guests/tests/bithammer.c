/* Event-bit hammer for the locked-update test (tests/test_kvm_vthread.py): the guest owns
 * pending bit 80 and toggles it with locked bts/btr, checking every old value, and clears
 * the host's bits 81..87 of the same byte with a locked and (as an event scan does), while
 * the host sets 81..87 (masked) as fast as it can. A host that sets its bits with a plain
 * byte read-modify-write, racing the guest on another core, brings back a bit the guest
 * cleared or loses one it set: the guest's next locked op sees the wrong old value. Runs
 * secs=<n> seconds of pvclock time, then prints the counts and powers off. */
#include "os.h"
#include "console.h"
#include "lib.h"
#include "sched.h"
#include "time.h"

#define OWN 80

void app_main(void)
{
    u64 secs = cmdline_u64((const char *)start_info->cmd_line, "secs", 2);
    volatile u8 *pend = (volatile u8 *)HYPERVISOR_shared_info->evtchn_pending + OWN / 8;
    volatile u8 *mask = (volatile u8 *)HYPERVISOR_shared_info->evtchn_mask + OWN / 8;
    u64 lost_clear = 0, lost_set = 0, iters = 0, host_bits = 0;
    __atomic_fetch_or(mask, 0xFF, __ATOMIC_SEQ_CST);       /* ports 80..87: no upcalls */
    __atomic_fetch_and(pend, 0x00, __ATOMIC_SEQ_CST);
    u64 end = monotonic_ns() + secs * 1000000000UL;
    printk("bithammer: ready\n");
    for (;;) {
        for (int i = 0; i < 4096; i++) {
            if (__atomic_fetch_or(pend, 1, __ATOMIC_SEQ_CST) & 1)
                lost_clear++;          /* our clear was undone */
            u8 old = __atomic_fetch_and(pend, 0x00, __ATOMIC_SEQ_CST);
            if (!(old & 1))
                lost_set++;            /* our set was undone */
            host_bits += old >> 1 ? 1 : 0;
        }
        iters += 4096;
        if (monotonic_ns() >= end)
            break;
    }
    printk("bithammer: done iters=%lu host_bits=%lu lost_clear=%lu lost_set=%lu\n",
           iters, host_bits, lost_clear, lost_set);
    poweroff();
}
