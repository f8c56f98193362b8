/* Exception, event and syscall entry from Xen bounce frames. */
#ifndef AIOVMM_TRAPS_H
#define AIOVMM_TRAPS_H

#include "os.h"

/* Saved state built by the entry stubs in head.S (lowest address first).
 * From `rip` upwards it is Xen's bounce frame minus the RCX/R11 slots,
 * which the stubs pop into the registers they belong to. */
struct regs {
    u64 r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8;
    u64 rax, rcx, rdx, rsi, rdi;
    u64 vector;     /* exception vector, or VEC_EVENT / VEC_SYSCALL */
    u64 error;      /* error code (0 if the vector has none) */
    u64 rip;
    u64 cs;         /* bits 15:0 selector, bits 39:32 saved upcall mask */
    u64 rflags;
    u64 rsp;
    u64 ss;
};

#define VEC_EVENT   0x100
#define VEC_SYSCALL 0x101

/* Handler returns 1 if it handled the trap (execution resumes at regs->rip),
 * 0 to fall through to the default (panic). */
typedef int (*trap_handler_t)(struct regs *regs);

void traps_init(void);                 /* set_trap_table + set_callbacks */
void set_trap_handler(unsigned vector, trap_handler_t h);
void set_syscall_handler(void (*h)(struct regs *regs));
const char *trap_name(unsigned vector);
static inline int regs_from_user(const struct regs *r) { return (r->cs & 3) == 3; }

/* Probe routines (probes.S): each runs one faulting instruction; a handler
 * resumes after it with fixup_skip(). */
void probe_div0(void);
void probe_int3(void);
void probe_ud2(void);
void probe_hlt(void);
void probe_cli(void);
u64 probe_read(unsigned long addr);

/* If regs->rip is at (fault) or just after (trap) a probe instruction, move
 * rip past it, return the instruction's length; else return 0. */
int fixup_skip(struct regs *regs);
/* Length of the probe instruction starting at `rip`, or 0 if none. */
int probe_insn_len(u64 rip);

/* Entry points in head.S. */
extern char hypervisor_callback[], failsafe_callback[], syscall_callback[];
extern char trap_nmi[];          /* NMI entry (vector 2): set_trap_handler(2, ...) */

#endif
