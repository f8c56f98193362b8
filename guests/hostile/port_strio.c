/* Attack: string I/O (INS/OUTS, with and without REP) on the ports a KVM engine opens in its
 * hardware I/O bitmap (the PIT 0x40-0x43, 0x61, the engine's hypercall and SYSCALL ports
 * 0x5a/0x5b), and on a closed one (0x80), without I/O privilege. Xen (emul-priv-op.c:
 * guest_io_okay fails before any access): #GP(0) at the instruction, registers and memory
 * as they were. Per probe: `<key> <vector>`, `<key>_at <fault RIP - instruction address>`
 * (0: at the instruction; the probe has 4 NOPs in front and a fault anywhere from them to the
 * instruction's second byte is recorded), `<key>_regs 1` if RCX/RSI/RDI are unchanged, `<key>_intact 1` if the
 * destination still holds its pattern. The same with I/O privilege: INS reads all ones. */
#include "hostile.h"
#include <xen/physdev.h>

struct sio { u64 at, rcx, rsi, rdi; };

/* `pfx` "rep " or ""; `op` insb/insl/outsb. */
#define STRIO(pfx, op, s, port, src_, dst_, n) STRIO_DF("", pfx, op, s, port)
/* `df` "std; " runs it downwards (cld again after it, also when it faulted). */
#define STRIO_DF(df, pfx, op, s, port)                                          \
    __asm__ volatile(df "lea 3f(%%rip), %[at]\n"                                \
                     "1: nop; nop; nop; nop\n3: " pfx op "\n2: cld\n"           \
                     ".pushsection .probes, \"a\"\n.quad 1b, 2b, 1b+1, 2b, 1b+2, 2b, "     \
                     "1b+3, 2b, 3b, 2b, 3b+1, 2b\n.popsection\n"               \
                     : [at] "=&r"((s)->at), "+c"((s)->rcx), "+S"((s)->rsi),     \
                       "+D"((s)->rdi)                                           \
                     : "d"(port) : "memory")

enum kind { REP_OUTSB, OUTSB, REP_INSB, INSB, INSL, REP_INSB1, REP_OUTSW, STD_REP_INSB,
             STD_REP_OUTSB };
static const char *const kname[] = { "rep_outsb", "outsb", "rep_insb", "insb", "insl", "rep_insb1",
                                     "rep_outsw", "std_rep_insb", "std_rep_outsb" };

static u8 src[256], dst[256];

static long physdev(int cmd, void *arg) { return _hypercall2(__HYPERVISOR_physdev_op, cmd, arg); }

static void fill(void)
{
    for (unsigned i = 0; i < sizeof src; i++) {
        src[i] = 0xa5;
        dst[i] = 0x3c;
    }
}

static long intact(void)
{
    for (unsigned i = 0; i < sizeof dst; i++)
        if (dst[i] != 0x3c)
            return 0;
    return 1;
}

static void probe(u16 port, const char *name, enum kind k)
{
    char key[64];
    struct sio s = { 0, k == REP_INSB1 ? 1 : 64, (u64)src, (u64)dst };
    if (k == STD_REP_INSB || k == STD_REP_OUTSB) {
        s.rsi = (u64)&src[200];
        s.rdi = (u64)&dst[200];
    }
    struct sio before = s;
    fill();
    trap_clear();
    switch (k) {
    case REP_OUTSB: STRIO("rep ", "outsb", &s, port, src, dst, 64); break;
    case OUTSB: STRIO("", "outsb", &s, port, src, dst, 1); break;
    case REP_INSB: case REP_INSB1: STRIO("rep ", "insb", &s, port, src, dst, 64); break;
    case INSB: STRIO("", "insb", &s, port, src, dst, 1); break;
    case INSL: STRIO("", "insl", &s, port, src, dst, 1); break;
    case REP_OUTSW: STRIO("rep ", "outsw", &s, port, src, dst, 64); break;
    case STD_REP_INSB: STRIO_DF("std; ", "rep ", "insb", &s, port); break;
    case STD_REP_OUTSB: STRIO_DF("std; ", "rep ", "outsb", &s, port); break;
    }
    snprintf(key, sizeof key, "%s_%s", name, kname[k]);
    result_trap(key);
    snprintf(key, sizeof key, "%s_%s_at", name, kname[k]);
    result(key, trap_vec < 0 ? 99 : (long)(trap_rip - s.at));
    snprintf(key, sizeof key, "%s_%s_regs", name, kname[k]);
    result(key, s.rcx == before.rcx && s.rsi == before.rsi && s.rdi == before.rdi);
    snprintf(key, sizeof key, "%s_%s_intact", name, kname[k]);
    result(key, intact());
}

