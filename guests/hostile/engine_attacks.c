/* Attack: instructions aimed at a hardware-assisted vCPU engine (the KVM engine's IDT,
 * TSS, syscall entry and ring-0 stubs), run from the PV kernel at CPL 3.
 * Xen: vmcall/vmmcall outside VMX/SVM -> #UD; `int $n` through a gate the guest may not
 * use -> #GP with error (n << 3) | 2; int $3 / int $4 reach the guest's DPL-3 handlers as
 * traps (RIP past the instruction); every address of Xen's private area faults (#PF);
 * SYSCALL from the guest kernel is a hypercall (rax = number). */
#include "hostile.h"

#define PROBE(name, insn)                                                    \
    "    .globl " #name "\n"                                                 \
    #name ":\n"                                                              \
    "    .pushsection .probes, \"a\"\n"                                      \
    "    .quad 8f, 9f\n"                                                     \
    "    .popsection\n"                                                      \
    "8:  " insn "\n"                                                         \
    "9:  ret\n"

__asm__(
    "    .text\n"
    PROBE(p_vmcall, ".byte 0x0f, 0x01, 0xc1")
    PROBE(p_vmmcall, ".byte 0x0f, 0x01, 0xd9")
    "    .globl p_syscall_xenver\n"
    "p_syscall_xenver:\n"                       /* rax = xen_version(XENVER_version, 0) */
    "    push %rcx\n    push %r11\n"
    "    mov $17, %eax\n    xor %edi, %edi\n    xor %esi, %esi\n"
    "    syscall\n"
    "    pop %r11\n    pop %rcx\n    ret\n"
    /* 256 stubs of 8 bytes: `int $n; ret`, each a probe. */
    "    .balign 8\n"
    "    .globl int_stubs\n"
    "int_stubs:\n"
    "    .set n, 0\n"
    "    .rept 256\n"
    "    .pushsection .probes, \"a\"\n"
    "    .quad int_stubs + 8 * n, int_stubs + 8 * n + 2\n"
    "    .popsection\n"
    "    .byte 0xcd, n, 0xc3, 0x90, 0x90, 0x90, 0x90, 0x90\n"
    "    .set n, n + 1\n"
    "    .endr\n"
);

void p_vmcall(void), p_vmmcall(void);
long p_syscall_xenver(void);
extern char int_stubs[];

/* The KVM engine's ring-0 pages (IDT, stubs, TSS, stack) in Xen's slot 261. */
#define ENGINE_R0_VA (XEN_PRIV_VA + 0x20000UL)

static void access(const char *key, unsigned long va, int write)
{
    trap_clear();
    if (write)
        probe_store64((volatile u64 *)va, 0x4141414141414141UL);
    else
        (void)probe_load64((volatile u64 *)va);
    result_trap(key);
}

void app_main(void)
{
    hostile_traps_init();

    trap_clear();
    p_vmcall();
    result_trap("vmcall_trap");
    trap_clear();
    p_vmmcall();
    result_trap("vmmcall_trap");

    /* Software interrupt vectors; print only the ones that differ from Xen. Vectors 0-31
     * (other than 3 and 4) only with `low=1`: neither engine gives Xen's #GP there yet
     * (the emulated one reports the exception itself; kvm-pvm is inconsistent). */
    unsigned mismatches = 0;
    int low = cmdline_u64((const char *)start_info->cmd_line, "low", 0) != 0;
    for (unsigned n = 0; n < 256; n++) {
        if (n < 32 && n != 3 && n != 4 && !low)
            continue;
        trap_clear();
        ((void (*)(void))(int_stubs + 8 * n))();
        long want_vec = (n == 3 || n == 4) ? (long)n : 13;
        u64 want_err = (n == 3 || n == 4) ? 0 : ((u64)n << 3) | 2;
        if (trap_vec != want_vec || trap_err != want_err) {
            mismatches++;
            printk("int %u: vector %ld err 0x%lx\n", n, trap_vec, trap_err);
        }
    }
    result("int_n_mismatches", mismatches);

    static const char *names[] = { "idt", "stubs", "tss", "stack" };
    char key[40];
    for (unsigned i = 0; i < 4; i++) {
        for (int w = 0; w < 2; w++) {
            snprintf(key, sizeof key, "engine_%s_%s_trap", names[i], w ? "write" : "read");
            access(key, ENGINE_R0_VA + 0x1000UL * i, w);
        }
    }

    trap_clear();
    long v = p_syscall_xenver();
    result_trap("syscall_trap");
    result("syscall_hypercall_ok", v == HYPERVISOR_xen_version(XENVER_version, NULL));
    result("alive", 1);
}
