/* set_segment_base(SEGBASE_GS_USER_SEL, sel) (Xen's do_set_segment_base): Xen loads the
 * selector into %gs at CPL 0 with RPL 3 forced (a null selector, 0-3, as given) and takes
 * the user GS base from the descriptor; a load that faults (beyond the limit, not a data
 * or readable code segment, DPL below 3, not present) loads the null selector instead and
 * the hypercall still returns 0. For each case: `result <case>_rc <rc>`, `result
 * <case>_ksel <%gs read in kernel mode>`, and from user mode `result <case>_user <n>`:
 * the user program reads %gs and a 16-bit marker through %gs at the offset that reaches
 * the marker if the base is the expected one, and exits with (%gs << 16) | marker; a
 * fault there gives (%gs << 16) | 0xdead. `result kgs_kept 1`: the kernel's own GS base
 * (set with SEGBASE_GS_KERNEL) is untouched by the calls. */
#include "hostile.h"
#include "user.h"

#define SEGBASE_GS_KERNEL 2
#define SEGBASE_GS_USER_SEL 3
#define SET_LDT_CMD 13


/* movzwl %gs:DISP32, %edi ; mov %gs, %eax ; shl $16, %eax ; or %eax, %edi ;
 * mov $60, %eax ; syscall ; jmp .   The marker sits at MARK_OFF in the code page. */
static const u8 prog[] = {
    0x65, 0x0F, 0xB7, 0x3C, 0x25, 0, 0, 0, 0,   /* movzwl %gs:disp32, %edi (disp at 5) */
    0x8C, 0xE8,                                 /* mov %gs, %eax */
    0xC1, 0xE0, 0x10,                           /* shl $16, %eax */
    0x09, 0xC7,                                 /* or %eax, %edi */
    0xB8, 0x3C, 0x00, 0x00, 0x00,               /* mov $60, %eax (exit) */
    0x0F, 0x05,                                 /* syscall */
    0xEB, 0xFE,                                 /* jmp . */
};
#define LOAD_LEN 9
#define MARK_OFF 0x40
#define MARK 0x5EA1
#define GDT_BASE (USER_CODE_VA + 0x10)           /* a descriptor's base: not page aligned */
#define LDT_BASE (USER_CODE_VA + 0x20)

static u8 *code;

static int on_user_fault(struct regs *r)
{
    if (!regs_from_user(r) || r->rip != USER_CODE_VA)
        return 0;
    r->rdi = 0xdead;
    r->rip += LOAD_LEN;
    return 1;
}

/* A data descriptor: base, limit 0xfffff pages, access byte `access`. */
static u64 desc(u32 base, u8 access)
{
    return 0xffffUL | ((u64)(base & 0xffffff) << 16) | ((u64)access << 40) | (0xcUL << 52)
           | (0xfUL << 48) | ((u64)(base >> 24) << 56);
}

static void one(const char *name, u64 sel, u64 want_base)
{
    char key[48];
    u32 disp = (u32)(USER_CODE_VA + MARK_OFF - want_base);
    memcpy(code + 5, &disp, 4);
    long rc = _hypercall2(__HYPERVISOR_set_segment_base, SEGBASE_GS_USER_SEL, sel);
    u16 ksel;
    __asm__ volatile("mov %%gs, %0" : "=r"(ksel));
    snprintf(key, sizeof key, "%s_rc", name);
    result(key, rc);
    snprintf(key, sizeof key, "%s_ksel", name);
    result(key, ksel);
    long status = user_run();
    snprintf(key, sizeof key, "%s_user", name);
    result(key, status);
}

void app_main(void)
{
    traps_init();
    set_trap_handler(14, on_user_fault);
    static u64 kcell[2] __attribute__((aligned(16))) = { 0, 0x1234567890abcdefUL };
    _hypercall2(__HYPERVISOR_set_segment_base, SEGBASE_GS_KERNEL, (u64)kcell);
    code = user_install(prog, sizeof prog);
    u16 mark = MARK;
    memcpy(code + MARK_OFF, &mark, 2);

    u64 *gdt = alloc_page();
    gdt[5] = desc(GDT_BASE, 0xf2);            /* 0x2b: data, DPL 3, not yet accessed */
    gdt[6] = desc(GDT_BASE, 0x72);            /* 0x33: not present */
    gdt[7] = desc(GDT_BASE, 0xf8);            /* 0x3b: code, execute-only */
    gdt[8] = desc(GDT_BASE, 0xfa);            /* 0x43: code, readable */
    gdt[9] = 0x0000800000000000UL;            /* 0x4b: present, system type 0 */
    unsigned long gmfn = virt_to_mfn(gdt);
    make_readonly(gdt);
    result("gdt", _hypercall2(__HYPERVISOR_set_gdt, &gmfn, 16));
    u64 *ldt = alloc_page();
    ldt[1] = desc(LDT_BASE, 0xf2);            /* 0x0f */
    make_readonly(ldt);
    result("ldt", mmuext1(SET_LDT_CMD, (unsigned long)ldt, 2, NULL));

    one("gdt_data", 0x28, GDT_BASE);          /* RPL 0 given: loaded as 0x2b */
    result("gdt_accessed", (gdt[5] >> 40) & 1);
    one("null", 0, 0);
    one("null_rpl2", 2, 0);
    one("not_present", 0x33, 0);
    one("exec_only", 0x3b, 0);
    one("readable_code", 0x43, GDT_BASE);
    one("system", 0x4b, 0);
    one("beyond_entries", 0x83, 0);           /* entry 16: a zero descriptor */
    one("beyond_limit", 0xfff8, 0);           /* past Xen's last reserved entry */
    one("xen_user_ds", 0xe02b, 0);            /* FLAT_RING3_DS64, base 0 */
    one("xen_ring0_ds", 0xe010, 0);           /* FLAT_RING0_DS: DPL 0 < RPL 3 */
    one("ldt_data", 0x0f, LDT_BASE);
    one("ldt_beyond", 0x17, 0);               /* beyond the LDT's 2 entries */
    one("upper_bits", 0xdead0000002bUL, GDT_BASE);  /* only the low 16 bits count */
    u64 k;
    __asm__ volatile("mov %%gs:8, %0" : "=r"(k));
    result("kgs_kept", k == kcell[1]);
    result("alive", 1);
    poweroff();
}
