/* aiovmm slice hook: a Unicorn UC_HOOK_BLOCK callback, built by `make setup`.
 *
 * Why C: a Python block hook would cost microseconds per translation block; this one costs
 * a few nanoseconds. It ends a vCPU slice precisely, at a block boundary, from inside the
 * emulation thread itself. Stopping emulation from another thread (uc_emu_stop from outside,
 * or emu_start(timeout=)) re-executes read-modify-write instructions and corrupts guest state
 * (shared/research/unicorn/NOTES.md), so it is never done.
 *
 * The hypervisor owns one `struct aiovmm_slice` per vCPU. Before each emu_start it sets
 * `budget` (blocks this slice may run); another thread or the loop may set `preempt` at any
 * time. The hook counts blocks (cheap CPU accounting) and stops when either fires.
 * `stop` is Unicorn's uc_emu_stop, passed in so this library need not link libunicorn. */
#include <stdint.h>
#include <time.h>

typedef int (*uc_stop_fn)(void *uc);

struct aiovmm_slice {
    volatile int32_t preempt;   /* set by anyone: stop at the next block boundary */
    int32_t reason;             /* out: 0 none, 1 budget exhausted, 2 preempted, 3 time */
    int64_t budget;             /* blocks left in this slice */
    uint64_t blocks;            /* blocks executed in total (accounting) */
    uc_stop_fn stop;            /* uc_emu_stop */
    int64_t deadline_ns;        /* CLOCK_MONOTONIC end of the slice (0: none) */
};

/* The block budget alone does not bound a slice's wall time: a guest that makes a hypercall
 * in every block spends microseconds of Python per block. So every 64 blocks the hook also
 * compares the monotonic clock (a vDSO call, ~25 ns) with the slice's deadline. */
void aiovmm_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct aiovmm_slice *s = (struct aiovmm_slice *)user_data;
    (void)address; (void)size;
    s->blocks++;
    if (s->preempt) {
        s->preempt = 0;
        s->reason = 2;
        s->stop(uc);
    } else if (--s->budget <= 0) {
        s->reason = 1;
        s->stop(uc);
    } else if (s->deadline_ns && (s->blocks & 63) == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if ((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec >= s->deadline_ns) {
            s->reason = 3;
            s->stop(uc);
        }
    }
}

/* UC_HOOK_CODE callback counting executed instructions (benchmarks only: a per-instruction
 * hook halves emulation speed, so it is installed on request, never on the normal path). */
void aiovmm_insn_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    (void)uc; (void)address; (void)size;
    (*(volatile uint64_t *)user_data)++;
}

/* UC_HOOK_INSN(SYSCALL) callback: the hypercall entry. Reading the six argument registers
 * and writing RAX back through the Python binding cost ~2.7 us per hypercall; done here they
 * cost ~0.1 us. The Python handler (`enter`) reads args[] and, to return a value, sets
 * ret and set_ret. */
struct aiovmm_hcall {
    uint64_t args[6];            /* rax rdi rsi rdx r10 r8 */
    uint64_t ret;
    int32_t set_ret;
    int32_t ids[6];              /* UC_X86_REG_* of args[] */
    int32_t rax_id;
    int (*read_batch)(void *uc, int *ids, void **vals, int count);
    int (*write_reg)(void *uc, int id, const void *value);
    void (*enter)(void);
};

void aiovmm_syscall_hook(void *uc, void *user_data)
{
    struct aiovmm_hcall *h = (struct aiovmm_hcall *)user_data;
    void *vals[6] = { &h->args[0], &h->args[1], &h->args[2], &h->args[3], &h->args[4], &h->args[5] };
    h->read_batch(uc, h->ids, vals, 6);
    h->set_ret = 0;
    h->enter();
    if (h->set_ret)
        h->write_reg(uc, h->rax_id, &h->ret);
}

/* UC_HOOK_INSN(RDTSC / RDTSCP) callbacks: the guest's TSC. Linux reads it ~100k times
 * while booting (pvclock reads, the PIT calibration loop); through a Python callback each
 * read cost microseconds (RDTSCP also read TSC_AUX through the binding). The guest TSC is
 * Xen system time, nanoseconds of CLOCK_MONOTONIC since the hypervisor's origin: the same
 * clock as Hypervisor.system_time_ns (time.monotonic_ns() is CLOCK_MONOTONIC), whose
 * origin the engine copies here. `aux` mirrors the vCPU's TSC_AUX MSR (set_msr keeps it).
 * Returning 1 tells Unicorn the instruction is handled. */
struct aiovmm_tsc {
    int64_t origin_ns;
    uint64_t aux;
    int32_t ids[3];              /* UC_X86_REG_RAX, RDX, RCX */
    int (*write_batch)(void *uc, int *ids, void *const *vals, int count);
};

static uint64_t guest_tsc(const struct aiovmm_tsc *t)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec - t->origin_ns);
}

uint32_t aiovmm_rdtsc_hook(void *uc, void *user_data)
{
    struct aiovmm_tsc *t = (struct aiovmm_tsc *)user_data;
    uint64_t now = guest_tsc(t);
    uint64_t vals[3] = { now & 0xFFFFFFFFu, now >> 32, t->aux & 0xFFFFFFFFu };
    void *ptrs[3] = { &vals[0], &vals[1], &vals[2] };
    t->write_batch(uc, t->ids, ptrs, 2);
    return 1;
}

uint32_t aiovmm_rdtscp_hook(void *uc, void *user_data)
{
    struct aiovmm_tsc *t = (struct aiovmm_tsc *)user_data;
    uint64_t now = guest_tsc(t);
    uint64_t vals[3] = { now & 0xFFFFFFFFu, now >> 32, t->aux & 0xFFFFFFFFu };
    void *ptrs[3] = { &vals[0], &vals[1], &vals[2] };
    t->write_batch(uc, t->ids, ptrs, 3);
    return 1;
}
