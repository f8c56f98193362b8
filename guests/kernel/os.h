/* Common definitions for the aiovmm guest kernel library. */
#ifndef AIOVMM_OS_H
#define AIOVMM_OS_H

#include <stdint.h>
#include <stddef.h>
#include <xen/xen.h>

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;
typedef int64_t s64;
typedef int32_t s32;
typedef int8_t s8;

#define VIRT_BASE   0xFFFFFFFF80000000UL
#define PAGE_SIZE   4096UL
#define PAGE_SHIFT  12
#define PAGE_MASK   (~(PAGE_SIZE - 1))

#define barrier()   __asm__ volatile("" ::: "memory")
#define mb()        __asm__ volatile("mfence" ::: "memory")
#define rmb()       barrier()
#define wmb()       barrier()

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define noreturn    __attribute__((noreturn))
#define ACCESS_ONCE(x) (*(volatile __typeof__(x) *)&(x))

/* Globals set up by start_kernel(). */
extern start_info_t *start_info;
extern shared_info_t *HYPERVISOR_shared_info;
extern unsigned long entry_rsp;       /* RSP at entry (end of the boot stack) */

static inline vcpu_info_t *vcpu0(void)
{
    return &HYPERVISOR_shared_info->vcpu_info[0];
}

/* The application entry point each guest ELF provides. */
void app_main(void);

/* Symbols from head.S / the linker script. */
extern char hypercall_page[];
extern char _text[], _etext[], _end[];
extern char kernel_stack_top[];

#endif
