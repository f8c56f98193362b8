/* Attack: SYSCALL in compatibility mode from guest user mode. The user program far-returns
 * (lretq) to FLAT_USER_CS32, which Xen's GDT gives every PV guest, and runs `syscall` with
 * eax = 60 (exit), edi = 32. Xen (x86_64/entry.S cstar_enter -> switch_to_kernel): the
 * CALLBACKTYPE_syscall32 callback with the frame's CS FLAT_USER_CS32 (here the kernel's own
 * syscall entry: the process exits with 32); without one (address 0) the guest's #UD at the
 * SYSCALL, which the kernel's handler turns into an exit with 6 through the 64-bit stub.
 * Never a hypercall, never the 64-bit syscall callback, never anything in ring 0.
 * Output: result cb32 0, result status_cb 32, result cb32_off 0, result ud_vec 6,
 * result ud_rip_ok 1, result ud_cs 0xe023 (decimal), result status_ud 6, result alive 1. */
#include "hostile.h"
#include "user.h"

#define SYSCALL_OFF 22
#define EXIT64_OFF 26

static const u8 prog[] = {
    0x68, 0x23, 0xE0, 0x00, 0x00,       /* push $0xe023 (FLAT_USER_CS32) */
    0x68, 0x0C, 0x00, 0x40, 0x00,       /* push $USER_CODE_VA + 12 */
    0x48, 0xCB,                         /* lretq: compatibility mode from here */
    0xB8, 0x3C, 0x00, 0x00, 0x00,       /* mov $60,%eax (exit) */
    0xBF, 0x20, 0x00, 0x00, 0x00,       /* mov $32,%edi */
    0x0F, 0x05,                         /* syscall (USER_CODE_VA + 22) */
    0xEB, 0xFE,                         /* jmp . */
    0xB8, 0x3C, 0x00, 0x00, 0x00,       /* 64-bit: mov $60,%eax (USER_CODE_VA + 26) */
    0xBF, 0x06, 0x00, 0x00, 0x00,       /* mov $6,%edi */
    0x0F, 0x05,                         /* syscall */
    0xEB, 0xFE,                         /* jmp . */
};

extern char syscall_callback[];

static volatile long ud_vec = -1;
static volatile u64 ud_rip, ud_cs;

static int on_user_ud(struct regs *r)
{
    if (!regs_from_user(r))
        return 0;
    ud_vec = (long)r->vector;
    ud_rip = r->rip;
    ud_cs = r->cs & 0xFFFF;
    r->rip = USER_CODE_VA + EXIT64_OFF;       /* back to 64-bit mode to exit */
    r->cs = 0xE033;
    return 1;
}

void app_main(void)
{
    traps_init();
    set_trap_handler(6, on_user_ud);
    user_install(prog, sizeof prog);
    result("cb32", register_callback(7, (unsigned long)syscall_callback));
    printk("about to syscall32\n");
    result("status_cb", user_run());
    result("cb32_off", register_callback(7, 0));
    result("status_ud", user_run());
    result("ud_vec", ud_vec);
    result("ud_rip_ok", ud_rip == USER_CODE_VA + SYSCALL_OFF);
    result("ud_cs", (long)ud_cs);
    result("alive", 1);
    poweroff();
}
