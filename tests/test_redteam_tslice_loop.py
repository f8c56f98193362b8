"""Red team: a lone CPU-bound guest's lengthened slice (scheduler.Scheduler._lengthen,
TSLICE_NS = 30 ms) against work of the event loop the scheduler did not see coming: a
backend's fd turning readable (a frame on a blocked bystander's tap, a control-plane or
xenstore connection) or a worker thread's completion (loop.call_soon_threadsafe: blkback's
I/O). The slice runs on the loop thread, so all of it waited for the slice's end: up to
30 ms, where an ordinary slice bounds it at SLICE_NS (2 ms) and Xen preempts the guest for
the woken dom0/bystander vCPU at once (csched_unit_wake's tickle of a BOOST vCPU).

Each test makes the loop's work pending right at the start of one of the hog's lengthened
slices (inside Scheduler.begin, bound 20 ms or more): that slice must end before its bound
(the scheduler's I/O watcher interrupts the engine run, Scheduler.goes_on ends the slice),
and the loop's callback must run before the hog's next slice. No duration is asserted: a
slice of a CPU-bound hog with nothing to end it runs to its bound or later, never earlier.
bench/tslice_bystander.py measures what it means for a bystander guest's UDP round trip.
"""
from __future__ import annotations

import asyncio
import socket
import time

from aiovmm.scheduler import SLICE_NS

from conftest import guest

ALL_ENGINES = True
HOG = guest("hog")
MIN_BOUND = 10 * SLICE_NS      # a lengthened slice long enough to tell "ended early"


async def _loop_work_at_a_long_slice(hv, make_pending) -> dict:
    """Boot the hog; at the start of one of its lengthened slices call make_pending(done)
    (which makes loop work pending whose callback calls done()); return that slice's bound
    (the lengthened slice_for, ns from its start), how long it ran until release, and
    whether the callback ran before the hog's next slice."""
    hog = await hv.create(HOG, memory_mib=4, name="hog")
    await hog.wait_for_line(r"^hog: ready$", timeout=60)
    v = hog.vcpus[0]
    sched = hv.scheduler
    s = sched.state(v)
    st = {"armed": False, "bound": 0, "ran_ns": None, "ran": False, "ran_before_next": None}
    begin, release = sched.begin, sched.release

    def done() -> None:
        st["ran"] = True

    def spy_begin(w) -> None:
        stale = w.engine.interrupted                     # before begin() may arm anew
        begin(w)
        if w is not v:
            return
        if st["ran_ns"] is not None and st["ran_before_next"] is None:
            st["ran_before_next"] = st["ran"]            # the next slice of the hog starts
            st["next_interrupted"] = stale
        if not st["armed"] and s.long_ns >= MIN_BOUND:
            st["armed"], st["bound"] = True, s.long_ns
            make_pending(done)

    def spy_release(w) -> None:
        if w is v and st["armed"] and st["ran_ns"] is None:
            st["ran_ns"] = time.perf_counter_ns() - s._t0
        release(w)

    sched.begin, sched.release = spy_begin, spy_release
    try:
        async with asyncio.timeout(120):
            while st["ran_before_next"] is None:
                await asyncio.sleep(0.05)
    finally:
        del sched.begin
        del sched.release
    return st


def _check(st: dict) -> None:
    # Without the watcher the slice runs to its bound (a CPU-bound hog neither blocks nor
    # yields, and a host preemption only makes a slice longer); with it, the slice ends at
    # the first engine-run end after the I/O, well inside a bound of 20 ms or more.
    assert st["ran_ns"] < st["bound"], ("the lengthened slice ran to its bound with I/O ready", st)
    assert st["ran_before_next"], st
    assert not st["next_interrupted"], ("the interrupt outlived its slice", st)


async def test_a_readable_fd_cuts_a_lengthened_slice(hv):
    """A frame on a blocked bystander's tap, a control-plane request: an fd the loop watches
    turns readable while a lone hog computes."""
    r, w = socket.socketpair()
    loop = asyncio.get_running_loop()
    try:
        def make_pending(done):
            def on_readable():
                r.recv(16)
                done()
            loop.add_reader(r.fileno(), on_readable)
            w.send(b"x")
        st = await _loop_work_at_a_long_slice(hv, make_pending)
    finally:
        loop.remove_reader(r.fileno())
        r.close()
        w.close()
    _check(st)


async def test_a_worker_threads_completion_cuts_a_lengthened_slice(hv):
    """blkback's reads and writes complete on worker threads and come back to the loop
    with call_soon_threadsafe, which writes the loop's self-pipe (called here from the
    loop thread: the same write)."""
    loop = asyncio.get_running_loop()
    _check(await _loop_work_at_a_long_slice(hv, lambda done: loop.call_soon_threadsafe(done)))
