/* A user address space, user-mode entry with HYPERVISOR_iret, syscalls. */
#ifndef AIOVMM_USER_H
#define AIOVMM_USER_H

#include "os.h"

#define USER_CODE_VA   0x400000UL
#define USER_STACK_VA  0x402000UL
#define USER_STACK_TOP (USER_STACK_VA + PAGE_SIZE)

struct user_ctx { u64 rbx, rbp, r12, r13, r14, r15, rsp, rip; };

/* head.S */
long user_enter(struct user_ctx *ctx, u64 rip, u64 rsp);
noreturn void user_resume(struct user_ctx *ctx, long value);

/* Builds the user page tables (L4/L3/L2/L1), maps the user program and a
 * stack, pins the L4 and installs it as the user base pointer. */
void user_setup(void);
/* Runs the user program until it calls exit; returns its status. */
long user_run(void);

#endif
