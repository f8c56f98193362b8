/* The DS/ES/FS/GS selectors of a VCPUOP_initialise context (user_regs.ds/es/fs/gs) as Xen
 * takes them (arch/x86/domain.c arch_set_info_guest keeps them; load_segments loads them
 * when the vCPU first runs, FS/GS bases from the context after the selectors; a selector
 * that does not load is NUL and the vCPU starts in its failsafe callback, frame
 * [rcx r11 ds es fs gs rip cs rflags rsp ss] with the selectors asked for).
 * vCPU 1: Xen's flat selectors, which load. vCPU 2: DS names an empty GDT slot.
 * Cmdline: vcpus=3; hold=1: stay up (blocked) after "segs: done", for the host to read the
 * vCPUs' registers. Output: "result <name> <value>" lines, "segs: done", "poweroff". */
#include "hypercall.h"
#include "console.h"
#include "lib.h"
#include "mm.h"
#include "sched.h"
#include "time.h"
#include "traps.h"
#include <xen/vcpu.h>

#define R(name, expr) printk("result %s %ld\n", name, (long)(expr))

static u8 stack1[8192] __attribute__((aligned(16))), stack2[8192] __attribute__((aligned(16)));
static u64 fs_area[2] = { 0x1111222233334444UL, 0 }, gs_area[2] = { 0x5555666677778888UL, 0 };
static vcpu_guest_context_t ctx;

/* vCPU 1: its selectors and %fs:0 / %gs:0 at its first instruction. */
volatile u64 a1_sel[4], a1_fs_word, a1_gs_word, a1_done;
/* vCPU 2: the failsafe frame and its DS/ES at the callback. */
volatile u64 a2_frame[11], a2_ds, a2_es, a2_done;

extern char entry1[], entry2[], failsafe2[];
__asm__(".text\n"
        "entry1:\n"
        "    mov %ds, %eax\n    mov %rax, a1_sel(%rip)\n"
        "    mov %es, %eax\n    mov %rax, a1_sel+8(%rip)\n"
        "    mov %fs, %eax\n    mov %rax, a1_sel+16(%rip)\n"
        "    mov %gs, %eax\n    mov %rax, a1_sel+24(%rip)\n"
        "    mov %fs:0, %rax\n  mov %rax, a1_fs_word(%rip)\n"
        "    mov %gs:0, %rax\n  mov %rax, a1_gs_word(%rip)\n"
        "    movq $1, a1_done(%rip)\n"
        "    jmp ap_down\n"
        "entry2:\n"                     /* never reached: the failsafe callback runs first */
        "    ud2\n"
        "failsafe2:\n"
        "    lea a2_frame(%rip), %rdi\n"
        "    mov %rsp, %rsi\n"
        "    mov $11, %ecx\n"
        "    rep movsq\n"
        "    mov %ds, %eax\n    mov %rax, a2_ds(%rip)\n"
        "    mov %es, %eax\n    mov %rax, a2_es(%rip)\n"
        "    movq $1, a2_done(%rip)\n"
        "    and $-16, %rsp\n"
        "    jmp ap_down\n");

noreturn void ap_down_c(void);
noreturn void ap_down_c(void)
{
    /* Which vCPU: the one whose flag was just set and which is still up. */
    for (;;) {
        HYPERVISOR_vcpu_op(VCPUOP_down, a2_done ? 2 : 1, NULL);
        sched_yield();
    }
}
__asm__(".text\nap_down:\n    and $-16, %rsp\n    call ap_down_c\n    ud2\n");

static void context(u8 *stack, char *entry)
{
    memset(&ctx, 0, sizeof(ctx));
    ctx.flags = VGCF_in_kernel;
    ctx.user_regs.rip = (unsigned long)entry;
    ctx.user_regs.rsp = (unsigned long)(stack + 8192);
    ctx.user_regs.cs = FLAT_KERNEL_CS;
    ctx.user_regs.ss = FLAT_KERNEL_SS;
    ctx.user_regs.rflags = 0x1000;
    ctx.kernel_ss = FLAT_KERNEL_SS;
    ctx.kernel_sp = (unsigned long)(stack + 8192);
    ctx.ctrlreg[3] = virt_to_mfn((void *)start_info->pt_base) << PAGE_SHIFT;
}

static void wait_for(volatile u64 *flag, const char *what)
{
    u64 t0 = monotonic_ns();
    while (!*flag)
        if (monotonic_ns() - t0 > 60000000000UL)
            panic("%s never ran", what);
}

void app_main(void)
{
    traps_init();
    /* vCPU 1: DS FLAT_USER_DS, ES FLAT_USER_CS32 (readable code), FS FLAT_USER_CS64, GS
     * FLAT_USER_DS; the FS/GS bases are the context's, not the descriptors' 0. */
    context(stack1, entry1);
    ctx.user_regs.ds = 0xe02b;
    ctx.user_regs.es = 0xe023;
    ctx.user_regs.fs = 0xe033;
    ctx.user_regs.gs = 0xe02b;
    ctx.fs_base = (unsigned long)fs_area;
    ctx.gs_base_kernel = (unsigned long)gs_area;
    R("init_1", HYPERVISOR_vcpu_op(VCPUOP_initialise, 1, &ctx));
    R("up_1", HYPERVISOR_vcpu_op(VCPUOP_up, 1, NULL));
    wait_for(&a1_done, "vCPU 1");
    R("a1_ds", a1_sel[0]);
    R("a1_es", a1_sel[1]);
    R("a1_fs", a1_sel[2]);
    R("a1_gs", a1_sel[3]);
    R("a1_fs_word", a1_fs_word == fs_area[0]);
    R("a1_gs_word", a1_gs_word == gs_area[0]);

    /* vCPU 2: DS 0x13 (GDT entry 2; the vCPU has no GDT frames: an empty descriptor)
     * does not load; ES loads. Events masked in the callback (VGCF flag). */
    context(stack2, entry2);
    ctx.user_regs.ds = 0x13;
    ctx.user_regs.es = 0xe02b;
    ctx.failsafe_callback_eip = (unsigned long)failsafe2;
    ctx.flags |= VGCF_failsafe_disables_events;
    HYPERVISOR_shared_info->vcpu_info[2].evtchn_upcall_mask = 0;
    R("init_2", HYPERVISOR_vcpu_op(VCPUOP_initialise, 2, &ctx));
    R("up_2", HYPERVISOR_vcpu_op(VCPUOP_up, 2, NULL));
    wait_for(&a2_done, "vCPU 2's failsafe callback");
    R("a2_ds", a2_ds);
    R("a2_es", a2_es);
    R("fr_ds", a2_frame[2]);
    R("fr_es", a2_frame[3]);
    R("fr_fs", a2_frame[4]);
    R("fr_gs", a2_frame[5]);
    R("fr_rip", a2_frame[6] == (unsigned long)entry2);
    R("fr_cs", a2_frame[7] & 0xffff);
    R("fr_mask", a2_frame[7] >> 32);
    R("fr_rsp", a2_frame[9] == (unsigned long)(stack2 + 8192));
    R("fr_ss", a2_frame[10]);
    R("a2_events_masked", HYPERVISOR_shared_info->vcpu_info[2].evtchn_upcall_mask);
    printk("segs: done\n");
    if (cmdline_u64((const char *)start_info->cmd_line, "hold", 0))
        for (;;)
            sched_block();
    poweroff();
}
