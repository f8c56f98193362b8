/* Attack on the bounce-frame range check: the kernel's RSP at HYPERVISOR_VIRT_END + 0x50
 * (aligned, so inside [HYPERVISOR_VIRT_END + 64, HYPERVISOR_VIRT_END + 120)) and a #UD.
 * Xen (x86_64/entry.S create_bounce_frame) checks the aligned stack pointer before the frame
 * is pushed, not the frame: the stack is above HYPERVISOR_VIRT_END + 64, so the 7-slot frame
 * goes to HYPERVISOR_VIRT_END + 0x18 (guest space, L4 slot 272) and the handler runs.
 * Slot 272 is made to map the kernel's own first 2 MiB (its L3 entry 0 -> the kernel L2),
 * so the frame lands in _start's bytes (run once at boot). */
#include "hostile.h"

#define HV_END 0xFFFF880000000000UL

volatile u64 edge_saved_rsp, edge_frame_rsp;
void edge_fault(unsigned long stack);
void edge_ud(void);
extern char edge_ud2[];
__asm__(
    "    .text\n"
    "    .globl edge_fault, edge_ud, edge_ud2\n"
    "edge_fault:\n"
    "    mov %rsp, edge_saved_rsp(%rip)\n"
    "    mov %rdi, %rsp\n"
    "edge_ud2:\n"
    "    ud2\n"
    "edge_resume:\n"
    "    mov edge_saved_rsp(%rip), %rsp\n"
    "    ret\n"
    "edge_ud:\n"
    "    mov %rsp, edge_frame_rsp(%rip)\n"
    "    jmp edge_resume\n");

void app_main(void)
{
    hostile_traps_init();
    struct walk w;
    pt_walk(VIRT_BASE, &w);
    unsigned done = 0;
    long rc = mmu1(entry_ma(w.mfn[3], 0), ((u64)w.mfn[2] << PAGE_SHIFT) | PTE_TABLE, &done);
    result_done("edge_l3", rc, done);
    rc = mmu1(entry_ma(l4_mfn(), 272), ((u64)w.mfn[3] << PAGE_SHIFT) | PTE_TABLE, &done);
    result_done("edge_l4", rc, done);
    tlb_flush_local();
    result("edge_alias", probe_load64((const volatile void *)HV_END) == *(volatile u64 *)VIRT_BASE);

    trap_info_t t[2];
    memset(t, 0, sizeof(t));
    t[0].vector = 6;
    t[0].cs = 0xe033;
    t[0].address = (unsigned long)edge_ud;
    HYPERVISOR_shared_info->vcpu_info[0].evtchn_upcall_mask = 1;
    HYPERVISOR_set_trap_table(t);
    printk("about to fault with rsp=%lx\n", HV_END + 0x50);
    edge_fault(HV_END + 0x50);
    hostile_traps_init();
    HYPERVISOR_shared_info->vcpu_info[0].evtchn_upcall_mask = 0;
    result("edge_frame_at_end_plus_0x18", edge_frame_rsp == HV_END + 0x18);
    const volatile u64 *f = (const volatile u64 *)(HV_END + 0x18);
    result("edge_frame_rip_ok", f[2] == (u64)edge_ud2);
    poweroff();
}
