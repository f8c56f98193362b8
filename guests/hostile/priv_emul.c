/* Attack: the privileged-operation emulator (Xen's emul-priv-op.c for PV kernels).
 * MSRs Xen refuses, control-register writes that would change the real CPU, port I/O
 * without and with a virtual IOPL (host reset ports included), string I/O into memory
 * the guest may not write, debug registers aimed at Xen, over-long and LOCKed
 * instructions, and the forced-emulation prefix on something other than CPUID.
 * Each is answered as Xen answers (mostly #GP); nothing reaches the host. */
#include "hostile.h"
#include <xen/physdev.h>

#define PROBE_ASM(insn) "1: " insn "\n2:\n.pushsection .probes, \"a\"\n.quad 1b, 2b\n.popsection\n"

static void wrmsr_p(u32 msr, u64 v)
{ __asm__ volatile(PROBE_ASM("wrmsr") :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory"); }
static u64 rdmsr_p(u32 msr)
{
    u32 lo = 0, hi = 0;
    __asm__ volatile(PROBE_ASM("rdmsr") : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
    return ((u64)hi << 32) | lo;
}
static void write_cr0(u64 v) { __asm__ volatile(PROBE_ASM("mov %0, %%cr0") :: "r"(v) : "memory"); }
static void write_cr3(u64 v) { __asm__ volatile(PROBE_ASM("mov %0, %%cr3") :: "r"(v) : "memory"); }
static void write_cr4(u64 v) { __asm__ volatile(PROBE_ASM("mov %0, %%cr4") :: "r"(v) : "memory"); }
static void write_cr8(u64 v) { __asm__ volatile(PROBE_ASM("mov %0, %%cr8") :: "r"(v) : "memory"); }
static u64 read_cr4(void) { u64 v = 0; __asm__ volatile(PROBE_ASM("mov %%cr4, %0") : "+r"(v) :: "memory"); return v; }
static void write_dr0(u64 v) { __asm__ volatile(PROBE_ASM("mov %0, %%dr0") :: "r"(v) : "memory"); }
static u8 inb_p(u16 port)
{ u8 v = 0x5a; __asm__ volatile(PROBE_ASM("inb %1, %0") : "+a"(v) : "Nd"(port) : "memory"); return v; }
static void outb_p(u16 port, u8 v)
{ __asm__ volatile(PROBE_ASM("outb %0, %1") :: "a"(v), "Nd"(port) : "memory"); }
static void outl_p(u16 port, u32 v)
{ __asm__ volatile(PROBE_ASM("outl %0, %1") :: "a"(v), "Nd"(port) : "memory"); }
static void rep_insb(void *dst, u16 port, unsigned long n)
{ __asm__ volatile(PROBE_ASM("rep insb") : "+D"(dst), "+c"(n) : "d"(port) : "memory"); }
static void rep_outsb(const void *src, u16 port, unsigned long n)
{ __asm__ volatile(PROBE_ASM("rep outsb") : "+S"(src), "+c"(n) : "d"(port) : "memory"); }
/* 14 operand-size prefixes + rdmsr: 16 bytes, longer than any x86 instruction. */
static void long_rdmsr(void)
{ __asm__ volatile(PROBE_ASM(".fill 14, 1, 0x66\n .byte 0x0f, 0x32") :: "c"(0x10) : "rax", "rdx", "memory"); }
static void lock_rdmsr(void)
{ __asm__ volatile(PROBE_ASM(".byte 0xf0, 0x0f, 0x32") :: "c"(0x10) : "rax", "rdx", "memory"); }
static void forced_rdmsr(void)
{ __asm__ volatile(PROBE_ASM("ud2; .ascii \"xen\"; rdmsr") :: "c"(0x10) : "rax", "rdx", "memory"); }

static long physdev(int cmd, void *arg) { return _hypercall2(__HYPERVISOR_physdev_op, cmd, arg); }

#define T(key, stmt) do { trap_clear(); stmt; result_trap(key); } while (0)

void app_main(void)
{
    hostile_traps_init();

    /* ---- MSRs that would take over the real CPU ---- */
    T("wrmsr_lstar", wrmsr_p(0xc0000082, 0xffffffff81000000UL));
    T("wrmsr_star", wrmsr_p(0xc0000081, 0x0023001000000000UL));
    T("wrmsr_sfmask", wrmsr_p(0xc0000084, 0));
    T("wrmsr_sysenter_eip", wrmsr_p(0x176, 0xffffffff81000000UL));
    T("wrmsr_efer_nosce", wrmsr_p(0xc0000080, 0xd00));
    T("wrmsr_apic_base", wrmsr_p(0x1b, 0xfee00800));
    T("wrmsr_spec_ctrl", wrmsr_p(0x48, 1));
    T("wrmsr_pred_cmd", wrmsr_p(0x49, 1));
    T("wrmsr_ucode_write", wrmsr_p(0x79, (u64)_text));
    T("wrmsr_ucode_rev_nonzero", wrmsr_p(0x8b, 1));
    T("wrmsr_x2apic_icr", wrmsr_p(0x830, 0xc4500));
    T("wrmsr_mc0_status", wrmsr_p(0x401, 1));
    T("wrmsr_mcg_ext_ctl", wrmsr_p(0x4d0, 1));
    T("wrmsr_gs_noncanon", wrmsr_p(0xc0000101, 0x8000000000000000UL));
    T("wrmsr_shadow_gs_noncanon", wrmsr_p(0xc0000102, 0x0000800000000000UL));
    T("wrmsr_hcall_page_xen_frame", wrmsr_p(0x40000000, 0));
    T("wrmsr_hcall_page_l4", wrmsr_p(0x40000000, (u64)l4_mfn() << PAGE_SHIFT));
    T("wrmsr_misc_features", wrmsr_p(0x140, 1));
    T("rdmsr_unknown", rdmsr_p(0x12345));
    T("rdmsr_x2apic", rdmsr_p(0x802));
    T("rdmsr_amd_de_cfg", rdmsr_p(0xc0011029));
    T("rdmsr_mcg_ext_ctl", rdmsr_p(0x4d0));
    /* Still a working kernel: a hypercall round trip and the EFER it reads. */
    result("efer_unchanged", rdmsr_p(0xc0000080) == 0xd01);

    /* ---- control registers ---- */
    T("cr0_clear_wp", write_cr0(0x80040033UL));
    T("cr0_set_cd", write_cr0(0xc0050033UL));
    T("cr0_clear_pe", write_cr0(0x80050032UL));
    T("cr4_all_ones", write_cr4(~0UL));
    result("cr4_after_all_ones", (long)read_cr4());
    T("cr8_write", write_cr8(15));
    unsigned long l1 = 0;
    struct walk w;
    if (pt_walk((unsigned long)_text, &w) == 0)
        l1 = w.mfn[1];
    T("cr3_l1_table", write_cr3((u64)l1 << PAGE_SHIFT));
    T("cr3_xen_frame", write_cr3(0));
    T("cr3_huge", write_cr3(~0UL << 12));

    /* ---- debug registers aimed at Xen ---- */
    T("mov_dr0_xen", write_dr0(0xffff830000000000UL));
    result("set_debugreg_io_bp", _hypercall2(__HYPERVISOR_set_debugreg, 7, 0x20002));
    result("set_debugreg6_high", _hypercall2(__HYPERVISOR_set_debugreg, 6, 1UL << 32));

    /* ---- port I/O without I/O privilege ---- */
    T("in_kbd", inb_p(0x60));
    T("out_kbd_reset", outb_p(0x64, 0xfe));
    T("out_cf9_reset", outb_p(0xcf9, 0x06));
    T("outl_cf8", outl_p(0xcf8, 0x80000000));
    u8 buf[16];
    T("rep_insb_noiopl", rep_insb(buf, 0x80, sizeof buf));
    struct physdev_set_iobitmap bm = { .nr_ports = 65537 };
    set_xen_guest_handle(bm.bitmap, (u8 *)buf);
    result("iobitmap_too_many", physdev(PHYSDEVOP_set_iobitmap, &bm));
    bm.nr_ports = 16;
    set_xen_guest_handle(bm.bitmap, (u8 *)0xffff830000000000UL);
    result("iobitmap_in_xen", physdev(PHYSDEVOP_set_iobitmap, &bm));

    /* ---- with IOPL 3: reset ports do nothing, reads are all ones ---- */
    struct physdev_set_iopl iopl = { .iopl = 3 };
    result("set_iopl_3", physdev(PHYSDEVOP_set_iopl, &iopl));
    T("out_kbd_reset_iopl", outb_p(0x64, 0xfe));
    T("out_cf9_reset_iopl", outb_p(0xcf9, 0x06));
    outb_p(0x70, 0x0);
    result("cmos_read", inb_p(0x71));
    for (unsigned i = 0; i < sizeof buf; i++)
        buf[i] = 0;
    T("rep_insb_iopl", rep_insb(buf, 0x80, sizeof buf));
    unsigned ff = 0;
    for (unsigned i = 0; i < sizeof buf; i++)
        ff += buf[i] == 0xff;
    result("rep_insb_filled", ff);
    u8 *ro = alloc_page();
    make_readonly(ro);
    T("rep_insb_readonly", rep_insb(ro, 0x80, 4));
    result("rep_insb_readonly_cr2_ok", trap_cr2 == (u64)ro);
    result("readonly_intact", ro[0] == 0 && ro[1] == 0);
    T("rep_insb_xen", rep_insb((void *)0xffff830000000000UL, 0x80, 4));
    T("rep_outsb_xen", rep_outsb((void *)0xffff830000000000UL, 0x80, 4));
    iopl.iopl = 0;
    physdev(PHYSDEVOP_set_iopl, &iopl);

    /* ---- decoder abuse ---- */
    T("overlong_rdmsr", long_rdmsr());
    T("lock_rdmsr", lock_rdmsr());
    T("forced_emulation_rdmsr", forced_rdmsr());

    result("priv_emul_done", 1);
    poweroff();
}
