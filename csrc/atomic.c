/* Locked read-modify-writes on guest-shared memory (aiovmm/memory.py MachineMemory.atomic_*).
 *
 * The loop's Python updates words the guest also updates with locked instructions: event
 * channel pending/mask/selector bits (Xen's guest_test_and_set_bit in event_2l.c) and grant
 * entry flags (Xen's guest_cmpxchg in grant_table.c _set_status_v1, gnttab_clear_flags).
 * A plain byte read-modify-write loses the guest's concurrent update of a neighbouring bit
 * once the guest runs on another core (the KVM engine's vCPU thread); these are the x86
 * `lock or/and/cmpxchg` Xen uses, on the one shared memfd mapping. Sequentially consistent:
 * each is also a full barrier, as Xen's locked bit operations are on x86.
 */
#include <stdint.h>

uint8_t aiovmm_atomic_or8(uint8_t *p, uint8_t bits)
{
    return __atomic_fetch_or(p, bits, __ATOMIC_SEQ_CST);
}

uint8_t aiovmm_atomic_and8(uint8_t *p, uint8_t bits)
{
    return __atomic_fetch_and(p, bits, __ATOMIC_SEQ_CST);
}

uint16_t aiovmm_atomic_and16(uint16_t *p, uint16_t bits)
{
    return __atomic_fetch_and(p, bits, __ATOMIC_SEQ_CST);
}

/* Returns the value found: equal to `old` iff `new` was stored. */
uint32_t aiovmm_atomic_cmpxchg32(uint32_t *p, uint32_t old, uint32_t new)
{
    __atomic_compare_exchange_n(p, &old, new, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return old;
}
