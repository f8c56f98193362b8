#include "traps.h"
#include "hypercall.h"
#include "console.h"
#include "sched.h"
#include "events.h"

/* Entry stubs (head.S). */
extern char trap_divide_error[], trap_debug[], trap_int3[], trap_overflow[],
    trap_bounds[], trap_invalid_op[], trap_device_not_available[],
    trap_invalid_tss[], trap_segment_not_present[], trap_stack_segment[],
    trap_general_protection[], trap_page_fault[], trap_coprocessor_error[],
    trap_alignment_check[], trap_simd_error[];

#define FLAGS_DPL3 3

static const trap_info_t trap_table[] = {
    {  0, 0,          FLAT_KERNEL_CS, (unsigned long)trap_divide_error },
    {  1, 0,          FLAT_KERNEL_CS, (unsigned long)trap_debug },
    {  3, FLAGS_DPL3, FLAT_KERNEL_CS, (unsigned long)trap_int3 },
    {  4, FLAGS_DPL3, FLAT_KERNEL_CS, (unsigned long)trap_overflow },
    {  5, 0,          FLAT_KERNEL_CS, (unsigned long)trap_bounds },
    {  6, 0,          FLAT_KERNEL_CS, (unsigned long)trap_invalid_op },
    {  7, 0,          FLAT_KERNEL_CS, (unsigned long)trap_device_not_available },
    { 10, 0,          FLAT_KERNEL_CS, (unsigned long)trap_invalid_tss },
    { 11, 0,          FLAT_KERNEL_CS, (unsigned long)trap_segment_not_present },
    { 12, 0,          FLAT_KERNEL_CS, (unsigned long)trap_stack_segment },
    { 13, 0,          FLAT_KERNEL_CS, (unsigned long)trap_general_protection },
    { 14, 0,          FLAT_KERNEL_CS, (unsigned long)trap_page_fault },
    { 16, 0,          FLAT_KERNEL_CS, (unsigned long)trap_coprocessor_error },
    { 17, 0,          FLAT_KERNEL_CS, (unsigned long)trap_alignment_check },
    { 19, 0,          FLAT_KERNEL_CS, (unsigned long)trap_simd_error },
    {  0, 0,          0,              0 },
};

static trap_handler_t handlers[32];
static void (*syscall_handler)(struct regs *regs);

static const char *const names[32] = {
    [0] = "#DE", [1] = "#DB", [2] = "NMI", [3] = "#BP", [4] = "#OF",
    [5] = "#BR", [6] = "#UD", [7] = "#NM", [8] = "#DF", [10] = "#TS",
    [11] = "#NP", [12] = "#SS", [13] = "#GP", [14] = "#PF", [16] = "#MF",
    [17] = "#AC", [18] = "#MC", [19] = "#XM",
};

const char *trap_name(unsigned v)
{
    if (v == VEC_EVENT) return "event";
    if (v == VEC_SYSCALL) return "syscall";
    return (v < 32 && names[v]) ? names[v] : "?";
}

void traps_init(void)
{
    long rc = HYPERVISOR_set_trap_table(trap_table);
    if (rc) panic("set_trap_table failed: %ld", rc);
    rc = HYPERVISOR_set_callbacks((unsigned long)hypervisor_callback,
                                  (unsigned long)failsafe_callback,
                                  (unsigned long)syscall_callback);
    if (rc) panic("set_callbacks failed: %ld", rc);
}

void set_trap_handler(unsigned v, trap_handler_t h)
{
    if (v < 32) handlers[v] = h;
}

void set_syscall_handler(void (*h)(struct regs *)) { syscall_handler = h; }

/* Probe table emitted by probes.S: pairs of (instruction, next). */
struct probe { u64 insn, next; };
extern const struct probe __probes_start[], __probes_end[];

int probe_insn_len(u64 rip)
{
    for (const struct probe *p = __probes_start; p < __probes_end; p++)
        if (p->insn == rip) return (int)(p->next - p->insn);
    return 0;
}

int fixup_skip(struct regs *r)
{
    for (const struct probe *p = __probes_start; p < __probes_end; p++) {
        if (p->insn == r->rip) {            /* fault: rip at the instruction */
            r->rip = p->next;
            return (int)(p->next - p->insn);
        }
        if (p->next == r->rip && (r->vector == 3 || r->vector == 4))
            return (int)(p->next - p->insn); /* trap: already past it */
    }
    return 0;
}

static noreturn void unhandled(struct regs *r)
{
    if (r->vector == 14)
        panic("unhandled trap %lu (%s) at rip=0x%lx err=0x%lx cr2=0x%lx%s",
              r->vector, trap_name(r->vector), r->rip, r->error,
              vcpu0()->arch.cr2, regs_from_user(r) ? " (user)" : "");
    panic("unhandled trap %lu (%s) at rip=0x%lx err=0x%lx%s",
          r->vector, trap_name(r->vector), r->rip, r->error,
          regs_from_user(r) ? " (user)" : "");
}

/* Common C entry for every bounce (head.S: trap_common). */
void trap_dispatch(struct regs *r)
{
    if (r->vector == VEC_EVENT) {
        evtchn_do_upcall(r);
        return;
    }
    if (r->vector == VEC_SYSCALL) {
        if (syscall_handler) {
            syscall_handler(r);
            return;
        }
        panic("syscall from user mode with no handler (rax=%lu)", r->rax);
    }
    if (r->vector < 32 && handlers[r->vector] && handlers[r->vector](r))
        return;
    unhandled(r);
}

/* Failsafe frame: rcx, r11 popped by the stub; then ds, es, fs, gs, rip, ... */
void do_failsafe(u64 *frame)
{
    panic("failsafe callback: ds=%lx es=%lx fs=%lx gs=%lx rip=0x%lx cs=%lx",
          frame[0], frame[1], frame[2], frame[3], frame[4], frame[5] & 0xffff);
}
