"""Timer events reach a running vCPU at their deadline, as Xen's timer interrupt preempts the
guest there (aiovmm/timers.py run_due/slice_until).

`timer_late` (guests/tests/timer_late.c) sets 40 singleshot timers 0.3-2 ms ahead, each at a
different phase, and spins on its pvclock until each one's event: it reports how long it ran
past a deadline without the event (median and max, in its own clock), events that came
before the deadline, and clock reads that went backwards. Before the fix a slice ran its
whole 2 ms on the loop thread whatever the vCPU's timers said, and the event waited for the
slice's end: a median of ~1 ms past the deadline (uniform over the slice). Linux's
sched_clock_local() holds local_clock() at the last tick + TICK_NSEC (4 ms) until the next
tick comes, so a tick that late stamped different printk lines with one timestamp (CI:
cblist_init_generic's lines, tests/test_linux.py).

The bound is loose against the machine's load: a late event is one the guest saw while it
ran (a host preemption between the deadline and the event counts only if it falls in that
window, which after the fix is microseconds); the median of 40 is the figure.
"""
from __future__ import annotations

import re


from aiovmm import ShutdownReason
from conftest import boot_async, guest

ALL_ENGINES = True
TIMER_LATE = guest("timer_late")
LATE_MEDIAN_MAX_NS = 250_000         # the slice alone: ~1,000,000 (0..2 ms)


async def test_timer_event_preempts_a_running_vcpu(engine):
    b = await boot_async(TIMER_LATE, cmdline="timers=40", timeout=120, engine=engine)
    assert b.reason == ShutdownReason.poweroff, (b.end, b.lines[-5:])
    line = next((l for l in b.lines if l.startswith("timer_late:")), None)
    assert line is not None, b.lines[-10:]
    got = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    print("\n" + line)
    assert got["n"] == 40
    assert got["back"] == 0, line                 # the pvclock never went backwards
    assert got["early"] == 0, line                # never before the deadline (Xen)
    assert got["late_median_ns"] <= LATE_MEDIAN_MAX_NS, line
