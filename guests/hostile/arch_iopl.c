/* Attack: the virtual IOPL under VMASST_TYPE_architectural_iopl, through HYPERVISOR_iret
 * (completed in C on the KVM engine, csrc/kvm.c fast_iret, and in Python, traps.do_iret)
 * and the bounce frames. Xen (xen/include/public/xen.h VMASST_TYPE_architectural_iopl,
 * pv/iret.c do_iret, x86_64/entry.S create_bounce_frame): with the assist the kernel counts
 * as ring 0, do_iret sets the virtual IOPL from the frame's RFLAGS.IOPL, and the RFLAGS of a
 * bounce frame carry the virtual IOPL. Without the assist iret never touches it.
 * Results: in_<step> is the trap of `in $0x80` after the step (13: no I/O privilege, none:
 * allowed), bounce_iopl_<step> the IOPL field of a #UD's bounce frame. */
#include "hostile.h"
#include <xen/physdev.h>

#define RF_IOPL3 0x3000UL

__asm__(
    "    .text\n"
    "    .globl p_in80\n"
    "p_in80:\n"
    "    .pushsection .probes, \"a\"\n"
    "    .quad 8f, 9f\n"
    "    .popsection\n"
    "8:  in $0x80, %al\n"
    "9:  ret\n");
void p_in80(void);

static char stack[2 * PAGE_SIZE] __attribute__((aligned(16)));
static volatile u64 ud_rflags;

static int on_ud(struct regs *r)
{
    ud_rflags = r->rflags;
    r->rip += 2;
    return 1;
}

/* HYPERVISOR_iret to the next instruction in kernel mode with `rflags`. */
static void iret_with(u64 rflags)
{
    u64 top = (u64)(stack + sizeof(stack) - 64);
    __asm__ volatile(
        "    mov %%rsp, %%r12\n"
        "    pushq $0xe02b\n"
        "    pushq %[sp]\n"
        "    pushq %[fl]\n"
        "    pushq $0xe030\n"
        "    leaq 1f(%%rip), %%rax\n"
        "    pushq %%rax\n"
        "    pushq $0\n"
        "    jmp hypercall_page + 23 * 32\n"
        "1:  mov %%r12, %%rsp\n"
        :
        : [fl] "r"(rflags), [sp] "r"(top)
        : "rax", "rcx", "r11", "r12", "memory", "cc");
}

static void probe_in(const char *key)
{
    trap_clear();
    p_in80();
    result_trap(key);
}

static void bounce_iopl(const char *key)
{
    ud_rflags = ~0UL;
    __asm__ volatile("ud2");
    result(key, (long)((ud_rflags >> 12) & 3));
}

static long assist(int cmd)
{
    return _hypercall2(__HYPERVISOR_vm_assist, cmd, VMASST_TYPE_architectural_iopl);
}

void app_main(void)
{
    hostile_traps_init();
    set_trap_handler(6, on_ud);
    /* Without the assist (kernel = ring 1): iret with IOPL 3 changes nothing, the kernel
     * stays without I/O privilege, the bounce frame shows IOPL 0. */
    probe_in("in_start");
    iret_with(RF_IOPL3 | 0x202);
    probe_in("in_plain_iret3");
    bounce_iopl("bounce_iopl_plain");
    /* With it the kernel is ring 0 (always I/O privilege): the IOPL is seen in the bounce
     * frames, and in the I/O privilege once the assist is off again. Each iret many times
     * (on KVM completed in C). */
    result("vm_assist", assist(VMASST_CMD_enable));
    probe_in("in_assist");
    for (int i = 0; i < 1000; i++)
        iret_with(RF_IOPL3 | 0x202);
    bounce_iopl("bounce_iopl_iret3");
    result("vm_assist_off3", assist(VMASST_CMD_disable));
    probe_in("in_off_after_iret3");        /* IOPL 3 from the iret: allowed at ring 1 */
    iret_with(0x202);                      /* no assist: does not drop it */
    probe_in("in_off_iret0");
    result("vm_assist_on2", assist(VMASST_CMD_enable));
    for (int i = 0; i < 1000; i++)
        iret_with(0x202);
    bounce_iopl("bounce_iopl_iret0");
    result("vm_assist_off0", assist(VMASST_CMD_disable));
    probe_in("in_off_after_iret0");        /* IOPL 0 from the iret: #GP at ring 1 */
    /* set_iopl sets the same virtual IOPL: seen in the bounce frame, dropped by an iret. */
    result("vm_assist_on3", assist(VMASST_CMD_enable));
    struct physdev_set_iopl io = { .iopl = 3 };
    result("set_iopl_3", _hypercall2(__HYPERVISOR_physdev_op, PHYSDEVOP_set_iopl, &io));
    bounce_iopl("bounce_iopl_set3");
    iret_with(0x202);
    bounce_iopl("bounce_iopl_set3_iret0");
    result("alive", 1);
    poweroff();
}