static void one_port(u16 port, const char *name)
{
    for (enum kind k = REP_OUTSB; k <= STD_REP_OUTSB; k++)
        probe(port, name, k);
}

void app_main(void)
{
    hostile_traps_init();
    unsigned long only = cmdline_u64(cmdline(), "port", 0);
    if (!only || only == 0x42) one_port(0x42, "pit");
    if (!only || only == 0x61) one_port(0x61, "p61");
    if (!only || only == 0x5a) one_port(0x5a, "hcall");
    if (!only || only == 0x5b) one_port(0x5b, "syscall");
    if (!only || only == 0x80) one_port(0x80, "p80");
    /* With I/O privilege: INS reads all ones into the destination (Xen guest_io_read). */
    struct physdev_set_iopl iopl = { .iopl = 3 };
    result("set_iopl_3", physdev(PHYSDEVOP_set_iopl, &iopl));
    fill();
    struct sio s = { 0, 64, (u64)src, (u64)dst };
    trap_clear();
    STRIO("rep ", "insb", &s, 0x42, src, dst, 64);
    result_trap("iopl_rep_insb");
    unsigned ff = 0, kept = 0;
    for (unsigned i = 0; i < sizeof dst; i++) {
        ff += dst[i] == 0xff;
        kept += dst[i] == 0x3c;
    }
    result("iopl_rep_insb_ff", ff);
    result("iopl_rep_insb_kept", kept);
    result("iopl_rep_insb_rcx", s.rcx);
    /* rep outsb with IOPL: dropped, completes (RCX 0, RSI past the source). */
    struct sio o = { 0, 64, (u64)src, (u64)dst };
    trap_clear();
    STRIO("rep ", "outsb", &o, 0x42, src, dst, 64);
    result_trap("iopl_rep_outsb");
    result("iopl_rep_outsb_done", o.rcx == 0 && o.rsi == (u64)src + 64);
    /* rep insb into a read-only page with IOPL: #PF at the instruction, page unchanged. */
    u8 *ro = alloc_page();
    make_readonly(ro);
    struct sio p = { 0, 16, (u64)src, (u64)ro };
    trap_clear();
    STRIO("rep ", "insb", &p, 0x42, src, ro, 16);
    result_trap("iopl_rep_insb_ro");
    result("iopl_rep_insb_ro_at", trap_vec < 0 ? 99 : (long)(trap_rip - p.at));
    result("iopl_rep_insb_ro_cr2", trap_cr2 == (u64)ro);
    result("iopl_rep_insb_ro_intact", ro[0] == 0 && ro[15] == 0);
    iopl.iopl = 0;
    physdev(PHYSDEVOP_set_iopl, &iopl);
    /* Without I/O privilege into the read-only page: the port is checked first (#GP). */
    struct sio q = { 0, 16, (u64)src, (u64)ro };
    trap_clear();
    STRIO("rep ", "insb", &q, 0x42, src, ro, 16);
    result_trap("noiopl_rep_insb_ro");
    result("noiopl_rep_insb_ro_at", trap_vec < 0 ? 99 : (long)(trap_rip - q.at));
    result("noiopl_rep_insb_ro_intact", ro[0] == 0 && ro[15] == 0);
    result("alive", 1);
    poweroff();
}
