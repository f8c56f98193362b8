/* A fork-like workload: build a whole user address space (own L4/L3/L2/L1s
 * and data pages), pin it, run a user routine in it that writes a word to
 * every data page, then tear it down and reclaim every frame. */
#ifndef AIOVMM_FORK_H
#define AIOVMM_FORK_H

#include "os.h"

#define FORK_DATA_VA    0x1000000UL     /* first data page (16 MiB) */
#define FORK_CODE_VA    0x400000UL
#define FORK_STACK_VA   0x401000UL
#define FORK_MAX_PAGES  4096

/* Needs traps_init() (syscall callback) and mm_map_all() (free memory).
 * Runs one build/pin/run/teardown cycle with `pages` data pages; returns
 * the number of errors (pages whose word was wrong, frames that could not
 * be remapped writable); panics if a hypercall that must work fails. */
unsigned long fork_once(unsigned pages);

#endif
