/* Hypercall wrappers: call hypercall_page + 32*nr, args in RDI RSI RDX R10 R8. */
#ifndef AIOVMM_HYPERCALL_H
#define AIOVMM_HYPERCALL_H

#include "os.h"
#include <xen/sched.h>
#include <xen/event_channel.h>
#include <xen/vcpu.h>
#include <xen/callback.h>
#include <xen/version.h>

#define _hypercall5(nr, a1, a2, a3, a4, a5) ({                               \
    long __res;                                                              \
    register long __r1 __asm__("rdi") = (long)(a1);                          \
    register long __r2 __asm__("rsi") = (long)(a2);                          \
    register long __r3 __asm__("rdx") = (long)(a3);                          \
    register long __r4 __asm__("r10") = (long)(a4);                          \
    register long __r5 __asm__("r8") = (long)(a5);                           \
    __asm__ volatile("call hypercall_page + %c[off]"                         \
                     : "=a"(__res), "+r"(__r1), "+r"(__r2), "+r"(__r3),      \
                       "+r"(__r4), "+r"(__r5)                                \
                     : [off] "i"((nr) * 32)                                  \
                     : "memory", "rcx", "r11", "r9");                        \
    __res;                                                                   \
})
#define _hypercall0(nr)             _hypercall5(nr, 0, 0, 0, 0, 0)
#define _hypercall1(nr, a)          _hypercall5(nr, a, 0, 0, 0, 0)
#define _hypercall2(nr, a, b)       _hypercall5(nr, a, b, 0, 0, 0)
#define _hypercall3(nr, a, b, c)    _hypercall5(nr, a, b, c, 0, 0)
#define _hypercall4(nr, a, b, c, d) _hypercall5(nr, a, b, c, d, 0)

static inline long HYPERVISOR_set_trap_table(const trap_info_t *t)
{ return _hypercall1(__HYPERVISOR_set_trap_table, t); }

static inline long HYPERVISOR_mmu_update(mmu_update_t *req, unsigned count,
                                         unsigned *done, unsigned dom)
{ return _hypercall4(__HYPERVISOR_mmu_update, req, count, done, dom); }

static inline long HYPERVISOR_mmuext_op(struct mmuext_op *op, unsigned count,
                                        unsigned *done, unsigned dom)
{ return _hypercall4(__HYPERVISOR_mmuext_op, op, count, done, dom); }

static inline long HYPERVISOR_stack_switch(unsigned long ss, unsigned long sp)
{ return _hypercall2(__HYPERVISOR_stack_switch, ss, sp); }

static inline long HYPERVISOR_set_callbacks(unsigned long ev, unsigned long fs,
                                            unsigned long sc)
{ return _hypercall3(__HYPERVISOR_set_callbacks, ev, fs, sc); }

static inline long HYPERVISOR_update_va_mapping(unsigned long va, u64 pte,
                                                unsigned long flags)
{ return _hypercall3(__HYPERVISOR_update_va_mapping, va, pte, flags); }

static inline long HYPERVISOR_set_timer_op(u64 timeout)
{ return _hypercall1(__HYPERVISOR_set_timer_op, timeout); }

static inline long HYPERVISOR_xen_version(int cmd, void *arg)
{ return _hypercall2(__HYPERVISOR_xen_version, cmd, arg); }

static inline long HYPERVISOR_console_io(int cmd, unsigned count, const char *buf)
{ return _hypercall3(__HYPERVISOR_console_io, cmd, count, buf); }

static inline long HYPERVISOR_vcpu_op(int cmd, unsigned vcpu, void *arg)
{ return _hypercall3(__HYPERVISOR_vcpu_op, cmd, vcpu, arg); }

static inline long HYPERVISOR_sched_op(int cmd, void *arg)
{ return _hypercall2(__HYPERVISOR_sched_op, cmd, arg); }

static inline long HYPERVISOR_event_channel_op(int cmd, void *arg)
{ return _hypercall2(__HYPERVISOR_event_channel_op, cmd, arg); }

static inline long HYPERVISOR_multicall(void *list, unsigned long n)
{ return _hypercall2(__HYPERVISOR_multicall, list, n); }

static inline long HYPERVISOR_grant_table_op(unsigned cmd, void *uop, unsigned count)
{ return _hypercall3(__HYPERVISOR_grant_table_op, cmd, uop, count); }

static inline long HYPERVISOR_memory_op(unsigned cmd, void *arg)
{ return _hypercall2(__HYPERVISOR_memory_op, cmd, arg); }

static inline long HYPERVISOR_callback_op(int cmd, void *arg)
{ return _hypercall2(__HYPERVISOR_callback_op, cmd, arg); }

#endif
