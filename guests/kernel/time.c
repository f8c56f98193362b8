#include "time.h"

u64 monotonic_ns(void)
{
    volatile struct vcpu_time_info *t = &vcpu0()->time;
    u32 ver, mul;
    u64 stamp, sys;
    s8 shift;

    do {
        ver = t->version;
        rmb();
        stamp = t->tsc_timestamp;
        sys = t->system_time;
        mul = t->tsc_to_system_mul;
        shift = t->tsc_shift;
        rmb();
    } while ((ver & 1) || ver != t->version);

    u64 delta = rdtsc() - stamp;
    if ((s64)delta < 0)
        delta = 0;
    if (shift >= 0)
        delta <<= shift;
    else
        delta >>= -shift;
    return sys + (u64)(((unsigned __int128)delta * mul) >> 32);
}

u64 wallclock_sec(void)
{
    volatile shared_info_t *s = HYPERVISOR_shared_info;
    u32 ver, nsec;
    u64 sec;

    do {
        ver = s->wc_version;
        rmb();
        sec = ((u64)s->wc_sec_hi << 32) | s->wc_sec;
        nsec = s->wc_nsec;
        rmb();
    } while ((ver & 1) || ver != s->wc_version);

    u64 ns = (u64)nsec + monotonic_ns();
    return sec + ns / 1000000000UL;
}
