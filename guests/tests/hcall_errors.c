/* Error paths: unknown hypercalls (-ENOSYS), bad guest pointers (-EFAULT),
 * unknown sub-ops and invalid arguments. */
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "traps.h"

#define BAD_VA   0x1000UL                 /* unmapped */
#define NONCANON 0x8000000000000000UL     /* non-canonical */

static long raw_syscall(long nr)
{
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr)
                     : "rcx", "r11", "rdi", "rsi", "rdx", "r10", "r8", "r9", "memory");
    return ret;
}

#define R(name, expr) printk("result %s %ld\n", name, (long)(expr))

void app_main(void)
{
    traps_init();

    R("enosys_11", _hypercall0(11));
    R("enosys_57", _hypercall0(57));
    R("enosys_127", _hypercall0(127));
    R("enosys_1000", raw_syscall(1000));

    R("efault_console_io", HYPERVISOR_console_io(CONSOLEIO_write, 16, (const char *)BAD_VA));
    R("efault_console_io_noncanon", HYPERVISOR_console_io(CONSOLEIO_write, 16, (const char *)NONCANON));
    R("efault_set_trap_table", HYPERVISOR_set_trap_table((const trap_info_t *)BAD_VA));
    R("efault_xen_version", HYPERVISOR_xen_version(XENVER_extraversion, (void *)BAD_VA));
    R("efault_vcpu_op", HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, 0, (void *)BAD_VA));
    R("efault_multicall", HYPERVISOR_multicall((void *)BAD_VA, 1));
    R("efault_sched_op", HYPERVISOR_sched_op(SCHEDOP_shutdown, (void *)BAD_VA));

    R("enosys_sched_op_99", HYPERVISOR_sched_op(99, NULL));
    R("enosys_vcpu_op_99", HYPERVISOR_vcpu_op(99, 0, NULL));
    R("enosys_event_channel_op_99", HYPERVISOR_event_channel_op(99, NULL));
    R("enosys_xen_version_99", HYPERVISOR_xen_version(99, NULL));

    struct evtchn_bind_virq bv = { .virq = NR_VIRQS, .vcpu = 0 };
    R("einval_bind_virq", HYPERVISOR_event_channel_op(EVTCHNOP_bind_virq, &bv));
    struct vcpu_set_periodic_timer pt = { .period_ns = 100000 };   /* < 1 ms */
    R("einval_periodic_timer", HYPERVISOR_vcpu_op(VCPUOP_set_periodic_timer, 0, &pt));
    R("enoent_vcpu_op_vcpu", HYPERVISOR_vcpu_op(VCPUOP_is_up, 4096, NULL));

    poweroff();
}
