/* Attack: the KVM engine answers a repeated one-byte IN in C (csrc/kvm.c fast_in) once the
 * port policy answered it all ones with IOPL granted. The guest runs a loop of
 * `mov $0,%al; in $0x42,%al; and %al,(%rsi)` in pages it writes itself: inside one page
 * (500 rounds, the port byte rewritten, the IN rewritten into `mov $0x11,%al` and back, all
 * with plain stores and no exit: `inpage_*`), then with the IN straddling a page boundary
 * (E4 the last byte of one page, the port the first of the next):
 *  - 200 rounds with IOPL 3: every answer all ones (`fast_and 255`);
 *  - the port byte rewritten to 0x61 with a plain store (no exit): all ones again;
 *  - the IN rewritten into `mov $0x11,%al` (no I/O at all): the new code runs (`smc_and 17`);
 *  - back to the IN, the second page unmapped: #PF at the IN (`unmapped_pf_rip_ok`; the
 *    `mov` before it, entirely on the first page, has run) with CR2 the second page;
 *    mapped again: all ones;
 *  - IOPL dropped (set_iopl 0, an exit): the very next IN is #GP(0) at its RIP.
 * Xen: the same (guest_io_read gives ~0 to a domU with IOPL; without, #GP). */
#include "hostile.h"
#include <xen/physdev.h>

static u8 area[3 * 4096] __attribute__((aligned(4096)));
#define LOOP_OFF 0xFFD                  /* the IN's E4 at 0xFFF */

static volatile u64 gp_rip, gp_seen, pf_cr2, pf_rip, pf_seen;
static u64 in_va;

static int on_gp(struct regs *r)
{
    if (r->rip != in_va)
        return 0;
    gp_seen++;
    gp_rip = r->rip;
    r->rip += 2;
    return 1;
}

static int on_pf(struct regs *r)
{
    if (r->rip != in_va && r->rip != in_va - 2)     /* the IN, or the loop's first insn */
        return 0;
    pf_seen++;
    pf_rip = r->rip;
    pf_cr2 = vcpu0()->arch.cr2;
    r->rip = *(u64 *)r->rsp;            /* the rest of the loop is unmapped too: return */
    r->rsp += 8;
    return 1;
}

static u8 *loop_at = area + LOOP_OFF;

static u8 run(unsigned long rounds)
{
    u8 acc = 0xFF;
    void (*fn)(unsigned long, u8 *) = (void (*)(unsigned long, u8 *))loop_at;
    fn(rounds, &acc);
    return acc;
}

static long physdev(int cmd, void *arg) { return _hypercall2(__HYPERVISOR_physdev_op, cmd, arg); }

void app_main(void)
{
    traps_init();
    set_trap_handler(13, on_gp);
    set_trap_handler(14, on_pf);
    /* rdi = &acc, rsi... the loop count is the first argument (rdi), acc the second (rsi). */
    static const u8 loop[] = {
        0xB0, 0x00,             /* mov $0,%al */
        0xE4, 0x42,             /* in $0x42,%al   (E4 at page offset 0xFFF) */
        0x20, 0x06,             /* and %al,(%rsi) */
        0x48, 0xFF, 0xCF,       /* dec %rdi */
        0x75, 0xF5,             /* jnz loop (-11) */
        0xC3,                   /* ret */
    };
    struct physdev_set_iopl iopl = { .iopl = 3 };
    result("set_iopl_3", physdev(PHYSDEVOP_set_iopl, &iopl));
    /* Inside one page first (the KVM engine answers it in C from the second IN on). */
    u8 *code = area + 0x2400;
    memcpy(code, loop, sizeof loop);
    loop_at = code;
    in_va = (u64)(code + 2);
    result("inpage_and", run(500));
    code[3] = 0x61;
    result("inpage_port_rewritten_and", run(500));
    code[2] = 0xB0;
    code[3] = 0x11;
    result("inpage_smc_and", run(200));
    code[2] = 0xE4;
    result("inpage_smc_back_and", run(200));      /* in $0x11: all ones again */
    /* Then across the page boundary. */
    code = area + LOOP_OFF;
    memcpy(code, loop, sizeof loop);
    loop_at = code;
    in_va = (u64)(code + 2);
    result("fast_and", run(200));
    code[3] = 0x61;                     /* the port byte, on the second page */
    result("port_rewritten_and", run(200));
    code[2] = 0xB0;                     /* mov $0x11,%al */
    code[3] = 0x11;
    result("smc_and", run(200));
    code[2] = 0xE4;
    code[3] = 0x42;
    result("restored_and", run(50));
    unsigned long second = (unsigned long)area + 4096;
    struct walk w;
    pt_walk(second, &w);
    u64 pte = w.e[1];
    result("unmap", HYPERVISOR_update_va_mapping(second, 0, UVMF_INVLPG));
    run(1);
    result("unmapped_pf", pf_seen);
    result("unmapped_pf_rip_ok", pf_rip == in_va);
    result("unmapped_pf_cr2_ok", pf_cr2 == second);
    result("remap", HYPERVISOR_update_va_mapping(second, pte, UVMF_INVLPG));
    result("remapped_and", run(50));
    iopl.iopl = 0;
    result("set_iopl_0", physdev(PHYSDEVOP_set_iopl, &iopl));
    run(1);
    result("noiopl_gp", gp_seen);
    result("noiopl_gp_rip_ok", gp_rip == in_va);
    result("alive", 1);
    poweroff();
}
