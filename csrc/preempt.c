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

/* ---- Slices without a block hook ------------------------------------------------------
 * A UC_HOOK_BLOCK callback, however small, makes Unicorn call a helper at the start of
 * every translated block: ~2x on Linux's tight boot loops (bench/linux_profile.py). The
 * alternative is the emulator's own exit request (uc_emu_stop) from a timer thread. That
 * is only precise if the translated code checks the request at block starts alone:
 * Unicorn 2.1.4 also checks after every guest load and store (tcg-op.c
 * check_exit_request), which stops in the middle of an instruction and re-executes it
 * (read-modify-write instructions applied twice: shared/research/unicorn/NOTES.md). The
 * engine turns those checks off (uc_struct.no_exit_request, vcpu_engine.py) and then uses
 * this timer: one thread per vCPU that calls uc_emu_stop when the armed slice's deadline
 * passes, or at once on aiovmm_timer_kick (preempt). */
#include <pthread.h>
#include <stdlib.h>

struct aiovmm_timer {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t thread;
    void *uc;
    uc_stop_fn stop;
    int64_t deadline_ns;         /* CLOCK_MONOTONIC end of the armed slice */
    int armed;                   /* a slice is running */
    int fired;                   /* out: 0 none, 2 preempted, 3 deadline */
    int quit;
    int64_t fired_ns;            /* when the timer last called stop (diagnostics) */
};

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *timer_main(void *arg)
{
    struct aiovmm_timer *t = (struct aiovmm_timer *)arg;
    pthread_mutex_lock(&t->lock);
    while (!t->quit) {
        if (!t->armed) {
            pthread_cond_wait(&t->cond, &t->lock);
            continue;
        }
        int64_t now = mono_ns();
        if (now >= t->deadline_ns) {
            /* Stop, and again every 50 us until the slice is disarmed: a request that
             * lands while Unicorn resumes after a hook changed RIP can be cleared by it. */
            if (!t->fired) {
                t->fired_ns = now;
                t->fired = 3;
            }
            t->stop(t->uc);      /* under the lock: disarm cannot pass it */
            t->deadline_ns = now + 50000;
        }
        struct timespec ts = { t->deadline_ns / 1000000000, t->deadline_ns % 1000000000 };
        pthread_cond_timedwait(&t->cond, &t->lock, &ts);
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

struct aiovmm_timer *aiovmm_timer_new(void *uc, uc_stop_fn stop)
{
    struct aiovmm_timer *t = calloc(1, sizeof *t);
    pthread_condattr_t ca;
    if (!t)
        return NULL;
    t->uc = uc;
    t->stop = stop;
    pthread_mutex_init(&t->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&t->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&t->thread, NULL, timer_main, t) != 0) {
        free(t);
        return NULL;
    }
    return t;
}

/* Before emu_start: the slice ends at deadline_ns (CLOCK_MONOTONIC). */
void aiovmm_timer_arm(struct aiovmm_timer *t, int64_t deadline_ns)
{
    pthread_mutex_lock(&t->lock);
    t->deadline_ns = deadline_ns;
    t->fired = 0;
    t->armed = 1;
    pthread_cond_signal(&t->cond);
    pthread_mutex_unlock(&t->lock);
}

/* After emu_start returned: no stop can reach a later slice. Returns why it fired. */
int aiovmm_timer_disarm(struct aiovmm_timer *t)
{
    int fired;
    pthread_mutex_lock(&t->lock);
    t->armed = 0;
    fired = t->fired;
    pthread_mutex_unlock(&t->lock);
    return fired;
}

/* Any thread: end the running slice now (nothing if none is armed). */
void aiovmm_timer_kick(struct aiovmm_timer *t)
{
    pthread_mutex_lock(&t->lock);
    if (t->armed) {
        t->fired = 2;
        t->deadline_ns = 0;      /* the timer thread repeats the stop until disarmed */
        t->stop(t->uc);
        pthread_cond_signal(&t->cond);
    }
    pthread_mutex_unlock(&t->lock);
}

void aiovmm_timer_free(struct aiovmm_timer *t)
{
    pthread_mutex_lock(&t->lock);
    t->quit = 1;
    pthread_cond_signal(&t->cond);
    pthread_mutex_unlock(&t->lock);
    pthread_join(t->thread, NULL);
    pthread_cond_destroy(&t->cond);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

/* When the timer last ended a slice (CLOCK_MONOTONIC ns): how late it woke. */
int64_t aiovmm_timer_fired_ns(struct aiovmm_timer *t)
{
    return t->fired_ns;
}
