"""netback's TapWriter (backends/net/writer.py): guest -> tap frames written by a thread of
their own, in order, and a bounded backlog that leaves tx requests on the guest's ring.

The real Netback on a parked domain's ring pages and grants (test_mutation_kills_net's Vif);
the tap is the host end of a SOCK_SEQPACKET pair, here blocking with a small send buffer
so that the writer thread really stalls while nobody reads the other end."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest
import uvloop

from aiovmm import Hypervisor
from aiovmm.audit import audit
from backends.net.device import NETIF_RSP_OKAY, VNET_HDR_LEN
from backends.net.writer import TapWriter
from test_mutation_kills_net import Vif

SIZE = 4000                     # bytes per test packet: one slot from a granted page


async def _wait(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


def _recv_all(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(70000, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


def _run(body, run=asyncio.run) -> None:
    async def main():
        async with Hypervisor(memory_mib=64) as hv:
            v = Vif(hv)
            v.host.setblocking(True)             # the writer's dup shares this: it blocks
            v.host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
            v.out.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            try:
                await body(v)
            finally:
                v.close()
            assert audit(hv) == []
    run(main())


def test_frames_reach_the_tap_in_order_after_an_okay_response():
    """Each request is answered OKAY as soon as it is copied; the writer thread delivers
    the frames in ring order, each with its virtio_net_hdr, the payload as granted."""
    async def body(v):
        loop = asyncio.get_running_loop()
        w = TapWriter(v.host.fileno(), "t0", loop, lambda: None, lambda refused: None)
        v.nb._writer = w
        try:
            v.push(*[(50 + i, 0, 0, i, 64 + i) for i in range(8)])
            v.nb._process_tx()
            assert [s for _i, s in v.responses(8)] == [NETIF_RSP_OKAY] * 8
            got: list[bytes] = []
            await _wait(lambda: got.extend(_recv_all(v.out)) or len(got) == 8)
            granted = v.hv.mem.read(v.d.spare[2] << 12, 4096)
            assert [f[VNET_HDR_LEN:] for f in got] == [granted[:64 + i] for i in range(8)]
            assert w.frames == 8 and w.backlog() == 0
        finally:
            v.nb._writer = None
            await w.aclose()
    _run(body)


def test_a_full_backlog_leaves_requests_on_the_ring_until_the_writer_drains():
    """Nobody reads the tap: the thread stalls in its write, the backlog reaches the limit
    and netback stops consuming (the rest stays on the ring, no response, nothing
    dropped). Reading the tap drains the thread, which calls on_room; the next pass then
    takes the rest, and every frame arrives once, in order."""
    async def body(v):
        loop = asyncio.get_running_loop()
        room = asyncio.Event()
        w = TapWriter(v.host.fileno(), "t1", loop, room.set, lambda refused: None, limit=256 << 10)
        v.nb._writer = w
        n = 200                                   # 800 KB: more than the limit and the buffers
        try:
            reqs = [(50 + i % 20, i % 64, 0, i, SIZE - i % 90) for i in range(n)]     # each frame distinct
            v.push(*reqs)
            v.nb._process_tx()
            taken = v.nb.tx.req_cons
            assert v.nb._tx_backlogged and 0 < taken < n, taken
            assert w.backlog() >= w.limit
            await asyncio.sleep(0.2)              # the thread stays stuck: nothing is read
            assert not room.is_set() and v.nb.tx.req_cons == taken
            got: list[bytes] = []
            await _wait(lambda: got.extend(_recv_all(v.out)) or room.is_set())
            v.nb._process_tx()                    # what _tx_room's scheduled pass does
            assert v.nb.tx.req_cons > taken
            while v.nb.tx.req_cons < n:
                await _wait(lambda: got.extend(_recv_all(v.out)) or not w.full())
                v.nb._process_tx()
            await _wait(lambda: got.extend(_recv_all(v.out)) or len(got) == n)
            assert [s for _i, s in v.responses(n)] == [NETIF_RSP_OKAY] * n
            want = [v.hv.mem.read((v.d.spare[2 + i % 20] << 12) + off, size)
                    for i, (_g, off, _f, _id, size) in enumerate(reqs)]
            assert [f[VNET_HDR_LEN:] for f in got] == want
            assert v.nb.stats.tx_packets == n and v.nb.stats.tx_dropped == 0
        finally:
            v.nb._writer = None
            await w.aclose()
    _run(body)


def test_tx_written_blocks_so_a_writer_on_the_loops_cpu_runs():
    """A migration's wait for the suspended guest's last frames (Netback.tx_written): the
    loop at real-time priority on uvloop, as the daemon runs it in a downtime, with the tap
    writer boosted alike (RealTime.also) and on the loop's CPU, as on a 2-core host whose
    other core another boosted loop holds (bench/migrate.py --timeline, two processes: the
    source's tail held 100 ms, once in ~13 runs). The wait must block so the writer runs.
    It polled with 0.2 ms sleeps, which uvloop runs as none: the loop never left the CPU,
    the writer never ran, and the wait ran out."""
    try:
        saved = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, *saved)
    except OSError as e:
        pytest.skip(f"no scheduling policy changes here: {e}")
    took: list[float] = []

    async def body(v):
        loop = asyncio.get_running_loop()
        w = TapWriter(v.host.fileno(), "t9", loop, lambda: None, lambda refused: None)
        v.nb._writer = w
        cpus = os.sched_getaffinity(0)
        cpu = {min(cpus)}
        fifo = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1)
        w_saved = os.sched_getscheduler(w.native_id), os.sched_getparam(w.native_id)
        try:
            os.sched_setaffinity(w.native_id, cpu)
            os.sched_setaffinity(0, cpu)
            os.sched_setscheduler(w.native_id, *fifo)
            os.sched_setscheduler(0, *fifo)
            v.push(*[(50 + i, 0, 0, i, 64 + i) for i in range(8)])
            v.nb._process_tx()                  # handed to the thread; it waits for the CPU
            t0 = time.perf_counter()
            ok = await v.nb.tx_written(0.1)
            took.append(time.perf_counter() - t0)
        finally:
            os.sched_setscheduler(0, *saved)
            os.sched_setscheduler(w.native_id, *w_saved)
            os.sched_setaffinity(0, cpus)
            os.sched_setaffinity(w.native_id, cpus)
        try:
            assert ok and w.frames == 8 and w.backlog() == 0, (ok, w.frames, took)
            assert len(_recv_all(v.out)) == 8
        finally:
            v.nb._writer = None
            await w.aclose()
    _run(body, uvloop.run)


def test_a_vif_stopping_with_a_stalled_writer_waits_without_holding_the_loop():
    """The vif's serving task is cancelled (the domain going away) while its writer thread is
    stalled with frames queued that were answered OKAY. The close waits for the thread with
    the loop running: here the loop itself is the tap's reader, so the frames drain only if
    it runs. When the task has ended every frame is on the tap, in ring order, and the
    thread and its duplicate fd are gone. Before: TapWriter.close joined the thread on the
    loop (2 s bound), the reader never ran, the task ended with the thread still stuck."""
    async def body(v):
        loop = asyncio.get_running_loop()
        dom = v.d.dom
        v.nb.port = v.hv.host.endpoint_bind(dom.domid, dom.evtchn.alloc_unbound(0))
        threads0 = sum(1 for t in threading.enumerate() if t.name.startswith("tapw-"))
        n = 100                                   # 400 KB: far more than the socket buffers
        reqs = [(50 + i % 20, i % 64, 0, i, SIZE - i % 90) for i in range(n)]
        want = [v.hv.mem.read((v.d.spare[2 + i % 20] << 12) + off, size)
                for i, (_g, off, _f, _id, size) in enumerate(reqs)]
        v.push(*reqs)
        v.nb.held = True                          # rx (not under test) never reads the blocking pair
        serve = asyncio.create_task(v.nb._serve())
        try:
            await _wait(lambda: v.nb._writer is not None and v.nb._writer.backlog() > 0
                        and v.nb.tx.req_cons == n)
            w = v.nb._writer
            await asyncio.sleep(0.05)
            assert w.backlog() > 0                # stuck: nobody reads the tap
            got: list[bytes] = []
            during: list[int] = []                # tap reads while the vif was stopping
            at_end: list[bool] = []               # was the thread alive when the stop ended?

            def drain() -> None:                  # the tap's reader, on the loop
                if serve.done():
                    at_end.append(w._thread.is_alive())
                    return
                frames = _recv_all(v.out)
                got.extend(frames)
                during.append(len(frames))
                loop.call_later(0.002, drain)
            serve.cancel()
            loop.call_soon(drain)
            try:
                await serve
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(0.01)             # drain's last call
            assert during and at_end == [False], (during, at_end)
            got.extend(_recv_all(v.out))
            assert [f[VNET_HDR_LEN:] for f in got] == want, (len(got), n)
            assert w.backlog() == 0 and w.frames == n
            assert not w._thread.is_alive()
            assert sum(1 for t in threading.enumerate() if t.name.startswith("tapw-")) == threads0
            assert [s for _i, s in v.responses(n)] == [NETIF_RSP_OKAY] * n
        finally:
            if not serve.done():
                serve.cancel()
            v.nb.port.close()
    _run(body)
