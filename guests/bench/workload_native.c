/* Native driver for the CPU workload: same result as the guest's cpu.elf. */
#include <stdio.h>
#include <time.h>

unsigned long work(void);

int main(void)
{
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    unsigned long r = work();
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("cpu: result=0x%lx ns=%ld\n", r,
           (long)((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec)));
    return 0;
}
