/* Attack: SYSENTER from guest user mode, in 64-bit and in compatibility mode. The guest's
 * CPUID is a GenuineIntel model offering SEP, where SYSENTER works in both (on AMD, in long
 * mode, it is #UD and Xen offers a PV guest no SEP). Xen (x86_64/entry.S sysenter_entry):
 * the CALLBACKTYPE_sysenter callback (here the kernel's syscall entry: the process exits
 * with edi), its frame [rcx r11 rip=0 cs=3 rflags rsp=0 ss=FLAT_USER_SS]; without one the
 * guest's #GP(0) through its trap table with the same frame (RIP 0, CS 3, RSP 0). Never a
 * hypercall, never the syscall callbacks, never #UD.
 * Output: result cb 0, result status_64 42, result status_32 43, result cb_off 0,
 * result status_gp 7, result gp_vec 13, result gp_err 0, result gp_rip 0, result gp_cs 3,
 * result gp_rsp 0, result alive 1. Prefixed (66, f3: ignored by the CPU) the same; with
 * LOCK (f0) #UD at the instruction: result pfx_66_64 42, pfx_66_32 43, pfx_f3_64 42,
 * pfx_f3_32 43, lock_64 9, lock_32 9, ud_rip_64 31, ud_rip_32 31. */
#include "hostile.h"
#include "user.h"

#define EXIT64_OFF 36
#define PREFIX_OFF 31

static const u8 prog[] = {
    0xBB, 0x00, 0x00, 0x00, 0x00,       /* mov $mode,%ebx (patched: 0 64-bit, 1 compat) */
    0x85, 0xDB,                         /* test %ebx,%ebx */
    0x74, 0x0C,                         /* jz USER_CODE_VA + 21 */
    0x68, 0x23, 0xE0, 0x00, 0x00,       /* push $0xe023 (FLAT_USER_CS32) */
    0x68, 0x15, 0x00, 0x40, 0x00,       /* push $USER_CODE_VA + 21 */
    0x48, 0xCB,                         /* lretq: compatibility mode from here */
    0xB8, 0x3C, 0x00, 0x00, 0x00,       /* mov $60,%eax (exit)        (+21) */
    0x89, 0xDF,                         /* mov %ebx,%edi */
    0x83, 0xC7, 0x2A,                   /* add $42,%edi: 42 64-bit, 43 compat */
    0x90,                               /* nop, or a prefix (+31, patched) */
    0x0F, 0x34,                         /* sysenter */
    0xEB, 0xFE,                         /* jmp . */
    0xB8, 0x3C, 0x00, 0x00, 0x00,       /* 64-bit: mov $60,%eax (+36) */
    0xBF, 0x07, 0x00, 0x00, 0x00,       /* mov $7,%edi */
    0x0F, 0x05,                         /* syscall */
    0xEB, 0xFE,                         /* jmp . */
};

extern char syscall_callback[];

static volatile long gp_vec = -1, gp_err = -1;
static volatile u64 gp_rip = 1, gp_cs, gp_rsp = 1;

static volatile u64 ud_rip = 1;
static u8 exit_code = 7;

static int on_user_ud(struct regs *r)
{
    if (!regs_from_user(r))
        return 0;
    ud_rip = r->rip - USER_CODE_VA;
    r->rip = USER_CODE_VA + EXIT64_OFF;       /* to the 64-bit exit, status 9 */
    r->cs = 0xE033;
    r->rsp = USER_STACK_TOP;
    return 1;
}

static int on_user_gp(struct regs *r)
{
    if (!regs_from_user(r))
        return 0;
    gp_vec = (long)r->vector;
    gp_err = (long)r->error;
    gp_rip = r->rip;
    gp_cs = r->cs & 0xFFFF;
    gp_rsp = r->rsp;
    r->rip = USER_CODE_VA + EXIT64_OFF;       /* to the 64-bit exit */
    r->cs = 0xE033;
    r->rsp = USER_STACK_TOP;
    return 1;
}

void app_main(void)
{
    traps_init();
    set_trap_handler(13, on_user_gp);
    set_trap_handler(6, on_user_ud);
    u8 *code = user_install(prog, sizeof prog);
    result("cb", register_callback(5, (unsigned long)syscall_callback));
    code[1] = 0;                               /* ebx 0: 64-bit */
    result("status_64", user_run());
    code[1] = 1;                               /* ebx 1: compatibility mode */
    result("status_32", user_run());
    static const struct { u8 prefix; const char *n64, *n32; } pfx[] = {
        { 0x66, "pfx_66_64", "pfx_66_32" }, { 0xF3, "pfx_f3_64", "pfx_f3_32" },
        { 0xF0, "lock_64", "lock_32" } };
    for (unsigned i = 0; i < 3; i++) {
        code[PREFIX_OFF] = pfx[i].prefix;
        code[EXIT64_OFF + 6] = pfx[i].prefix == 0xF0 ? 9 : 7;   /* mov $9/$7,%edi */
        code[1] = 0;
        result(pfx[i].n64, user_run());
        if (pfx[i].prefix == 0xF0)
            result("ud_rip_64", (long)ud_rip);
        code[1] = 1;
        result(pfx[i].n32, user_run());
        if (pfx[i].prefix == 0xF0)
            result("ud_rip_32", (long)ud_rip);
    }
    code[PREFIX_OFF] = 0x90;
    code[EXIT64_OFF + 6] = exit_code;
    result("cb_off", register_callback(5, 0));
    code[1] = 0;
    result("status_gp", user_run());
    result("gp_vec", gp_vec);
    result("gp_err", gp_err);
    result("gp_rip", (long)gp_rip);
    result("gp_cs", (long)gp_cs);
    result("gp_rsp", (long)gp_rsp);
    result("alive", 1);
    poweroff();
}
