"""Red team: a migration peer that knows the secret must not keep the receiver's loop (which
runs every guest of the host) at SCHED_FIFO. Each of its records re-armed a boost of up to
REALTIME_LIMIT_S (PRECOPY_ROUND_END boosts, the next PAGE_DATA ends it, the next
PRECOPY_ROUND_END boosts again), as did each new connection's STOP_AND_COPY: the limit held
per boost, with no budget across them (priority.RealTime._grant)."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from aiovmm import Hypervisor
from aiovmm.migration import live, priority, save as _save, stream as S
from conftest import guest
from test_migration_realtime import SECRET, privileged  # noqa: F401 (a fixture)


def _boosted_time(tid: int, stop: threading.Event, out: list[float]) -> None:
    """Sample the thread's policy every ms until `stop`: (seconds it was SCHED_FIFO,
    seconds sampled)."""
    boosted, t = 0.0, time.monotonic()
    t0 = t
    while not stop.wait(0.001):
        now = time.monotonic()
        if os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO:
            boosted += now - t
        t = now
    out += [boosted, time.monotonic() - t0]


async def _hostile_sender(dom, port: int, seconds: float) -> None:
    """Authenticates, sends the head, then for `seconds` alternates PRECOPY_ROUND_END (the
    receiver boosts and waits) with one page (PAGE_DATA: the boost ends), each pair after a
    pause just under REALTIME_LIMIT_S; then another connection's STOP_AND_COPY, and so on."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        hello = await reader.readexactly(len(live.MAGIC) + live.NONCE)
        nr, ns = hello[len(live.MAGIC):], os.urandom(live.NONCE)
        writer.write(live.MAGIC + ns + live._mac(SECRET, b"sender", nr, ns))
        await reader.readexactly(live.MAC)

        async def write(data) -> None:
            writer.write(bytes(data))
            await writer.drain()
        await write(_save.head(dom))
        for _ in range(4):
            await write(S.record(S.Rec.precopy_round_end))
            await asyncio.sleep(priority.REALTIME_LIMIT_S * 0.9)
            await _save.pages(dom, [0], write)
        await write(S.record(S.Rec.stop_and_copy))
        await asyncio.sleep(priority.REALTIME_LIMIT_S * 0.9)
        writer.transport.abort()
        await asyncio.sleep(0.05)


async def test_a_peer_cannot_keep_the_receivers_loop_boosted(privileged):  # noqa: F811
    async with Hypervisor(memory_mib=128) as src, Hypervisor(memory_mib=128) as dst:
        rx = await live.serve(dst, "127.0.0.1", 0, SECRET)
        try:
            dom = await src.create(guest("suspend"), memory_mib=8, cmdline="pages=64 every=10")
            await dom.wait_for_line(r"uptime: ticks=20 ", 20)
            stop, out = threading.Event(), []
            sampler = threading.Thread(target=_boosted_time,
                                       args=(threading.get_native_id(), stop, out))
            sampler.start()
            seconds = 6.0       # unbudgeted: boosted ~90 % of it; budgeted: 2 s + 20 %
            try:
                await _hostile_sender(dom, rx.port, seconds)
            finally:
                stop.set()
                sampler.join()
            boosted, sampled = out
            assert sampled >= seconds
            assert boosted <= 2.0 + 0.2 * sampled + 0.2, (boosted, sampled)
            assert boosted >= 1.0, (boosted, sampled)   # boosts still happen, within it
            assert dst.domains == {} or all(d.name != dom.name for d in dst.domains.values())
        finally:
            await rx.aclose()
    assert priority.RealTime._depth == 0
