/* pvclock system time and wall clock. */
#ifndef AIOVMM_TIME_H
#define AIOVMM_TIME_H

#include "os.h"

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* Nanoseconds of Xen system time (vcpu_info[0].time, version protocol). */
u64 monotonic_ns(void);
/* Unix time in seconds: shared_info wc_* plus system time now. */
u64 wallclock_sec(void);

#endif
