/* Attack: the vcpu_time_info version (Xen's odd/even protocol) is in memory the guest
 * writes. The guest sets it to 0xffffffff, the largest u32, and makes the hypervisor
 * publish its time (VCPUOP_register_vcpu_info copies the old vcpu_info and writes the
 * time with the protocol). Xen: version_update_begin/end on a uint32_t, so the counter
 * wraps: (0xffffffff + 1) | 1 = 1 while writing, 2 after; the call returns 0 and the
 * guest runs on. The same for wc_version in shared_info (written again on a restore). */
#include "hostile.h"

void app_main(void)
{
    volatile struct vcpu_info *old = &HYPERVISOR_shared_info->vcpu_info[0];
    u8 *page = alloc_page();
    struct vcpu_register_vcpu_info vi = { .mfn = virt_to_mfn(page), .offset = 64 };

    /* This kernel's upcall handler reads the legacy slot only: keep events masked. */
    old->evtchn_upcall_mask = 1;
    HYPERVISOR_shared_info->wc_version = 0xffffffffu;
    old->time.version = 0xffffffffu;
    printk("about to register vcpu_info with time.version 0xffffffff\n");
    result("pvclock_register", HYPERVISOR_vcpu_op(VCPUOP_register_vcpu_info, 0, &vi));
    volatile struct vcpu_info *nv = (volatile struct vcpu_info *)(page + 64);
    result("pvclock_version", nv->time.version);
    result("pvclock_mul", nv->time.tsc_to_system_mul);
    result("alive", 1);
    poweroff();
}
