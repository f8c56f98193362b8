"""A single-instruction step (writable page tables: ptwr steps the trapped store) with a kick
from another thread landing inside it. Since the scheduler's I/O watcher (scheduler._IoWatch)
interrupts a long slice from its own thread, a kick can come while the loop thread is inside
a step: on the emulated engine it ended the step at its first block boundary, before the
store ran, so ptwr refused the store and bounced the #PF into the guest (found by the suite:
Debian's Linux Oopsed in copy_page_range at a fork, `and byte [r12], 0xfd` on a PTE). The
step now runs again within its own deadline and the kick is left for the slice."""
from __future__ import annotations

import threading

import pytest

from hand_vcpu import CODE_VA, hand_driven_vcpu

REGS = ("rip", "rax")
INC_RAX = b"\x48\xff\xc0"                    # inc %rax
STEPS = 3000


@pytest.mark.parametrize("engine", ["unicorn"])
async def test_a_kick_from_another_thread_does_not_cut_a_step(engine):
    async with hand_driven_vcpu(REGS, engine) as (hv, dom, v):
        eng = v.engine
        v.copy_to_guest(CODE_VA, INC_RAX + b"\xeb\xfe")            # inc %rax ; jmp .
        done = threading.Event()

        def kicker() -> None:
            while not done.is_set():
                eng.preempt()                  # what interrupt() does, from its thread

        t = threading.Thread(target=kicker, daemon=True)
        t.start()
        cut = []
        try:
            for i in range(STEPS):
                eng.write({"rip": CODE_VA, "rax": 0})
                ok = eng.step_to(CODE_VA + len(INC_RAX))
                if not ok or eng.get("rax") != 1:
                    cut.append((i, ok, hex(eng.get("rip")), eng.get("rax")))
        finally:
            done.set()
            t.join()
        assert not cut, f"{len(cut)} of {STEPS} steps cut by a kick: {cut[:5]}"
