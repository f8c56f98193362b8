/* Attack: a user process enters compatibility mode by itself (a far return to
 * FLAT_RING3_CS32, which every PV guest's GDT holds) and runs SYSCALL there. Xen
 * (x86_64/entry.S cstar_enter -> switch_to_kernel): never a hypercall; the kernel's syscall32
 * callback, and without one (this kernel registers only the 64-bit syscall one) the guest's
 * #UD at the SYSCALL, frame CS 0xe023: the kernel reports it as an unhandled user trap.
 * On the KVM engine, kvm-pvm emulated that SYSCALL into the engine's ring 0 at MSR_CSTAR
 * truncated to 32 bits (a guest user address) on the user's stack: the user process's own
 * code there, or its fault, at ring 0 (tests/test_redteam_compat_syscall.py). The user
 * program asks for exit(42) through that SYSCALL, which must not happen.
 * Output: `result found 1`, then the kernel's `unhandled trap 6 (#UD) at rip=0x400018`. */
#include "hostile.h"
#include "user.h"

static const u8 prog[] = {
    0xB8, 0x3C, 0x00, 0x00, 0x00,       /* mov $60,%eax (exit) */
    0xBF, 0x2A, 0x00, 0x00, 0x00,       /* mov $42,%edi */
    0x68, 0x23, 0xE0, 0x00, 0x00,       /* push $0xe023 (FLAT_RING3_CS32) */
    0x68, 0x18, 0x00, 0x40, 0x00,       /* push $USER_CODE_VA + 0x18 */
    0x48, 0xCB,                         /* lretq: compatibility mode from here */
    0x90, 0x90,
    0x0F, 0x05,                         /* USER_CODE_VA + 0x18: syscall */
    0xEB, 0xFE,                         /* jmp . */
};

void app_main(void)
{
    traps_init();
    user_install(prog, sizeof prog);
    result("user_status", user_run());
    result("alive", 1);
    poweroff();
}
