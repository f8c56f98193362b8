/* Attack: privileged instructions from the PV kernel (which runs at CPL 3).
 * Each must be refused: #GP (13) bounced to the guest, whose handler records
 * the vector and skips the instruction (ABI §5.10). Upstream Xen emulates a
 * few for PV kernels, so `none` is also right there: `clts` (virtual CR0.TS)
 * and `wbinvd` (ignored without cache-flush privilege); `mov cr3` of a real
 * L4 is emulated too, so we load a foreign frame (refused -> #GP).
 * `in`/`out` port 0x80 without I/O privilege -> #GP on Xen; an emulator may
 * not check the I/O bitmap: we print what happens. */
#include "hostile.h"

#define PROBE_FN(name, setup, insn)                                          \
    "    .globl " #name "\n"                                                 \
    #name ":\n"                                                              \
    "    .pushsection .probes, \"a\"\n"                                      \
    "    .quad 8f, 9f\n"                                                     \
    "    .popsection\n"                                                      \
    setup                                                                    \
    "8:  " insn "\n"                                                         \
    "9:  ret\n"

__asm__(
    "    .text\n"
    PROBE_FN(p_hlt, "", "hlt")
    PROBE_FN(p_cli, "", "cli")
    PROBE_FN(p_sti, "", "sti")
    PROBE_FN(p_mov_cr3, "", "mov %rdi, %cr3")
    PROBE_FN(p_mov_cr0, "    mov $0x80050033, %rax\n", "mov %rax, %cr0")
    PROBE_FN(p_wrmsr_efer, "    mov $0xc0000080, %ecx\n    xor %eax, %eax\n    xor %edx, %edx\n", "wrmsr")
    PROBE_FN(p_lgdt, "", "lgdt (%rdi)")
    PROBE_FN(p_lidt, "", "lidt (%rdi)")
    PROBE_FN(p_ltr, "    mov $0x28, %eax\n", "ltr %ax")
    PROBE_FN(p_invlpg, "", "invlpg (%rdi)")
    PROBE_FN(p_in, "", "in $0x80, %al")
    PROBE_FN(p_out, "    xor %eax, %eax\n", "out %al, $0x80")
    PROBE_FN(p_wbinvd, "", "wbinvd")
    PROBE_FN(p_clts, "", "clts")
    PROBE_FN(p_swapgs, "", "swapgs")
    PROBE_FN(p_int80, "", "int $0x80")
);

void p_hlt(void), p_cli(void), p_sti(void), p_mov_cr3(u64), p_mov_cr0(void),
     p_wrmsr_efer(void), p_lgdt(void *), p_lidt(void *), p_ltr(void),
     p_invlpg(void *), p_in(void), p_out(void), p_wbinvd(void), p_clts(void),
     p_swapgs(void), p_int80(void);

static struct { u16 limit; u64 base; } __attribute__((packed)) desc = { 0, 0 };

#define TRY(name, call) do {                                                 \
        printk("about to %s\n", name);                                       \
        trap_clear();                                                        \
        call;                                                                \
        result_trap("priv_" name);                                           \
        if (trap_vec >= 0 && trap_err)                                       \
            printk("result priv_" name "_err 0x%lx\n", trap_err);            \
    } while (0)

void app_main(void)
{
    hostile_traps_init();
    TRY("hlt", p_hlt());
    TRY("cli", p_cli());
    TRY("sti", p_sti());
    TRY("in", p_in());
    TRY("out", p_out());
    TRY("invlpg", p_invlpg((void *)_text));
    TRY("wbinvd", p_wbinvd());
    TRY("clts", p_clts());
    TRY("swapgs", p_swapgs());
    TRY("int80", p_int80());
    TRY("ltr", p_ltr());
    TRY("lgdt", p_lgdt(&desc));
    TRY("lidt", p_lidt(&desc));
    TRY("mov_cr0", p_mov_cr0());
    TRY("mov_cr3", p_mov_cr3((u64)foreign_mfn() << PAGE_SHIFT));
    TRY("wrmsr_efer", p_wrmsr_efer());
    result("priv_traps", trap_count);
    poweroff();
}
