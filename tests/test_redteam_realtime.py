"""Red-team: the stop-and-copy's real-time boost (priority.RealTime) must stay on the loop
thread and end with the hand-over. A thread the kernel creates while the loop thread is
SCHED_FIFO inherits the policy and keeps it after the boost is dropped: the default
executor's and blkback's pool workers (asyncio.to_thread, run_in_executor: the receiver's
disk claim and lock, the restore's device checks) made during the boosted window would run
at real-time priority for the life of the process, above every normal task of the host.
SCHED_RESET_ON_FORK keeps the boost to the thread that asked for it."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time

import pytest

from aiovmm.migration import priority
from test_migration_realtime import _policy as _raw_policy, privileged  # noqa: F401 (fixture)


async def test_a_worker_thread_made_during_the_boost_does_not_keep_it(privileged):
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(1)       # its worker is made by the first job
    rt = priority.RealTime()
    try:
        rt.start()
        assert _raw_policy() == os.SCHED_FIFO
        during = await loop.run_in_executor(pool, _raw_policy)
        rt.stop()
        assert _raw_policy() == os.SCHED_OTHER
        after = await loop.run_in_executor(pool, _raw_policy)      # the same worker, later
    finally:
        rt.stop()
        pool.shutdown()
    assert (during, after) == (os.SCHED_OTHER, os.SCHED_OTHER)


async def test_the_limit_holds_while_the_loop_thread_does_not_yield(privileged, monkeypatch):
    """The boost's limit is what bounds the downtime's hold on a core, and the downtime's
    work is partly synchronous and sized by the guest (the receiver's final pinning
    revalidates every table that arrival-time validation could not hold; the sender's last
    scan compares every page): a limit enforced by a loop timer would wait for the next
    await. Here the loop thread blocks for up to 1 s without yielding."""
    monkeypatch.setattr(priority, "REALTIME_LIMIT_S", 0.05)
    rt = priority.RealTime()
    rt.start()
    try:
        assert _raw_policy() == os.SCHED_FIFO
        end = time.monotonic() + 1.0
        while time.monotonic() < end and _raw_policy() == os.SCHED_FIFO:
            time.sleep(0.01)                     # blocking: the loop's timers cannot run
        held = time.monotonic() - (end - 1.0)
        assert _raw_policy() == os.SCHED_OTHER, "still SCHED_FIFO after 1 s"
        assert held < 0.5, f"dropped after {held:.2f} s"
    finally:
        rt.stop()
    assert _raw_policy() == os.SCHED_OTHER and priority.RealTime._depth == 0
