/* Attack: int3, int $3 and int $4 with the guest's trap-table gates 3 and 4 at DPL 0, from
 * the kernel and from user mode. Xen's own IDT gates 3 and 4 are DPL 3: the CPU takes them
 * into do_int3 / do_trap, which inject #BP / #OF through trap_ctxt[3] / [4] whatever the
 * guest's gate's DPL (pv_inject_hw_exception; permit_softint is only do_general_
 * protection's, for the DPL-0 gates of every other vector). Never #GP((n << 3) | 2).
 * Output: result k_int3 3, k_int_3 3, k_int_4 4, k_gp 0, u_status 42, u_bp 2, u_of 1,
 * u_gp 0, alive 1. */
#include "hostile.h"
#include "user.h"

extern char trap_int3[], trap_overflow[];

static const u8 prog[] = {
    0xCC,                               /* int3 */
    0xCD, 0x03,                         /* int $3 */
    0xCD, 0x04,                         /* int $4 */
    0xB8, 0x3C, 0x00, 0x00, 0x00,       /* mov $60,%eax (exit)        (+5) */
    0xBF, 0x2A, 0x00, 0x00, 0x00,       /* mov $42,%edi */
    0x0F, 0x05,                         /* syscall */
    0xEB, 0xFE,                         /* jmp . */
};

static volatile long last_vec = -1, k_gp, u_bp, u_of, u_gp;

static int on_bp_of(struct regs *r)
{
    if (regs_from_user(r)) {
        if (r->vector == 3) u_bp++; else u_of++;
    } else {
        last_vec = (long)r->vector;
    }
    return 1;                          /* a trap: RIP is past the instruction */
}

static int on_gp(struct regs *r)
{
    if (regs_from_user(r)) {
        u_gp++;
        r->rip = USER_CODE_VA + 5;     /* on to the exit */
        return 1;
    }
    if ((r->error & 7) != 2)
        return 0;
    k_gp++;
    last_vec = 0x100 | (long)(r->error >> 3);
    r->rip += *(u8 *)r->rip == 0xCC ? 1 : 2;     /* past the INT */
    return 1;
}

void app_main(void)
{
    traps_init();
    set_trap_handler(3, on_bp_of);
    set_trap_handler(4, on_bp_of);
    set_trap_handler(13, on_gp);
    static const trap_info_t dpl0[] = {
        { 3, 0, FLAT_KERNEL_CS, (unsigned long)trap_int3 },
        { 4, 0, FLAT_KERNEL_CS, (unsigned long)trap_overflow },
        { 0, 0, 0, 0 } };
    if (HYPERVISOR_set_trap_table(dpl0))
        panic("set_trap_table");
    __asm__ volatile("int3" ::: "memory");
    result("k_int3", last_vec);
    last_vec = -1;
    __asm__ volatile(".byte 0xcd, 0x03" ::: "memory");
    result("k_int_3", last_vec);
    last_vec = -1;
    __asm__ volatile("int $4" ::: "memory");
    result("k_int_4", last_vec);
    result("k_gp", k_gp);
    user_install(prog, sizeof prog);
    result("u_status", user_run());
    result("u_bp", u_bp);
    result("u_of", u_of);
    result("u_gp", u_gp);
    result("alive", 1);
    poweroff();
}
