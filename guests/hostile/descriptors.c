/* Descriptor tables: set_gdt, update_descriptor, MMUEXT_SET_LDT (Xen's
 * pv/descriptor-tables.c). First a legal GDT with Linux's user segments
 * (loading them must work), then attacks: ring-0 descriptors (stored with DPL 3),
 * system descriptors (TSS, LDT, interrupt gates: refused), call gates to Xen's
 * ring-0 code selector (refused) or to a non-canonical target (accepted with
 * DPL 0: using it faults), GDT/LDT frames that are page tables, foreign or
 * still writable-mapped, misaligned addresses. */
#include "hostile.h"

#define SET_LDT_CMD 13

static long set_gdt(unsigned long *frames, unsigned entries)
{ return _hypercall2(__HYPERVISOR_set_gdt, frames, entries); }
static long update_desc(u64 maddr, u64 desc)
{ return _hypercall2(__HYPERVISOR_update_descriptor, maddr, desc); }

#define USER_DS64  0x00cff3000000ffffUL   /* data, DPL 3, present */
#define USER_CS64  0x00affb000000ffffUL   /* code, L, DPL 3 */
#define KERN_DS64  0x00cf93000000ffffUL   /* data, DPL 0 */
#define KERN_CS64  0x00af9b000000ffffUL   /* code, L, DPL 0 */
#define TSS64      0x00008b000000ffffUL   /* busy TSS, DPL 0 */
#define LDT_DESC   0x000082000000ffffUL   /* LDT descriptor */
#define INT_GATE   0x00008e0000331000UL   /* 64-bit interrupt gate, cs 0x33 */
/* 64-bit call gate: offset 15:0 | selector << 16, P | DPL3 | type 0xc, offset 31:16. */
static u64 call_gate(u16 sel, u64 off)
{
    return (off & 0xffff) | ((u64)sel << 16) | ((0xec00UL | ((off >> 16) & 0xffff) << 16) << 32);
}

/* Loads a data selector into %ds (probe: skippable); returns the selector read back. */
static u16 load_ds(u16 sel)
{
    u16 got = 0xffff;
    __asm__ volatile("1: mov %1, %%ds\n2:\n.pushsection .probes, \"a\"\n.quad 1b, 2b\n.popsection\n"
                     "mov %%ds, %0" : "=r"(got) : "r"(sel) : "memory");
    return got;
}

static void lcall_gate(u16 sel)
{
    struct { u64 off; u16 sel; } __attribute__((packed)) far = { 0, sel };
    __asm__ volatile("1: rex64 lcall *%0\n2:\n.pushsection .probes, \"a\"\n.quad 1b, 2b\n.popsection"
                     :: "m"(far) : "memory");
}

