/* Self-modifying code through an alias (tests/test_redteam_code_alias.py): on Xen the
 * guest runs the bytes in memory, so a store to code through any mapping of its frame is
 * what the next fetch after a jump runs. The patched Unicorn (csrc/unicorn) takes the store
 * slow path (the self-modifying-code check) only for TLB entries of pages that hold
 * translated code; these are the ways a store could reach code through an entry filled
 * while its page held none.
 * `code` is a page of the kernel's direct map (the VA the guest calls); `alias` maps the
 * same frame writable at another VA. Each step writes `mov eax, imm; ret` and calls it:
 *   alias_first:   stored through the alias before the page ever ran (the alias's TLB
 *                  entry filled on the fast path), then run: 1
 *   alias_after:   stored through the alias after it ran (translated): 2
 *   data_then_code: 2000 data stores through the alias into the same page (offset 2048)
 *                  while the code runs in between, then the code rewritten through the
 *                  alias: 3
 *   loop_bad:      500 rounds of rewrite-through-alias-then-call, alternating aliases
 *                  and the page itself: rounds that ran an old imm (0 expected)
 *   straddle:      `mov eax, imm; ret` across two frames (opcode at the first's last
 *                  byte), run, then the imm's bytes in the second frame rewritten through
 *                  that frame's alias alone: 0x55667788
 * Then powers off. */
#include "hostile.h"

typedef long (*fn_t)(void);

static void put_code(volatile u8 *p, u32 imm)
{
    p[0] = 0xB8;                      /* mov eax, imm32 */
    p[1] = (u8)imm; p[2] = (u8)(imm >> 8); p[3] = (u8)(imm >> 16); p[4] = (u8)(imm >> 24);
    p[5] = 0xC3;                      /* ret */
}

static volatile u8 *alias_of(void *page)
{
    unsigned long va = alloc_va_hole();
    long rc = map_frame(va, virt_to_mfn(page), PTE_KERNEL_RW);
    if (rc)
        panic("map_frame alias: %ld", rc);
    return (volatile u8 *)va;
}

void app_main(void)
{
    hostile_traps_init();
    u8 *code = alloc_page();
    volatile u8 *alias = alias_of(code);
    volatile u8 *alias2 = alias_of(code);
    fn_t fn = (fn_t)(void *)code;

    put_code(alias, 1);
    result("alias_first", fn());
    put_code(alias, 2);
    result("alias_after", fn());

    long bad = 0;
    for (int i = 0; i < 2000; i++) {
        ((volatile u64 *)(alias + 2048))[i % 64] = i;
        if (fn() != 2)
            bad++;
    }
    put_code(alias, 3);
    result("data_then_code", fn());
    result("data_bad", bad);

    bad = 0;
    for (u32 i = 0; i < 500; i++) {
        volatile u8 *w = i % 3 == 0 ? alias : i % 3 == 1 ? alias2 : (volatile u8 *)code;
        put_code(w, 100 + i);
        if (fn() != (long)(100 + i))
            bad++;
    }
    result("loop_bad", bad);

    /* Two frames at consecutive VAs: the direct map of consecutive PFNs. */
    u8 *p1 = alloc_page(), *p2 = alloc_page();
    if (p2 != p1 + PAGE_SIZE) {
        result("straddle", -1);
    } else {
        volatile u8 *a2 = alias_of(p2);
        u8 *at = p1 + PAGE_SIZE - 1;
        put_code(at, 0x11223344);
        fn_t f2 = (fn_t)(void *)at;
        long first = f2();
        a2[0] = 0x88; a2[1] = 0x77; a2[2] = 0x66; a2[3] = 0x55;
        result("straddle_first", first);
        result("straddle", f2());
    }
    poweroff();
}
