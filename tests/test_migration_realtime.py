"""The stop-and-copy at real-time priority (priority.RealTime): set on the loop thread for the
hand-over only, shared by the sender and the receiver in one process, the thread's own
policy back afterwards on every path, and dropped after REALTIME_LIMIT_S whatever happens."""
from __future__ import annotations

import asyncio
import os

import pytest

from aiovmm import Hypervisor
from aiovmm.migration import live, priority
from conftest import guest

SECRET = b"test-secret-0123456789"


def _policy() -> int:
    """The thread's policy (without the boost's SCHED_RESET_ON_FORK flag)."""
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK


@pytest.fixture
def privileged():
    """Only where the process may use SCHED_FIFO (CAP_SYS_NICE), which tests run with."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError as e:
        pytest.skip(f"no SCHED_FIFO here: {e}")
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    priority.RealTime._budget = priority.BUDGET_S   # the budget across boosts, unspent


async def test_nested_boosts_share_one_and_restore_the_policy(privileged):
    assert _policy() == os.SCHED_OTHER
    a, b = priority.RealTime(), priority.RealTime()
    a.start()
    assert _policy() == os.SCHED_FIFO and a.active
    b.start()
    a.stop()                                  # the first one out: still boosted for b
    assert _policy() == os.SCHED_FIFO
    b.stop()
    assert _policy() == os.SCHED_OTHER and not b.active
    b.stop()                                  # idempotent
    off = priority.RealTime(enabled=False)
    off.start()
    assert _policy() == os.SCHED_OTHER
    off.stop()


async def test_the_boost_ends_after_its_limit(privileged, monkeypatch):
    monkeypatch.setattr(priority, "REALTIME_LIMIT_S", 0.05)
    rt = priority.RealTime()
    rt.start()
    assert _policy() == os.SCHED_FIFO
    await asyncio.sleep(0.2)                  # nobody stopped it (a receiver that hangs)
    assert _policy() == os.SCHED_OTHER
    rt.stop()
    assert _policy() == os.SCHED_OTHER and priority.RealTime._depth == 0


def _thread_policy(tid: int) -> int:
    return os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK


async def test_threads_boosted_along_get_their_policy_back_with_the_loops(privileged, monkeypatch):
    """RealTime.also: other threads (a vif's tap writer) share the loop's boost and are
    restored with it, by stop() and by the limit; a thread that ended meanwhile is skipped;
    nothing is boosted while the loop is not."""
    import threading
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        tid = t.native_id
        rt = priority.RealTime()
        rt.also([tid])                        # the loop not boosted: nothing happens
        assert _thread_policy(tid) == os.SCHED_OTHER
        rt.start()
        rt.also([tid, 2 ** 22 + 12345])       # the second id names no thread
        assert _thread_policy(tid) == os.SCHED_FIFO and _policy() == os.SCHED_FIFO
        rt.stop()
        assert _thread_policy(tid) == os.SCHED_OTHER and _policy() == os.SCHED_OTHER
        short = priority.RealTime(limit_s=0.05)   # the handshake's shorter limit
        short.start()
        short.also([tid])
        await asyncio.sleep(0.2)
        assert _thread_policy(tid) == os.SCHED_OTHER and _policy() == os.SCHED_OTHER
        short.stop()
        assert priority.RealTime._depth == 0 and not priority.RealTime._others
    finally:
        stop.set()
        t.join()


async def test_a_migration_runs_its_hand_over_boosted_and_leaves_the_policy_as_it_was(privileged):
    async with Hypervisor(memory_mib=128) as src, Hypervisor(memory_mib=128) as dst:
        arrived = []
        seen: list[int] = []
        rx = await live.serve(dst, "127.0.0.1", 0, SECRET, lambda d: (arrived.append(d), seen.append(_policy())))
        try:
            dom = await src.create(guest("suspend"), memory_mib=8, cmdline="pages=64 every=10")
            await dom.wait_for_line(r"uptime: ticks=20 ", 20)
            st = await live.migrate(dom, "127.0.0.1", rx.port, SECRET)
            assert st.realtime and seen == [os.SCHED_FIFO]       # the domain started boosted
            assert _policy() == os.SCHED_OTHER and priority.RealTime._depth == 0
            await arrived[0].wait_for_line(r"suspend: resumed rc=0", 10)
            # Refused by the receiver (wrong secret) and not boosted at all: still as it was.
            dom2 = await src.create(guest("suspend"), memory_mib=8, cmdline="pages=64 every=10")
            await dom2.wait_for_line(r"uptime: ticks=20 ", 20)
            with pytest.raises(live.MigrationError):
                await live.migrate(dom2, "127.0.0.1", rx.port, b"wrong-secret-0123456789")
            assert _policy() == os.SCHED_OTHER and priority.RealTime._depth == 0
            st = await live.migrate(dom2, "127.0.0.1", rx.port, SECRET, realtime=False)
            assert not st.realtime
        finally:
            await rx.aclose()


async def _migrate_unboosted(cmdline: str, **kw) -> tuple["live.MigrateStats", dict[str, float]]:
    """An 8 MiB suspend guest migrated between two hypervisors of this process, the sender
    unboosted (realtime=False), the receiver as a daemon runs it: (sender's stats,
    receiver's marks) once the guest has resumed there."""
    async with Hypervisor(memory_mib=128) as src, Hypervisor(memory_mib=128) as dst:
        arrived = []
        rx = await live.serve(dst, "127.0.0.1", 0, SECRET, arrived.append)
        try:
            dom = await src.create(guest("suspend"), memory_mib=8, cmdline=cmdline)
            await dom.wait_for_line(r"uptime: ticks=20 ", 20)
            st = await live.migrate(dom, "127.0.0.1", rx.port, SECRET, realtime=False, **kw)
            await arrived[0].wait_for_line(r"suspend: resumed rc=0", 10)
            return st, dict(rx.marks)
        finally:
            await rx.aclose()


async def test_the_receiver_boosts_at_the_senders_stop_and_copy(privileged, monkeypatch):
    """The sender's STOP_AND_COPY record (sent as its guest suspends) boosts the receiver
    then, not at the end of the stream: the last pages and the tail (the guest's downtime)
    are read at real-time priority. The sender here runs without its own boost (one
    process: it would be the same thread's)."""
    from aiovmm.migration import restore
    seen: list[tuple[str, int]] = []
    record = restore._record

    def noted(dom, st, rt, body):
        seen.append((rt.name, _policy()))
        return record(dom, st, rt, body)
    monkeypatch.setattr(restore, "_record", noted)
    st, marks = await _migrate_unboosted("pages=64 every=10")
    assert not st.realtime
    assert marks["rx_stop_copy"] < marks["rx_stream_in"]
    head = [p for name, p in seen if name.startswith("x86_pv_") and "vcpu" not in name]
    tail = [p for name, p in seen if name in ("x86_tsc_info", "shared_info", "x86_pv_vcpu_basic")]
    assert head == [os.SCHED_OTHER, os.SCHED_OTHER]          # pre-copy: normal priority
    assert tail and set(tail) == {os.SCHED_FIFO}
    assert _policy() == os.SCHED_OTHER and priority.RealTime._depth == 0


async def test_the_receiver_waits_boosted_after_each_precopy_round(privileged, monkeypatch):
    """After each PRECOPY_ROUND_END the receiver waits boosted (blocked, no CPU) for what
    follows, so it wakes at once for the stop-and-copy; the next round's first PAGE_DATA
    ends that boost. Not while a sender runs in the same process (its loop thread is the
    sender's too): here the sender's count is offset so that the receiver acts as in a
    daemon of its own, and the sender runs unboosted."""
    from aiovmm.migration import restore
    from aiovmm.migration import stream as S
    seen: list[tuple[str, int, int]] = []          # (record, policy before, policy after)
    read_stream = restore.read_stream

    async def traced(*a, on_record=None, **k):
        def rec(r):
            before = _policy()
            on_record(r)
            seen.append((r.name, before, _policy()))
        return await read_stream(*a, on_record=rec, **k)
    monkeypatch.setattr(restore, "read_stream", traced)
    monkeypatch.setattr(live, "_sending", -1)
    st, _marks = await _migrate_unboosted("pages=64 every=10 dirty=64",
                                          downtime_ms=0.001)      # more than one round
    names = [n for n, _b, _a in seen]
    assert names.count("precopy_round_end") == st.rounds >= 2, (st.rounds, names)
    stop = names.index("stop_and_copy")
    for i, (name, before, after) in enumerate(seen):
        if name == "precopy_round_end":
            assert after == os.SCHED_FIFO
        elif i < stop and name == "page_data" and i and seen[i - 1][0] == "precopy_round_end":
            assert (before, after) == (os.SCHED_FIFO, os.SCHED_OTHER)     # another round
    assert seen[stop][1] == os.SCHED_FIFO          # already boosted when the suspend came
    assert all(a == os.SCHED_FIFO for _n, _b, a in seen[stop:])
    assert _policy() == os.SCHED_OTHER and priority.RealTime._depth == 0
