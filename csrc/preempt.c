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
 * alternative is the emulator's own exit check at the start of every translated block
 * (QEMU's icount_decr test). Three things make that exact:
 *
 * 1. The translator checks exit requests at block starts alone: Unicorn 2.1.4 also checks
 *    after every guest load and store (tcg-op.c check_exit_request), which stops in the
 *    middle of an instruction and re-executes it (read-modify-write instructions applied
 *    twice: shared/research/unicorn/NOTES.md). The engine turns those checks off
 *    (uc_struct.no_exit_request, vcpu_engine.py).
 * 2. The deadline never sets Unicorn's stop_request from outside the emulation: every
 *    instruction hook loop (RDTSC, RDTSCP, CPUID, IN, OUT: misc_helper.c, seg_helper.c)
 *    breaks out at the first hook after which stop_request is set, before it reaches the
 *    hook registered for that instruction, so a stop landing in the middle of a block made
 *    the rest of the block's RDTSC return Unicorn's own TSC (guest time jumped: an SMP
 *    guest saw its clock run backwards), CPUID Unicorn's own CPU model, IN zero and OUT
 *    vanish. Instead the deadline only asks the CPU to leave its translated code
 *    (cpu_exit: the block-start check) and raises our own flag; the emulation thread turns
 *    the flag into uc_emu_stop itself, at the one place the CPU loop passes through after
 *    leaving a block (cpu_handle_exception calls uc_struct.stop_interrupt first thing, which
 *    the engine points at aiovmm_stop_interrupt, chaining Unicorn's own).
 * 3. The deadline is a per-thread POSIX timer (CLOCK_MONOTONIC) whose signal is delivered to
 *    the emulating thread itself: no second thread has to be scheduled by a loaded host
 *    in time (a timer thread woke 10-20 ms late at host load 8 against 2 ms slices), and
 *    arming costs one timer_settime, not a thread wake-up per slice. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AIOVMM_SLICE_SIGNAL (SIGRTMIN + 8)   /* the KVM engine's kick is SIGRTMIN + 7 */

typedef int (*uc_stop_interrupt_fn)(void *uc, int intno);
typedef void (*cpu_exit_fn)(void *cpu);

struct aiovmm_timer {
    void *uc;
    void *cpu;                   /* uc_struct.cpu, for cpu_exit */
    volatile int armed;          /* a slice of this vCPU is running */
    volatile int want;           /* out: 0 none, 2 preempted, 3 deadline */
    int64_t deadline_ns;
    int64_t fired_ns;            /* when the deadline signal arrived (diagnostics) */
};

static uc_stop_fn uc_stop;                     /* uc_emu_stop */
static cpu_exit_fn cpu_exit_;                  /* Unicorn's cpu_exit */
static uc_stop_interrupt_fn orig_stop_interrupt;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int init_error;
static pthread_key_t timer_key;

struct thread_timer {
    timer_t id;
    int ok;
};

/* The slice running on this thread (NULL between slices and during a nested step). */
static __thread struct aiovmm_timer *cur;
static __thread struct thread_timer *ttimer;

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void request(struct aiovmm_timer *t, int why)
{
    if (!t->want) {
        t->want = why;
        t->fired_ns = mono_ns();
    }
    __sync_synchronize();        /* the flag before the exit request that makes it read */
    cpu_exit_(t->cpu);
}

static void on_signal(int sig)
{
    struct aiovmm_timer *t = cur;
    int saved = errno;
    (void)sig;
    if (t && t->armed)
        request(t, 3);
    errno = saved;
}

static void free_thread_timer(void *p)
{
    struct thread_timer *tt = p;
    if (tt->ok)
        timer_delete(tt->id);
    free(tt);
}

static void init_once(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;    /* hooks run Python that may be in a system call */
    if (sigaction(AIOVMM_SLICE_SIGNAL, &sa, NULL) < 0 || pthread_key_create(&timer_key, free_thread_timer))
        init_error = errno ? errno : EINVAL;
}

/* This thread's timer, created on first use (it signals this thread only). */
static struct thread_timer *thread_timer(void)
{
    if (ttimer)
        return ttimer->ok ? ttimer : NULL;
    struct thread_timer *tt = calloc(1, sizeof *tt);
    if (!tt)
        return NULL;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = AIOVMM_SLICE_SIGNAL;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    tt->ok = timer_create(CLOCK_MONOTONIC, &sev, &tt->id) == 0;
    pthread_setspecific(timer_key, tt);
    ttimer = tt;
    return tt->ok ? tt : NULL;
}

/* uc_struct.stop_interrupt of every engine with timer slices: called by the CPU loop on
 * the emulation thread each time it comes out of translated code (cpu_handle_exception).
 * A deadline or preempt that was raised becomes a real stop here, between two blocks. */
static int aiovmm_stop_interrupt(void *uc, int intno)
{
    struct aiovmm_timer *t = cur;
    if (t && t->uc == uc && t->armed && t->want)
        uc_stop(uc);
    return orig_stop_interrupt(uc, intno);
}

/* Set up timer slices for one Unicorn instance. `slot` is &uc_struct.stop_interrupt and
 * `cpu` uc_struct.cpu (located and checked by vcpu_engine.py); stop and cpu_exit are
 * Unicorn's uc_emu_stop and cpu_exit. NULL if this process cannot have them. */
struct aiovmm_timer *aiovmm_timer_new(void *uc, void *cpu, void **slot, uc_stop_fn stop, cpu_exit_fn exit_fn)
{
    pthread_once(&once, init_once);
    if (init_error || !cpu || !*slot)
        return NULL;
    if (*slot != (void *)aiovmm_stop_interrupt) {
        if (orig_stop_interrupt && (void *)orig_stop_interrupt != *slot)
            return NULL;         /* not the x86 function every other instance has */
        orig_stop_interrupt = (uc_stop_interrupt_fn)*slot;
    }
    uc_stop = stop;
    cpu_exit_ = exit_fn;
    struct aiovmm_timer *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->uc = uc;
    t->cpu = cpu;
    *slot = (void *)aiovmm_stop_interrupt;
    return t;
}

/* Before emu_start, on the emulating thread: the slice ends at deadline_ns
 * (CLOCK_MONOTONIC), or at once if `want` (a stop raised before a nested step) is set.
 * Returns 0, or -errno if the timer cannot be armed. */
int aiovmm_timer_arm(struct aiovmm_timer *t, int64_t deadline_ns, int want)
{
    struct thread_timer *tt = thread_timer();
    struct itimerspec its;
    if (!tt)
        return -EAGAIN;
    t->deadline_ns = deadline_ns;
    t->want = 0;
    cur = t;
    t->armed = 1;
    if (want)
        request(t, want);
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = deadline_ns / 1000000000;
    its.it_value.tv_nsec = deadline_ns % 1000000000;
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
        its.it_value.tv_nsec = 1;        /* zero would disarm: a deadline long past */
    if (timer_settime(tt->id, TIMER_ABSTIME, &its, NULL) < 0) {
        t->armed = 0;
        cur = NULL;
        return -errno;
    }
    return 0;
}

/* After emu_start returned: no stop can reach a later slice (a signal already pending is
 * delivered when timer_settime returns, while still armed). Returns why it fired. */
int aiovmm_timer_disarm(struct aiovmm_timer *t)
{
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (ttimer && ttimer->ok)
        timer_settime(ttimer->id, 0, &its, NULL);
    t->armed = 0;
    if (cur == t)
        cur = NULL;
    return t->want;
}

/* Any thread: end the running slice at the next block boundary (nothing if none runs). */
void aiovmm_timer_kick(struct aiovmm_timer *t)
{
    if (t->armed)
        request(t, 2);
}

void aiovmm_timer_free(struct aiovmm_timer *t)
{
    if (cur == t)
        cur = NULL;
    free(t);
}

/* When the deadline last ended a slice (CLOCK_MONOTONIC ns): how late it fired. */
int64_t aiovmm_timer_fired_ns(struct aiovmm_timer *t)
{
    return t->fired_ns;
}

/* ---- Port I/O hooks: refused accesses, and repeated reads answered here ----------------
 * A refused IN/OUT with timer slices: the vCPU refuses a port access the domain may not make
 * and delivers #GP at the instruction (vcpu.py). With the translator's mid-block exit checks
 * off, a stop asked for inside the IN/OUT hook would only take effect at the next block: the
 * rest of the block would run first, with the refused value. These hooks call the Python
 * handler and, when it refused (set `refused`), leave the translated code at once
 * (cpu_loop_exit): Unicorn synced the CPU state to the IN/OUT instruction before calling the
 * hook (ioport.c), so the slice ends with RIP on it and nothing after it executed. With
 * block-hook slices `loop_exit` is NULL and the handler's uc_emu_stop does it.
 *
 * Repeated reads: Linux's quick_pit_calibrate reads port 0x42 100,000 times while booting,
 * each a C->Python callback through the shared port policy (emulate.port_in), whose answer
 * for a domU is all ones whenever the access is allowed. The engine records here an IN it
 * has just seen answered (port, size, value) when that answer depends on nothing the guest
 * can change without the hypervisor running (emulate.port_in_fixed: the virtual IOPL grants
 * every port, no I/O bitmap in guest memory); this hook answers the same IN again without
 * Python. The policy's inputs (the vCPU's mode and IOPL, the domain's VM assists, its I/O
 * bitmap) only change while the hypervisor runs: the engine empties the table at the start
 * of every slice and on every entry into Python from this vCPU's hooks but an IN's (the
 * policy only reads), the rule kept in one place (VCPUEngine._hypervisor_runs). A full
 * table starts over. */
typedef uint32_t (*pio_in_fn)(void *uc, uint32_t port, int size, void *user_data);
typedef void (*pio_out_fn)(void *uc, uint32_t port, int size, uint32_t value, void *user_data);

#define AIOVMM_PIO_FAST_MAX 8

struct aiovmm_pio {
    pio_in_fn in;                /* the engine's IN handler */
    pio_out_fn out;              /* the engine's OUT handler */
    void *cpu;                   /* uc_struct.cpu */
    void (*loop_exit)(void *cpu);    /* Unicorn's cpu_loop_exit (NULL: block-hook slices) */
    int32_t refused;             /* set by a handler: end the slice at the instruction */
    uint32_t fast_n;             /* valid entries of fast[] (0: empty) */
    uint64_t fast_hits;          /* INs answered here (statistics) */
    struct {
        uint32_t port;
        int32_t size;
        uint32_t value;
        uint32_t pad;
    } fast[AIOVMM_PIO_FAST_MAX];
};

uint32_t aiovmm_in_hook(void *uc, uint32_t port, int size, void *user_data)
{
    struct aiovmm_pio *p = (struct aiovmm_pio *)user_data;
    for (uint32_t i = 0; i < p->fast_n && i < AIOVMM_PIO_FAST_MAX; i++) {
        if (p->fast[i].port == port && p->fast[i].size == size) {
            p->fast_hits++;
            return p->fast[i].value;
        }
    }
    uint32_t value = p->in(uc, port, size, NULL);
    if (p->refused) {
        p->refused = 0;
        if (p->loop_exit)
            p->loop_exit(p->cpu);
    }
    return value;
}

void aiovmm_out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data)
{
    struct aiovmm_pio *p = (struct aiovmm_pio *)user_data;
    p->out(uc, port, size, value, NULL);
    if (p->refused) {
        p->refused = 0;
        if (p->loop_exit)
            p->loop_exit(p->cpu);
    }
}