void app_main(void)
{
    hostile_traps_init();

    /* ---- a legal GDT ---- */
    u64 *gdt = alloc_page();
    gdt[5] = USER_DS64;               /* __USER_DS = 0x2b */
    gdt[6] = USER_CS64;               /* __USER_CS = 0x33 */
    gdt[7] = KERN_DS64;               /* ring-0 data: stored with DPL 3 */
    gdt[8] = KERN_CS64;
    unsigned long gmfn = virt_to_mfn(gdt);
    result("gdt_writable_mapped", set_gdt(&gmfn, 16));
    make_readonly(gdt);
    result("gdt_ok", set_gdt(&gmfn, 16));
    result("gdt_ring0_ds_fixed", gdt[7] == (KERN_DS64 | (3UL << 45)));
    result("gdt_ring0_cs_fixed", gdt[8] == (KERN_CS64 | (3UL << 45)));
    trap_clear();
    u16 ds = load_ds(0x2b);
    result_trap("load_user_ds_trap");
    result("load_user_ds", ds);
    trap_clear();
    load_ds(0x3b);
    result_trap("load_fixed_ds_trap");
    trap_clear();
    load_ds(0x83);                   /* entry 16: beyond `entries`, a zero descriptor */
    result_trap("load_empty_ds_trap");
    load_ds(0);
    result("map_gdt_rw", HYPERVISOR_update_va_mapping((unsigned long)gdt,
                                                     ((u64)gmfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG));

    /* ---- update_descriptor ---- */
    u64 ga = ((u64)gmfn << PAGE_SHIFT);
    result("upd_user_ds", update_desc(ga + 9 * 8, USER_DS64));
    result("upd_ring0_cs", update_desc(ga + 10 * 8, KERN_CS64));
    result("upd_ring0_cs_stored_dpl3", gdt[10] == (KERN_CS64 | (3UL << 45)));
    result("upd_tss", update_desc(ga + 11 * 8, TSS64));
    result("upd_ldt_desc", update_desc(ga + 11 * 8, LDT_DESC));
    result("upd_int_gate", update_desc(ga + 11 * 8, INT_GATE));
    result("upd_gate_ring0_cs", update_desc(ga + 12 * 8, call_gate(0xe008, 0x1000)));
    result("upd_gate_xen_ds", update_desc(ga + 12 * 8, call_gate(0xe02b, 0x1000)));
    /* Target 0x0000800000001000 (non-canonical): offset 63:32 in the gate's upper half. */
    result("upd_gate_noncanon", update_desc(ga + 12 * 8, call_gate(0x33, 0x1000)));
    result("upd_gate_noncanon_hi", update_desc(ga + 13 * 8, 0x00008000UL));
    result("upd_gate_dpl0", (gdt[12] >> 45) & 3);
    result("upd_gate_rpl_keeps_dpl", (gdt[12] >> 16) & 3);
    result("upd_misaligned", update_desc(ga + 9 * 8 + 4, USER_DS64));
    result("upd_foreign", update_desc((u64)foreign_mfn() << PAGE_SHIFT, USER_DS64));
    result("upd_pagetable", update_desc((u64)l4_mfn() << PAGE_SHIFT, USER_DS64));
    result("upd_l4_unchanged", read_entry(l4_mfn(), 0) != USER_DS64);
    make_readonly(gdt);
    trap_clear();
    lcall_gate(0x60);                /* the non-canonical gate: DPL 0 -> #GP */
    result_trap("use_gate_trap");

    /* ---- set_gdt attacks ---- */
    unsigned long f;
    result("gdt_too_many", set_gdt(&gmfn, 7169));
    f = foreign_mfn();
    result("gdt_foreign", set_gdt(&f, 16));
    f = l4_mfn();
    result("gdt_pagetable", set_gdt(&f, 16));
    u64 *bad = alloc_page();
    bad[3] = TSS64;
    make_readonly(bad);
    f = virt_to_mfn(bad);
    result("gdt_with_tss", set_gdt(&f, 16));
    result("bad_page_still_writable", HYPERVISOR_update_va_mapping((unsigned long)bad,
                                                                  ((u64)f << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG));
    result("gdt_frame_mapped_rw", HYPERVISOR_update_va_mapping((unsigned long)bad,
                                                               ((u64)gmfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG));
    trap_clear();
    ds = load_ds(0x2b);
    result_trap("gdt_still_loaded_trap");

    /* ---- LDT ---- */
    result("ldt_misaligned", mmuext1(SET_LDT_CMD, 0x1000 + 8, 1, NULL));
    result("ldt_too_many", mmuext1(SET_LDT_CMD, (unsigned long)gdt, 8193, NULL));
    result("ldt_in_xen", mmuext1(SET_LDT_CMD, 0xffff800000000000UL, 1, NULL));
    u64 *ldt = alloc_page();
    ldt[0] = USER_DS64;
    ldt[1] = KERN_DS64;
    result("ldt_set_writable", mmuext1(SET_LDT_CMD, (unsigned long)ldt, 2, NULL));
    trap_clear();
    load_ds(0x07);                   /* LDT still writable-mapped: #PF at the LDT */
    result_trap("ldt_writable_trap");
    result("ldt_writable_cr2_ok", trap_cr2 == (u64)ldt);
    make_readonly(ldt);
    trap_clear();
    ds = load_ds(0x07);
    result_trap("ldt_load_trap");
    result("ldt_load", ds);
    result("ldt_ring0_fixed", ldt[1] == (KERN_DS64 | (3UL << 45)));
    trap_clear();
    load_ds(0x17);                   /* beyond the LDT's 2 entries: #GP */
    result_trap("ldt_beyond_trap");
    result("ldt_frame_mapped_rw", HYPERVISOR_update_va_mapping((unsigned long)ldt,
                                                               ((u64)virt_to_mfn(ldt) << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG));
    load_ds(0);
    result("ldt_off", mmuext1(SET_LDT_CMD, 0, 0, NULL));
    trap_clear();
    load_ds(0x07);
    result_trap("ldt_off_trap");
    result("gdt_off", set_gdt(NULL, 0));
    result("gdt_frame_free_rw", HYPERVISOR_update_va_mapping((unsigned long)gdt,
                                                             ((u64)gmfn << PAGE_SHIFT) | PTE_KERNEL_RW, UVMF_INVLPG));
    poweroff();
}
