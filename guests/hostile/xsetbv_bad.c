/* Attack: XSETBV as a hostile PV kernel (Xen: emul-priv-op.c / x86_emulate xsetbv, then
 * xstate.c handle_xsetbv). Before CR4.OSXSAVE: #UD. With it (where the PV CPUID offers XSAVE,
 * else CR4 keeps OSXSAVE clear and every XSETBV stays #UD): an XCR index other than 0 (ECX;
 * RCX's upper half is ignored), XCR0 without x87, AVX without SSE, AVX-512 state alone, a
 * component outside the PV policy (PKRU, bit 9), bit 63: #GP(0) each, XCR0 unchanged (leaf
 * 0xd EBX, the area size for the current XCR0, does not move). x87 alone and x87|SSE(|AVX)
 * are accepted. `offered` says whether CPUID.1:ECX.XSAVE is set. */
#include "hostile.h"

#define PROBE_ASM(insn) "1: " insn "\n2:\n.pushsection .probes, \"a\"\n.quad 1b, 2b\n.popsection\n"
#define T(key, stmt) do { trap_clear(); stmt; result_trap(key); } while (0)

static void xsetbv_p(u64 rcx, u64 v)
{ __asm__ volatile(PROBE_ASM("xsetbv") :: "c"(rcx), "a"((u32)v), "d"((u32)(v >> 32)) : "memory"); }
static void write_cr4(u64 v) { __asm__ volatile(PROBE_ASM("mov %0, %%cr4") :: "r"(v) : "memory"); }
static u64 read_cr4(void) { u64 v = 0; __asm__ volatile(PROBE_ASM("mov %%cr4, %0") : "+r"(v) :: "memory"); return v; }
/* The PV CPUID (Xen's forced-emulation prefix), not whatever CPL-3 CPUID gives. */
static u32 area_size(void) { u32 r[4]; cpuid_pv(0xd, 0, r); return r[1]; }


void app_main(void)
{
    hostile_traps_init();
    u32 r[4];
    cpuid_pv(1, 0, r);
    int offered = r[2] >> 26 & 1;
    int avx = r[2] >> 28 & 1;
    result("offered", offered);
    T("before_osxsave", xsetbv_p(0, 3));
    T("cr4_write", write_cr4(read_cr4() | CR4_OSXSAVE));
    result("cr4_osxsave", !!(read_cr4() & CR4_OSXSAVE));
    T("fp_sse", xsetbv_p(0, 3));
    u32 base = area_size();
    result("size_fp_sse", base);
    T("index_1", xsetbv_p(1, 3));
    T("index_neg", xsetbv_p(0xffffffffUL, 3));
    T("no_x87", xsetbv_p(0, 2));
    T("zero", xsetbv_p(0, 0));
    T("avx_no_sse", xsetbv_p(0, 5));
    T("opmask_alone", xsetbv_p(0, 0x27));
    T("pkru", xsetbv_p(0, 0x207));
    T("bit63", xsetbv_p(0, 3 | 1UL << 63));
    T("bit32", xsetbv_p(0, 3 | 1UL << 32));
    result("size_unchanged", area_size() == base);
    T("x87_only", xsetbv_p(0, 1));
    T("rcx_upper_ignored", xsetbv_p(1UL << 32, 3));
    if (avx) {
        T("fp_sse_avx", xsetbv_p(0, 7));
        result("size_avx_grows", area_size() >= base + 256);
        T("back_to_fp_sse", xsetbv_p(0, 3));
    }
    result("alive", 1);
    poweroff();
}
