/* aiovmm KVM slice runner, built by `make setup` (aiovmm/_native/kvm.so).
 *
 * Why C: a slice must end on time even when the guest never exits (a CPU-bound loop runs
 * natively under KVM). A per-thread POSIX timer sends AIOVMM_KICK_SIGNAL to the event-loop
 * thread; its handler, which must be async-signal-safe and cannot be a Python handler (those
 * run later, after KVM_RUN has returned), sets kvm_run.immediate_exit. That covers both
 * races: a signal during KVM_RUN makes it return -EINTR; a signal that lands just before
 * the ioctl makes KVM_RUN return at once instead of running a whole extra slice.
 *
 * All exits are handled in Python (aiovmm/kvm_engine.py). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define KVM_RUN_IOCTL 0xAE80
#define AIOVMM_KICK_SIGNAL (SIGRTMIN + 7)

static __thread volatile uint8_t *cur_immediate_exit;

static void kick_handler(int sig)
{
    (void)sig;
    volatile uint8_t *p = cur_immediate_exit;
    if (p)
        *p = 1;
}

/* Install the handler (once per process) and create a timer that signals the calling
 * thread. Returns 0 and stores the timer id, or -errno. */
int aiovmm_kvm_timer_create(timer_t *out)
{
    static int installed;
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = kick_handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;                /* no SA_RESTART: KVM_RUN must return -EINTR */
        if (sigaction(AIOVMM_KICK_SIGNAL, &sa, NULL) < 0)
            return -errno;
        installed = 1;
    }
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = AIOVMM_KICK_SIGNAL;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, out) < 0)
        return -errno;
    return 0;
}

int aiovmm_kvm_timer_delete(timer_t t)
{
    return timer_delete(t) < 0 ? -errno : 0;
}

/* A slice: arm the timer once at the slice's absolute CLOCK_MONOTONIC deadline, then any
 * number of aiovmm_kvm_run() calls (one per exit handled in Python), then end it. A kick that
 * lands while Python handles an exit makes the next KVM_RUN return -EINTR at once, so the
 * per-exit cost is one ioctl, not two timer_settime calls around it. */
int aiovmm_kvm_slice_begin(uint8_t *run, timer_t timer, int64_t deadline_ns)
{
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    run[1] = 0;
    cur_immediate_exit = run + 1;
    its.it_value.tv_sec = deadline_ns / 1000000000;
    its.it_value.tv_nsec = deadline_ns % 1000000000;
    if (timer_settime(timer, TIMER_ABSTIME, &its, NULL) < 0) {
        cur_immediate_exit = NULL;
        return -errno;
    }
    return 0;
}

int aiovmm_kvm_slice_end(uint8_t *run, timer_t timer)
{
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    timer_settime(timer, 0, &its, NULL);
    cur_immediate_exit = NULL;
    run[1] = 0;
    return 0;
}

/* One KVM_RUN. Returns 0 after an exit the caller handles (run->exit_reason), -EINTR when
 * the slice's deadline kicked the vCPU out, or -errno. */
int aiovmm_kvm_run(int vcpu_fd)
{
    return ioctl(vcpu_fd, KVM_RUN_IOCTL, 0) < 0 ? -errno : 0;
}

/* KVM_RUN with immediate_exit set: completes a pending I/O instruction (KVM finishes it at
 * the start of the next KVM_RUN) without entering the guest. */
int aiovmm_kvm_complete(int vcpu_fd, uint8_t *run)
{
    uint8_t was = run[1];
    run[1] = 1;
    int r = ioctl(vcpu_fd, KVM_RUN_IOCTL, 0);
    int err = r < 0 ? errno : 0;
    if (!was)
        run[1] = 0;    /* a kick during the call is caught by the caller's deadline check */
    return err == EINTR ? 0 : -err;
}

/* The shadow guard's diff (aiovmm/kvm_engine.py _ShadowGuard), run for every page-table frame
 * the hypervisor wrote before the next KVM_RUN: the indices of the 8-byte entries that differ
 * between the frame and its snapshot, and their count (out holds up to 512). */
int aiovmm_kvm_diff(const uint64_t *a, const uint64_t *b, int32_t *out)
{
    int k = 0;
    for (int i = 0; i < 512; i++)
        if (a[i] != b[i])
            out[k++] = i;
    return k;
}
