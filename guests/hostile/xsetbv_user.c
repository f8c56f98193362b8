/* Attack: XSETBV from guest user mode (the kernel has set CR4.OSXSAVE where XSAVE is
 * offered). Xen (x86_emulate xsetbv): #UD without CR4.OSXSAVE, else #GP(0) outside ring 0
 * of the PV guest, i.e. in its user mode; XCR0 unchanged. The user program (copied over the
 * one user_setup installed, found by its bytes) runs `xsetbv` with XCR0 = 7 and exits with
 * status 7; the kernel's trap handler records the vector and skips the instruction.
 * Output: `result offered`, `result user_trap <vector>`, `result user_trap_rip_ok`,
 * `result user_status 7`, `result xcr0_size_unchanged 1` (leaf 0xd EBX). */
#include "hostile.h"
#include "user.h"


static const u8 prog[] = {
    0x31, 0xC9,                         /* xor %ecx,%ecx */
    0xB8, 0x07, 0x00, 0x00, 0x00,       /* mov $7,%eax */
    0x31, 0xD2,                         /* xor %edx,%edx */
    0x0F, 0x01, 0xD1,                   /* xsetbv (at USER_CODE_VA + 9) */
    0xB8, 0x3C, 0x00, 0x00, 0x00,       /* mov $60,%eax (exit) */
    0xBF, 0x07, 0x00, 0x00, 0x00,       /* mov $7,%edi */
    0x0F, 0x05,                         /* syscall */
    0xEB, 0xFE,                         /* jmp . */
};
#define XSETBV_VA (USER_CODE_VA + 9)

static volatile long user_vec = -1;
static volatile u64 user_rip;

static int on_user_fault(struct regs *r)
{
    if (!regs_from_user(r) || r->rip != XSETBV_VA)
        return 0;
    user_vec = (long)r->vector;
    user_rip = r->rip;
    r->rip += 3;
    return 1;
}

void app_main(void)
{
    traps_init();
    set_trap_handler(6, on_user_fault);
    set_trap_handler(13, on_user_fault);
    u32 r[4];
    cpuid_pv(1, 0, r);
    int offered = r[2] >> 26 & 1;
    result("offered", offered);
    if (offered) {
        u64 cr4;
        __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
        __asm__ volatile("mov %0, %%cr4" :: "r"(cr4 | CR4_OSXSAVE));
    }
    user_install(prog, sizeof prog);    /* over the user program's frame */
    cpuid_pv(0xd, 0, r);
    u32 size_before = r[1];
    long status = user_run();
    cpuid_pv(0xd, 0, r);
    result("xcr0_size_unchanged", r[1] == size_before);
    result("user_trap", user_vec);
    result("user_trap_rip_ok", user_rip == XSETBV_VA);
    result("user_status", status);
    result("alive", 1);
    poweroff();
}
