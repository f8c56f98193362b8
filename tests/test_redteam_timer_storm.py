"""Red team: a guest re-arming its singleshot timer from its own VIRQ_TIMER handler
(guests/hostile/timer_storm.c), with deadlines a few us ahead (every event cuts a slice:
timers.slice_until / engine.cut_slice), already passed, u64 max (s_time_t negative: at
once) or through set_timer_op 1 ns ahead. Xen charges a vCPU from its context switch in,
the timer softirq and the event delivery included, and sends an event at once for a
deadline already passed (VCPUOP_set_singleshot_timer ignores VCPU_SSHOTTMR_future since
4.18; set_timer_op's 2^50 ns rule).

Beside a CPU hog, each storm keeps the hog's charged share equal to its own (cut slices are
charged: sched.begin/release wrap the slice, its timers and event bounces included; the hog
keeps at least a quarter of the loop thread's CPU), and the loop keeps running callbacks (a
5 ms sleep returns throughout). Both engines. The storm's events come inside its slices
(vcpu.py _slice_goes_on: no loop turn per event between slices, which was charged to no
one): bench/timer_in_slice.py, Unicorn, 20 us ahead, load 14-17: the bystander's charged
share of the loop thread 0.442 before, 0.469 after, 0.474 beside a plain hog
(tests/test_sched_tslice.py counts the storm's slices)."""
from __future__ import annotations

import asyncio
import time

import pytest

from aiovmm import Hypervisor
from conftest import BUILD, ENGINES, HV_MEMORY_MIB, guest

pytestmark = ENGINES
STORM = str(BUILD / "hostile" / "timer_storm.elf")
HOG = guest("hog")
STORMS = {
    "ahead_20us": "via=0 kind=0 delta=20000",
    "past_future_flag": "via=1 kind=1 delta=1000",
    "u64_max": "via=1 kind=2 abs=18446744073709551615",
    "timer_op_1ns": "via=2 kind=0 delta=1",
}


def charged_ns(hv, dom) -> int:
    return sum(a["cpu_ns"] - a["host_steal_ns"] for a in map(hv.scheduler.accounting, dom.vcpus))


@pytest.mark.parametrize("storm", list(STORMS))
async def test_timer_storm_beside_a_hog_is_charged_its_share(engine, storm):
    async with Hypervisor(memory_mib=HV_MEMORY_MIB, engine=engine) as hv:
        s = await hv.create(STORM, memory_mib=4, cmdline=STORMS[storm], name="storm")
        await s.wait_for_line(r"^timer_storm: ready", 30)
        h = await hv.create(HOG, memory_mib=4, name="hog")
        await h.wait_for_line(r"^hog: ready$", 30)
        await asyncio.sleep(0.3)
        s0, h0, p0 = charged_ns(hv, s), charged_ns(hv, h), time.process_time()
        t0 = time.thread_time_ns()
        ticks = [0]
        tick = asyncio.get_running_loop().call_later
        def on_tick():
            ticks[0] += 1
            handle[0] = tick(0.005, on_tick)
        handle = [tick(0.005, on_tick)]
        await asyncio.sleep(1.5)
        while time.process_time() - p0 < 1.0:        # a loaded host: enough CPU to judge
            await asyncio.sleep(0.1)
        handle[0].cancel()
        cs, ch = charged_ns(hv, s) - s0, charged_ns(hv, h) - h0
        loop_ns = time.thread_time_ns() - t0
        assert not s.dying and not h.dying
    assert ch > 0 and cs > 0, (cs, ch)
    assert 0.5 <= ch / cs <= 2, f"hog {ch} ns vs storm {cs} ns"
    assert ch >= 0.25 * loop_ns, f"hog {ch} ns of the loop thread's {loop_ns} ns"   # ~0.38-0.47
    assert ticks[0] >= 5, ticks                     # the loop ran its callbacks throughout
